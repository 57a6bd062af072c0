"""TokenAdapt weights (save, load, the shipped CIFAR-10 default) and its application to a batch.

A TokenAdapt file is one safetensors file: f and g (stored in float16 unless asked otherwise),
and metadata with the model config, its own fingerprint and the fingerprint of the tokenizer it
was trained for. f and g only make sense with that tokenizer's codebook, so loading with a
tokenizer fingerprint refuses any other one, naming both.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn as nn

import models
from tokray.assets import default_tokenadapt
from tokray.augment.geometry import warp

def _fingerprint(tensors: dict[str, torch.Tensor], config: dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_tokenadapt(model: nn.Module, model_name: str, model_args: dict, path: str, tokenizer_fingerprint: str,
                    extra: dict | None = None, dtype: torch.dtype = torch.float16) -> str:
    """Write f and g with their config, fingerprint and tokenizer fingerprint; returns the fingerprint."""
    from safetensors.torch import save_file

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
               for k, v in model.state_dict().items()}
    config = {"model": model_name, "model_args": {**model_args, "vocab_size": model.vocab_size,
                                                  "token_dim": model.token_dim, "grid": list(model.grid),
                                                  "out_grid": list(model.out_grid)}}
    fp = _fingerprint(tensors, config)
    meta = {"config": json.dumps(config), "fingerprint": fp, "tokenizer": tokenizer_fingerprint,
            "extra": json.dumps(extra or {})}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return fp


def load_tokenadapt(path: str = "", tokenizer_fingerprint: str | None = None):
    """(model in eval mode, float32, no grad; info with 'fingerprint', 'tokenizer', 'config', 'extra').

    ``path`` "" = the shipped CIFAR-10 weights. With ``tokenizer_fingerprint``, weights trained for
    another tokenizer are refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = path or default_tokenadapt()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no TokenAdapt weights at {path}; train them with `python jobs/train_tokenadapt.py`")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta or "tokenizer" not in meta:
        raise ValueError(f"{path} is not a tokray TokenAdapt file (no config/tokenizer in its safetensors metadata)")
    if tokenizer_fingerprint is not None and meta["tokenizer"] != tokenizer_fingerprint:
        raise ValueError(f"TokenAdapt weights {path} were trained for tokenizer {meta['tokenizer']}, but the tokenizer "
                         f"in use is {tokenizer_fingerprint}; train TokenAdapt for this tokenizer with "
                         f"`python jobs/train_tokenadapt.py --tokenizer PATH`")
    config = json.loads(meta["config"])
    tensors = load_file(path)
    if _fingerprint(tensors, config) != meta["fingerprint"]:
        raise ValueError(f"{path}: weights do not match the fingerprint in its metadata; the file is damaged")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in config["model_args"].items()}
    model = models.create_model(config["model"], **args)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    model.eval().requires_grad_(False)
    info = {"fingerprint": meta["fingerprint"], "tokenizer": meta["tokenizer"], "config": config,
            "extra": json.loads(meta.get("extra", "{}")), "path": path}
    return model, info


def check_compatible(tokenadapt: nn.Module, codebook: torch.Tensor) -> None:
    v, c = codebook.shape
    if (tokenadapt.vocab_size, tokenadapt.token_dim) != (v, c):
        raise ValueError(f"TokenAdapt was built for {tokenadapt.vocab_size} codes of {tokenadapt.token_dim} dims, "
                         f"the codebook has {v} codes of {c} dims; use TokenAdapt weights trained for this tokenizer")


def tokenadapt_logits(tokenadapt: nn.Module, emb: torch.Tensor, theta: torch.Tensor, out_grid: tuple[int, int],
                      mix=None) -> torch.Tensor:
    """g(mix(A(f(emb)))): embeddings [B, C, h, w] -> logits [B, V, *out_grid] of the view ``theta``.

    ``mix`` (optional) is applied to the warped features (Mixup/CutMix in f-space)."""
    feat = warp(tokenadapt.f(emb), theta, tokenadapt.feature_size(out_grid))
    if mix is not None:
        feat = mix(feat)
    return tokenadapt.g(feat)
