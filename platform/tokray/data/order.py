"""The global sample order of a training run: a function of (manifest, seed, epoch) only.

Each epoch permutes the shards (seeded by seed and epoch), cuts the permuted list into windows of
``window_shards`` consecutive shards, and permutes the rows inside each window. Concatenated, the
windows give the epoch's sequence of samples; global batch ``b`` is positions [b*B, (b+1)*B) of it. The
union of the ranks' batches at a step is that set for every W that divides B, whichever store the shards
come from, however many read tasks run and wherever blocks live. What it depends on: the shard list
(rows per shard, in manifest order), the seed, the window and the global batch. Nothing is read to
compute it.

Which rank trains on which sample of a global batch does not change the step (its gradient is the mean
over the union); ``split`` chooses:
- ``interleaved`` (default): rank r takes the slice [b*B + r*B/W, b*B + (r+1)*B/W) of the shuffled batch,
  so each rank's batch is a random draw from the window; every rank reads all of a window's shards.
- ``storage``: the batch's samples are ranked by where they are stored (window, then shard, then row) and
  rank r takes ranks [r*B/W, (r+1)*B/W), in the batch's shuffled order. A rank then reads about 1/W of a
  window's shards (plus the one or two at its boundary); its batch holds only what those shards hold
  (a set stored sorted by class gives each rank some of the classes, and rank-local CutMix/Mixup mixes
  within them), so it suits sets written in random order.

A position in the order is (epoch, samples consumed); resuming there skips every window that ends
before it without reading it, then the consumed rows of the window it falls in.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tokray.seeds import derive_seed


@dataclasses.dataclass(frozen=True)
class Window:
    """A run of shards whose rows are shuffled together: they cover positions [start, start + rows)."""

    index: int
    shards: tuple[int, ...]
    start: int
    rows: int

    @property
    def end(self) -> int:
        return self.start + self.rows


@dataclasses.dataclass(frozen=True)
class SampleOrder:
    shard_rows: tuple[int, ...]  # rows of each shard, in manifest order
    seed: int
    window_shards: int  # shards shuffled together
    global_batch: int
    split: str = "interleaved"  # or "storage": see the module doc

    def __post_init__(self):
        if self.window_shards < 1 or self.global_batch < 1:
            raise ValueError(f"window_shards and global_batch must be >= 1, got {self.window_shards}, "
                             f"{self.global_batch}")
        if self.split not in ("interleaved", "storage"):
            raise ValueError(f"split {self.split!r}: choose interleaved or storage")
        if sum(self.shard_rows) < self.global_batch:
            raise ValueError(f"{sum(self.shard_rows)} samples are fewer than one global batch of {self.global_batch}")

    @classmethod
    def for_dataset(cls, shard_rows, seed: int, window_samples: int, global_batch: int,
                    split: str = "interleaved") -> "SampleOrder":
        """Windows of about ``window_samples`` samples (at least one shard; all of them for a small set)."""
        rows = tuple(int(r) for r in shard_rows)
        mean = max(1, sum(rows) // max(1, len(rows)))
        return cls(rows, int(seed), max(1, min(len(rows), round(window_samples / mean))), int(global_batch), split)

    @property
    def num_samples(self) -> int:
        return sum(self.shard_rows)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def windows_per_epoch(self) -> int:
        return -(-len(self.shard_rows) // self.window_shards)

    @property
    def used_per_epoch(self) -> int:
        """Samples an epoch trains on: whole global batches (the remainder changes with the epoch's order)."""
        return self.steps_per_epoch * self.global_batch

    def windows(self, epoch: int, start: int = 0) -> list[Window]:
        """The epoch's windows that hold a position in [start, used_per_epoch), in order."""
        rng = np.random.default_rng(derive_seed(self.seed, "order", epoch))
        perm = rng.permutation(len(self.shard_rows))
        out, pos = [], 0
        for k in range(0, len(perm), self.window_shards):
            shards = tuple(int(s) for s in perm[k:k + self.window_shards])
            rows = sum(self.shard_rows[s] for s in shards)
            w = Window(len(out), shards, pos, rows)
            out.append(w)
            pos += rows
        return [w for w in out if w.end > start and w.start < self.used_per_epoch]

    def window_permutation(self, epoch: int, window: Window) -> np.ndarray:
        """Row i of the window's sequence is row perm[i] of its shards concatenated in window order."""
        rng = np.random.default_rng(derive_seed(self.seed, "order", epoch, window.index + 1))
        return rng.permutation(window.rows)

    def rank_rows(self, epoch: int, window: Window, rank: int, world: int, start: int = 0) -> np.ndarray:
        """Rows (into the window's concatenated shards) that ``rank`` of ``world`` trains on, in its order:
        its part of every global batch (``split``), from position ``start`` on, whole batches only."""
        if self.global_batch % world:
            raise ValueError(f"the global batch {self.global_batch} does not divide over {world} workers")
        per_rank = self.global_batch // world
        perm = self.window_permutation(epoch, window)
        pos = window.start + np.arange(window.rows)
        offset = self._storage_offsets(pos, perm) if self.split == "storage" else pos % self.global_batch
        mine = (offset // per_rank == rank) & (pos >= start) & (pos < self.used_per_epoch)
        return perm[mine]

    def _storage_offsets(self, pos: np.ndarray, perm: np.ndarray) -> np.ndarray:
        """Each position's place in its batch once the batch is sorted by stored row. A batch's part in the
        previous window is stored before all of this window, so its sorted places here start after that part."""
        batch = pos // self.global_batch
        by_storage = np.lexsort((perm, batch))
        offset = np.empty(len(pos), dtype=np.int64)
        offset[by_storage] = pos - batch[by_storage] * self.global_batch
        return offset
