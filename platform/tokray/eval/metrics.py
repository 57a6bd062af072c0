"""Image and token metrics: PSNR of reconstructions, order-0 entropy of ids.

PSNR is measured on the [0, 255] scale of images given in [-1, 1], both sides rounded to integers
like a saved image. Over many batches, sum the squared errors and the value counts, then take one
PSNR (``psnr_from_sse``): the PSNR of the mean error, not the mean of per-batch PSNRs.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _to_255(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def squared_error_255(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Summed squared error on the [0, 255] scale of two images (or batches) in [-1, 1]."""
    return float(((_to_255(recon) - _to_255(target)) ** 2).sum(dtype=torch.float64))


def psnr_from_sse(sse: float, count: int) -> float:
    """PSNR (dB) of a summed squared error over ``count`` values on the [0, 255] scale."""
    return 10 * math.log10(255.0**2 / max(sse / max(1, count), 1e-10))


def psnr_db(recon: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR (dB) of a reconstruction against its target, both in [-1, 1]."""
    return psnr_from_sse(squared_error_255(recon, target), target.numel())


def entropy_bits(ids: np.ndarray) -> float:
    """Order-0 entropy (bits per id) of the ids' empirical distribution."""
    counts = np.bincount(np.asarray(ids).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())
