"""Every random stream of a run, derived from (seed, purpose, epoch, rank, ...) with NumPy's SeedSequence.

Arithmetic seeds (``seed * 1000 + epoch * 10 + rank``) collide: at 10 workers rank 10 of epoch 0
would draw what rank 0 of epoch 1 draws. A SeedSequence over the parts never collides in practice.
"""

from __future__ import annotations

import zlib

import numpy as np

PURPOSES = ("numpy", "shuffle", "masks", "order")


def derive_seed(seed: int, purpose: str, *parts: int) -> int:
    """A 63-bit seed for ``purpose`` (one of PURPOSES) at the given (epoch, rank, step, ...) parts."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; one of {PURPOSES}")
    entropy = [int(seed), zlib.crc32(purpose.encode()), *(int(p) for p in parts)]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).astype(np.uint64) @
               np.array([1 << 31, 1], dtype=np.uint64)) & ((1 << 63) - 1)
