"""The training stream: Ray Data blocks of token shards -> torch batches of uint16 ids.

Conversion happens once per batch, zero-copy from Arrow: the fixed-size list of uint16 ids is a
flat buffer reshaped to [B, h, w]. Ids stay uint16 on the host (2 bytes/token) and become
int64 only on the training device, just before the embedding lookup.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from tokray.storage import codec


class TokenBatchCollate(ArrowBatchCollateFn):
    """Arrow batch -> {ids uint16 [B, h, w], label int64 [B], sample_id int64 [B]} (CPU tensors)."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = tuple(grid)

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return arrow_to_torch(batch, self.grid)


def arrow_to_torch(batch: pa.Table, grid) -> dict[str, torch.Tensor]:
    ids = codec.table_ids(batch)
    # one copy of B*h*w*2 bytes: the tensor owns writable memory (pinnable), still uint16
    return {"ids": torch.from_numpy(np.array(ids, copy=True).reshape(-1, *grid)),
            "label": torch.from_numpy(batch.column(codec.LABEL).to_numpy().astype(np.int64)),
            "sample_id": torch.from_numpy(batch.column(codec.SAMPLE_ID).to_numpy().copy())}


def iter_torch_batches(data_iter, grid, batch_size: int, *, drop_last: bool = False,
                       prefetch_batches: int = 2, shuffle_buffer: int | None = None,
                       seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from a Ray ``Dataset`` or ``DataIterator`` (e.g. a streaming_split part)."""
    return data_iter.iter_torch_batches(
        batch_size=batch_size, collate_fn=TokenBatchCollate(grid), drop_last=drop_last,
        prefetch_batches=prefetch_batches, local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)
