"""TokenAdapt weights (save, load, the shipped CIFAR-10 default) and its application to a batch.

A TokenAdapt file is one artifact (``tokray.artifacts``): f and g (stored in float16 unless asked
otherwise), and metadata with the model config, its own fingerprint and the fingerprint of the
tokenizer it was trained for. f and g only make sense with that tokenizer's codebook, so loading with a
tokenizer fingerprint refuses any other one, naming both.
"""

from __future__ import annotations


import torch
import torch.nn as nn

import models
from tokray.artifacts import factory_args, load_tensors, read_info, save_artifact
from tokray.assets import default_tokenadapt
from tokray.augment.geometry import warp

MAKE_ONE = "train them with `python jobs/train_tokenadapt.py`"


def save_tokenadapt(model: nn.Module, model_name: str, model_args: dict, path: str, tokenizer_fingerprint: str,
                    extra: dict | None = None, dtype: torch.dtype = torch.float16) -> str:
    """Write f and g with their config, fingerprint and tokenizer fingerprint; returns the fingerprint."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    config = {"model": model_name, "model_args": {**model_args, "vocab_size": model.vocab_size,
                                                  "token_dim": model.token_dim, "grid": list(model.grid),
                                                  "out_grid": list(model.out_grid)}}
    return save_artifact(path, tensors, config, extra, fields={"tokenizer": tokenizer_fingerprint})


def load_tokenadapt(path: str = "", tokenizer_fingerprint: str | None = None):
    """(model in eval mode, float32, no grad; info with 'fingerprint', 'tokenizer', 'config', 'extra').

    ``path`` "" = the shipped CIFAR-10 weights. With ``tokenizer_fingerprint``, weights trained for
    another tokenizer are refused (before their tensors are read)."""
    path = path or default_tokenadapt()
    info = read_info(path, "TokenAdapt file", MAKE_ONE, required=("tokenizer",))
    trained_for = info.fields["tokenizer"]
    if tokenizer_fingerprint is not None and trained_for != tokenizer_fingerprint:
        raise ValueError(f"TokenAdapt weights {path} were trained for tokenizer {trained_for}, but the tokenizer "
                         f"in use is {tokenizer_fingerprint}; train TokenAdapt for this tokenizer with "
                         f"`python jobs/train_tokenadapt.py --tokenizer PATH`")
    tensors = load_tensors(info)
    model = models.create_model(info.config["model"], **factory_args(info.config))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    model.eval().requires_grad_(False)
    return model, {"fingerprint": info.fingerprint, "tokenizer": trained_for, "config": info.config,
                   "extra": info.extra, "path": path}


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
