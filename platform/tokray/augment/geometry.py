"""Geometric augmentations defined once, in normalized coordinates, applied at any resolution.

A transform is a batch of 3x3 affine matrices ``theta`` [B, 3, 3] mapping *output* normalized
coordinates (x, y in [-1, 1], pixel centres as in ``align_corners=False``) to *input* normalized
coordinates. Because it never mentions pixels, the same ``theta`` warps a 32x32 image, its 16x16
TokenAdapt feature map and its 8x8 embedding map onto the same view: this is what lets
TokenAdapt be trained against ``tokenizer(A(x))`` and what the agreement evaluation compares.

The sampled view composes, in image order, a horizontal flip, the affine group of SeiT++'s
TokenAdapt transform (rotate, translate-x, translate-y, shear-x, shear-y; each applied with its own
probability, the group as a whole with ``affine_prob``) and a random-resized crop (torchvision's
rule: 10 tries of area and log-ratio, else the whole image), and is resampled once (bicubic,
border padding) with kornia's ``warp_affine``. Unlike torchvision on a 4-D tensor, every sample
draws its own parameters.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from kornia.geometry.conversions import denormalize_homography
from kornia.geometry.transform import warp_affine


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_range(name: str, pair, lo: float, hi: float | None = None) -> None:
    if len(pair) != 2 or not lo <= pair[0] <= pair[1] or (hi is not None and pair[1] > hi):
        bound = f"<= {hi}" if hi is not None else ""
        raise ValueError(f"{name} must be (min, max) with {lo} <= min <= max {bound}, got {tuple(pair)}")


@dataclasses.dataclass(frozen=True)
class GeometrySpec:
    """Distribution of a geometric view (defaults: identity)."""

    flip_prob: float = 0.0
    affine_prob: float = 0.0  # the whole affine group (RandomApply)
    affine_op_prob: float = 0.5  # each op of the group, independently
    rotate_deg: float = 30.0  # angle ~ U(-rotate, rotate)
    translate: float = 0.2  # shift ~ U(-t, t) x width (x) and x height (y)
    shear_deg: float = 15.0  # one-sided, U(0, shear), on x and on y (as torchvision shear=[0, 15])
    crop_prob: float = 0.0  # random-resized crop
    crop_scale: tuple = (0.08, 1.0)  # area fraction of the crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # aspect ratio (w / h) of the crop

    def __post_init__(self):
        for name in ("flip_prob", "affine_prob", "affine_op_prob", "crop_prob"):
            _check_prob(name, getattr(self, name))
        _check_range("crop_scale", self.crop_scale, 1e-6, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 1e-6)
        if self.rotate_deg < 0 or self.translate < 0 or self.shear_deg < 0:
            raise ValueError(f"rotate_deg, translate and shear_deg must be >= 0, got "
                             f"{self.rotate_deg}, {self.translate}, {self.shear_deg}")

    @property
    def is_identity(self) -> bool:
        return self.flip_prob == 0 and self.affine_prob == 0 and self.crop_prob == 0

    def sample(self, n: int, generator: torch.Generator, aspect: float = 1.0) -> torch.Tensor:
        """theta [n, 3, 3] (float32, on the generator's device); ``aspect`` = width / height."""
        dev = generator.device
        u = torch.rand(n, 16, generator=generator, device=dev, dtype=torch.float64)
        eye = torch.eye(3, dtype=torch.float64, device=dev).expand(n, 3, 3).clone()
        # metric frame: x scaled by the aspect, so a rotation is a rotation on a rectangle too
        d = torch.diag(torch.tensor([aspect, 1.0, 1.0], dtype=torch.float64, device=dev))
        d_inv = torch.linalg.inv(d)

        flip = eye.clone()
        flip[:, 0, 0] = torch.where(u[:, 0] < self.flip_prob, -1.0, 1.0)

        fwd = eye.clone()  # forward map of the affine group, in image order, metric frame
        group = u[:, 1] < self.affine_prob
        on = lambda k: group & (u[:, 2 + k] < self.affine_op_prob)  # noqa: E731
        a = torch.where(on(0), (2 * u[:, 7] - 1) * math.radians(self.rotate_deg), 0.0)
        rot = eye.clone()
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        fwd = rot @ fwd
        tr = eye.clone()
        tr[:, 0, 2] = torch.where(on(1), (2 * u[:, 8] - 1) * 2 * self.translate * aspect, 0.0)
        tr[:, 1, 2] = torch.where(on(2), (2 * u[:, 9] - 1) * 2 * self.translate, 0.0)
        fwd = tr @ fwd
        sx, sy = eye.clone(), eye.clone()
        sx[:, 0, 1] = torch.where(on(3), torch.tan(u[:, 10] * math.radians(self.shear_deg)), 0.0)
        sy[:, 1, 0] = torch.where(on(4), torch.tan(u[:, 11] * math.radians(self.shear_deg)), 0.0)
        fwd = sy @ sx @ fwd
        affine = d_inv @ torch.linalg.inv(fwd) @ d  # output -> input, normalized frame

        crop = eye.clone()
        w, h = _rrc_sizes(n, self.crop_scale, self.crop_ratio, aspect, generator)
        w = torch.where(u[:, 12] < self.crop_prob, w, 1.0)
        h = torch.where(u[:, 12] < self.crop_prob, h, 1.0)
        crop[:, 0, 0], crop[:, 1, 1] = w, h
        crop[:, 0, 2] = (2 * u[:, 13] - 1) * (1 - w)
        crop[:, 1, 2] = (2 * u[:, 14] - 1) * (1 - h)
        return (flip @ affine @ crop).float()


def _rrc_sizes(n: int, scale, ratio, aspect: float, generator: torch.Generator, tries: int = 10):
    """Crop width and height as fractions of the image (torchvision's rule, batched)."""
    dev = generator.device
    area = aspect * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator, device=dev,
                                                                     dtype=torch.float64))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(lo + (hi - lo) * torch.rand(n, tries, generator=generator, device=dev, dtype=torch.float64))
    w, h = (area * r).sqrt() / aspect, (area / r).sqrt()
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), 0)
    pick = lambda t: torch.where(ok.any(1), t.gather(1, first[:, None])[:, 0], 1.0)  # noqa: E731
    return pick(w), pick(h)


def flip_theta(n: int, device=None) -> torch.Tensor:
    theta = torch.eye(3, device=device).expand(n, 3, 3).clone()
    theta[:, 0, 0] = -1
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], mode: str = "bicubic",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample x [B, C, H, W] on the view ``theta`` [B, 3, 3] (output -> input, normalized) at ``size``."""
    if x.shape[0] != theta.shape[0]:
        raise ValueError(f"{x.shape[0]} maps but {theta.shape[0]} transforms")
    if x.shape[0] == 0:
        return x.new_zeros(0, x.shape[1], *size)
    theta = theta.to(device=x.device, dtype=torch.float64)
    # kornia wants the source->destination pixel matrix; normalized theta maps destination -> source
    m = denormalize_homography(torch.linalg.inv(theta), tuple(x.shape[-2:]), tuple(size), align_corners=False)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # coordinates need float32
    out = warp_affine(x.to(work), m[:, :2].to(work), tuple(size), mode=mode, padding_mode=padding_mode,
                      align_corners=False)
    return out.to(x.dtype)


def center_crop_ids(ids: torch.Tensor, out_size: int) -> torch.Tensor:
    """The central out_size x out_size ids of [B, h, w] (evaluation view; 0 or the grid: unchanged)."""
    h, w = ids.shape[-2:]
    if out_size == 0 or (out_size == h and out_size == w):
        return ids
    if out_size < 0 or out_size > min(h, w):
        raise ValueError(f"out_size {out_size} does not fit the {h}x{w} token grid; use 0 (keep) .. {min(h, w)}")
    top, left = (h - out_size) // 2, (w - out_size) // 2
    return ids[..., top:top + out_size, left:left + out_size]
