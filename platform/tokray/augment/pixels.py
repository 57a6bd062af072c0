"""The pixel baselines' augmentation, like for like with the token recipes: a random-resized crop (the
same area and ratio ranges, ``AugmentConfig.rrc_*``) and a horizontal flip, drawn per sample from the
worker's torch Generator through the token path's own geometry (``augment.geometry``: one affine view,
resampled with kornia's ``warp_affine`` on the device). CutMix/Mixup stay timm's ``Mixup`` in the
task, as on the token path (``TrainConfig.cutmix``/``mixup``).
"""

from __future__ import annotations

import dataclasses

import torch

from tokray.augment.geometry import GeometrySpec, warp
from tokray.config import AugmentConfig

# what a pixel run may set in its AugmentConfig: the geometry (colour, EDA and TokenAdapt act on tokens)
PIXEL_FIELDS = ("rrc_prob", "rrc_scale", "rrc_ratio", "flip_prob")


class PixelAugment:
    """Float images [B, 3, H, W] in [0, 1] -> the same shape, each sample cropped and flipped on its own."""

    def __init__(self, cfg: AugmentConfig):
        unused = [f.name for f in dataclasses.fields(cfg) if f.name not in PIXEL_FIELDS + ("num_classes",)
                  and getattr(cfg, f.name) != f.default]
        if unused:
            raise ValueError(f"pixel recipes augment with augment.{', augment.'.join(PIXEL_FIELDS)} only (mixing: the "
                             f"recipe's cutmix/mixup); unset {', '.join(f'augment.{n}' for n in unused)}")
        self.geometry = GeometrySpec(flip_prob=cfg.flip_prob, crop_prob=cfg.rrc_prob, crop_scale=cfg.rrc_scale,
                                     crop_ratio=cfg.rrc_ratio)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.geometry.is_identity:
            return x
        theta = self.geometry.sample(len(x), generator, aspect=x.shape[-1] / x.shape[-2])
        # bilinear, as torchvision's RandomResizedCrop (bicubic overshoots [0, 1] at edges)
        return warp(x, theta, tuple(x.shape[-2:]), mode="bilinear").clamp_(0, 1)
