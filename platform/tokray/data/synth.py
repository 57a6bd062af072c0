"""Synthetic, spatially correlated token datasets for tests and benchmarks (no tokenizer needed).

Each sample is a smooth random field (low-resolution Gaussian noise upsampled bilinearly) plus
its class's smooth prototype and a little per-token noise, mapped through a sigmoid onto the
codebook. Neighbouring tokens are correlated, ids are far from uniform (entropy below
log2(codebook)), and the class is learnable from the tokens.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from tokray.storage.formats.tokens import TokenMeta


def _upsample_matrix(out: int, inp: int) -> np.ndarray:
    """Bilinear interpolation weights [out, inp] (align_corners=True)."""
    if inp == 1:
        return np.ones((out, 1))
    pos = np.linspace(0, inp - 1, out)
    lo = np.minimum(np.floor(pos).astype(int), inp - 2)
    frac = pos - lo
    m = np.zeros((out, inp))
    m[np.arange(out), lo] = 1 - frac
    m[np.arange(out), lo + 1] = frac
    return m


class SynthTokens:
    def __init__(self, grid=(8, 8), codebook_size: int = 512, num_classes: int = 10, seed: int = 0):
        self.grid = tuple(grid)
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.seed = seed
        h, w = self.grid
        lh, lw = max(2, h // 3), max(2, w // 3)
        self._uh, self._uw = _upsample_matrix(h, lh), _upsample_matrix(w, lw)
        proto_rng = np.random.default_rng([seed, 2**31])
        self._protos = self._smooth(proto_rng.standard_normal((num_classes, lh, lw))) * 1.2

    def _smooth(self, low: np.ndarray) -> np.ndarray:
        return np.einsum("hi,nij,wj->nhw", self._uh, low, self._uw)

    def meta(self, shard_rows: int) -> TokenMeta:
        return TokenMeta(grid=self.grid, codebook_size=self.codebook_size,
                           class_names=tuple(f"class{c}" for c in range(self.num_classes)),
                           tokenizer=f"synthetic:seed={self.seed}", shard_rows=shard_rows,
                           extra={"source": "synthetic"})

    BLOCK = 1024  # randomness is keyed per fixed block, so any chunking yields the same samples

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, b])
        n = self.BLOCK
        sids = np.arange(b * n, (b + 1) * n, dtype=np.int64)
        labels = rng.integers(0, self.num_classes, n).astype(np.int32)
        lh, lw = self._uh.shape[1], self._uw.shape[1]
        field = self._smooth(rng.standard_normal((n, lh, lw))) + self._protos[labels]
        field += 0.35 * rng.standard_normal(field.shape)
        p = 1.0 / (1.0 + np.exp(-1.3 * field))
        ids = np.minimum((p * self.codebook_size).astype(np.int64), self.codebook_size - 1)
        return ids.astype(np.uint16), labels, sids

    def chunk(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples [start, start+n): (ids [n, h, w] uint16, labels [n], sample_ids [n])."""
        first, last = start // self.BLOCK, (start + n - 1) // self.BLOCK
        parts = [self._block(b) for b in range(first, last + 1)]
        off = start - first * self.BLOCK
        return tuple(np.concatenate(x)[off:off + n] for x in zip(*parts))

    def batches(self, num_samples: int, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, num_samples, chunk):
            yield self.chunk(start, min(chunk, num_samples - start))
