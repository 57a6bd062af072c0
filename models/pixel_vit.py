"""A pixel ViT for storage-matched baselines: the token ViT's transformer, fed image patches.

Same width, depth, heads, global average pooling and fc_norm as ``token_vit``, and the same
sequence length: the patch grid equals the token grid the pixel model is compared with (an 8x8
token grid -> 64 patches: 32 px images use 4 px patches, 16 px use 2, 8 px use 1). The model
takes uint8 [B, 3, H, W] straight from the data stream (or floats in [0, 1]) and normalizes
itself, on whatever device it runs on, through timm's ``embed_layer`` seam.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from models.registry import register_model
from models.token_vit import register_timm

__all__ = ["PixelEmbed", "pixel_vit", "patch_size_for"]


class PixelEmbed(PatchEmbed):
    """timm's PatchEmbed with input normalization: uint8 (0..255) or float (0..1) -> (x - mean) / std."""

    def __init__(self, *args, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"pixel_vit takes images [B, {self.mean.shape[1]}, H, W] (channels first, uint8 or "
                             f"float in [0, 1]), got shape {tuple(x.shape)}; permute [B, H, W, C] arrays first")
        x = x.float() / 255.0 if not x.is_floating_point() else x.float()
        x = ((x - self.mean) / self.std).to(self.proj.weight.dtype)
        return super().forward(x)


def patch_size_for(img_size: int, grid: int = 8) -> int:
    """The patch size that gives a ``grid`` x ``grid`` patch sequence (the token model's length)."""
    if img_size % grid:
        raise ValueError(f"img_size {img_size} is not divisible by the token grid {grid}: a pixel ViT matching a "
                         f"{grid}x{grid} token sequence needs img_size a multiple of {grid} (e.g. {grid * 4}, "
                         f"{grid * 2}, {grid})")
    return img_size // grid


def pixel_vit(img_size: int, num_classes: int = 0, *, patch_size: int | None = None, grid: int = 8,
              embed_dim: int = 128, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
              drop_path_rate: float = 0.0, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> VisionTransformer:
    """``patch_size`` defaults to ``img_size // grid`` (``grid``: the token grid side to match)."""
    if patch_size is None:
        patch_size = patch_size_for(img_size, grid)
    elif img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=3, num_classes=num_classes, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, global_pool="avg",
        class_token=True, fc_norm=True, drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), embed_layer=partial(PixelEmbed, mean=mean, std=std))


@register_timm
@register_model
def pixel_vit_tiny(img_size=32, **kw):
    """Matches token_vit_tiny: width 128, depth 4, 64 patches (32 px -> 4 px patches, 16 -> 2, 8 -> 1)."""
    return pixel_vit(img_size, **{"embed_dim": 128, "depth": 4, "num_heads": 4, **kw})
