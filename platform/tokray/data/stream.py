"""The training stream: Ray Data blocks of shards -> torch batches, one collate per record kind.

Tokens: conversion happens once per batch, zero-copy from Arrow: the fixed-size list of uint16 ids
is a flat buffer reshaped to [B, h, w]. Ids stay uint16 on the host (2 bytes/token) and become
int64 only on the training device, just before the embedding lookup. Pixels: the stored JPEGs
are decoded here, to uint8 [B, 3, s, s]; the model normalizes on the device.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from tokray.data.spec import DataSpec
from tokray.storage.formats import LABEL, SAMPLE_ID, pixels as pixel_format, tokens as token_format


class TokenBatchCollate(ArrowBatchCollateFn):
    """Arrow batch -> {ids uint16 [B, h, w], label int64 [B], sample_id int64 [B]} (CPU tensors)."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = tuple(grid)

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        ids = token_format.table_ids(batch)
        # one copy of B*h*w*2 bytes: the tensor owns writable memory (pinnable), still uint16
        return {"ids": torch.from_numpy(np.array(ids, copy=True).reshape(-1, *self.grid)), **_labels(batch)}


class PixelBatchCollate(ArrowBatchCollateFn):
    """Arrow batch -> {pixels uint8 [B, 3, size, size], label int64 [B], sample_id int64 [B]} (CPU tensors)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        pixels = pixel_format.decode_jpegs(batch.column(pixel_format.JPEG).to_pylist(), self.size)
        return {"pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), **_labels(batch)}


def _labels(batch: pa.Table) -> dict[str, torch.Tensor]:
    return {"label": torch.from_numpy(batch.column(LABEL).to_numpy().astype(np.int64)),
            "sample_id": torch.from_numpy(batch.column(SAMPLE_ID).to_numpy().copy())}


def collate_for(spec: DataSpec) -> ArrowBatchCollateFn:
    return TokenBatchCollate(spec.grid) if spec.is_tokens else PixelBatchCollate(spec.image_size)


def iter_torch_batches(data_iter, spec: DataSpec, batch_size: int, *, drop_last: bool = False,
                       prefetch_batches: int = 2, shuffle_buffer: int | None = None,
                       seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from a Ray ``Dataset`` or ``DataIterator`` (e.g. a streaming_split part) of ``spec``'s kind."""
    return data_iter.iter_torch_batches(
        batch_size=batch_size, collate_fn=collate_for(spec), drop_last=drop_last,
        prefetch_batches=prefetch_batches, local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)
