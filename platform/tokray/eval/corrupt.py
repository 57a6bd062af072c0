"""Common corruptions of raw images, for robustness evaluation (applied before tokenization).

Two ImageNet-C corruptions at five severities, with tables for CIFAR-scale (32 px) images; the
ImageNet-C tables apply from 128 px up:

================  =========================================  ===============================
kind              severity 1..5, images under 128 px         images of 128 px and more
================  =========================================  ===============================
gaussian_noise    std 0.04, 0.08, 0.12, 0.16, 0.20           0.08, 0.12, 0.18, 0.26, 0.38
gaussian_blur     sigma 0.5, 1.0, 1.5, 2.0, 2.5 px           1, 2, 3, 4, 6 px (ImageNet-C)
================  =========================================  ===============================

Noise std is a fraction of the value range (x in [0, 1], x + N(0, std^2), clipped), as in
ImageNet-C (whose CIFAR-10-C table tops out at 0.10; ours reaches 0.20 so that severity 5 hurts
tokenization visibly). Blur is ``kornia.filters.gaussian_blur2d`` with an odd kernel of
2 * ceil(2 sigma) + 1 >= 3 taps and reflected borders. Results are rounded back to uint8.
Noise is drawn from the explicit ``generator`` (kornia's RandomGaussianNoise draws from the
global RNG), so the same seed gives the same corrupted images; blur is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CORRUPTIONS = ("gaussian_noise", "gaussian_blur")
SEVERITIES = (1, 2, 3, 4, 5)
NOISE_STD = {"small": (0.04, 0.08, 0.12, 0.16, 0.20), "imagenet": (0.08, 0.12, 0.18, 0.26, 0.38)}
BLUR_SIGMA = {"small": (0.5, 1.0, 1.5, 2.0, 2.5), "imagenet": (1.0, 2.0, 3.0, 4.0, 6.0)}
IMAGENET_SCALE_PX = 128  # images at least this large use the ImageNet-C tables


def severity_params(kind: str, severity: int, image_size: int = 32) -> dict:
    """The corruption's parameters: {"std": ...} or {"sigma": ..., "kernel_size": ...}."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    table = "imagenet" if image_size >= IMAGENET_SCALE_PX else "small"
    if kind == "gaussian_noise":
        return {"std": NOISE_STD[table][severity - 1]}
    sigma = BLUR_SIGMA[table][severity - 1]
    return {"sigma": sigma, "kernel_size": 2 * math.ceil(2 * sigma) + 1}


def corrupt(pixels, kind: str, severity: int, generator: torch.Generator | int) -> np.ndarray | torch.Tensor:
    """Corrupt uint8 images [B, H, W, 3] (numpy or torch, any device); returns the same type,
    shape, dtype and device. ``generator``: a torch.Generator on the images' device, or an int seed."""
    import kornia

    as_numpy = isinstance(pixels, np.ndarray)
    x = torch.from_numpy(pixels) if as_numpy else pixels
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"corrupt takes uint8 images [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    params = severity_params(kind, severity, min(x.shape[1], x.shape[2]))
    if isinstance(generator, (int, np.integer)):
        generator = torch.Generator(device=x.device).manual_seed(int(generator))
    elif not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
    img = x.permute(0, 3, 1, 2).float() / 255.0
    if kind == "gaussian_noise":
        noise = torch.randn(img.shape, generator=generator, device=img.device) * params["std"]
        img = img + noise
    else:
        k, s = params["kernel_size"], params["sigma"]
        img = kornia.filters.gaussian_blur2d(img, (k, k), (s, s), border_type="reflect")
    out = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return out.numpy() if as_numpy else out
