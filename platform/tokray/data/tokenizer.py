"""The VQ tokenizer's file and its use on pixels: save, load (verified), pixels -> model input, encode.

A trained tokenizer is one artifact (``tokray.artifacts``): weights after pruning to the codes
used, with its config and fingerprint in the metadata. The fingerprint is what every token
dataset records, so ids are never read with the wrong codebook (``require_same_tokenizer``).
Training lives in ``tokray.fit.tokenizer``.
"""

from __future__ import annotations

import numpy as np
import torch

import models
from tokray.artifacts import factory_args, load_artifact, save_artifact

MAKE_ONE = "train one with `python jobs/train_tokenizer.py`"


def save_tokenizer(model, model_name: str, model_args: dict, path: str, extra: dict | None = None) -> str:
    """Write the tokenizer's weights and config to ``path``; returns its fingerprint."""
    config = {"model": model_name, "model_args": {**model_args, "codebook_size": model.codebook_size}}
    return save_artifact(path, model.state_dict(), config, extra)


def load_tokenizer(path: str):
    """(model in eval mode, metadata dict with 'fingerprint', 'config', 'extra')."""
    tensors, info = load_artifact(path, "tokenizer", MAKE_ONE)
    model = models.create_model(info.config["model"], **factory_args(info.config))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, {"fingerprint": info.fingerprint, "config": info.config, "extra": info.extra}


def require_same_tokenizer(meta, fingerprint: str, where: str = "") -> None:
    """Ids are only meaningful with the tokenizer that made them; refuse any other.

    ``meta``: a token dataset's metadata (anything with a ``tokenizer`` fingerprint)."""
    if meta.tokenizer != fingerprint:
        raise ValueError(f"{where or 'dataset'} was tokenized by tokenizer {meta.tokenizer}, but tokenizer "
                         f"{fingerprint} was given; use the dataset's own tokenizer or re-tokenize the images")


def to_unit(pixels_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(pixels_uint8).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_pixels(model, pixels: np.ndarray, device) -> np.ndarray:
    """uint8 pixels [N, H, W, 3] -> uint16 ids [N, h, w], encoded on ``device``."""
    x = to_unit(pixels).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return model.encode(x).to(torch.int32).cpu().numpy().astype(np.uint16)
