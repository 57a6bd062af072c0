"""A ViT over token ids, built on timm's VisionTransformer through its ``embed_layer`` seam.

ids [B, h, w] -> learned token embedding (vocab x d_tok, LayerNorm, dropout) -> conv stem
(k x k, stride k) -> (h/k)(w/k) patches -> timm transformer blocks -> global average pooling.
Grid and vocabulary are arguments (a dataset manifest supplies them), never literals.
"""

from __future__ import annotations

import functools
import warnings
from functools import partial

import timm.models
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from models.registry import register_model

# timm's register_model appends each name it registers here
__all__ = ["TokenEmbed", "token_vit", "describe_weights", "register_timm"]


def register_timm(fn):
    """Also register ``fn`` in timm's own registry, so ``timm.create_model(name, grid=..., vocab_size=...,
    num_classes=...)`` builds it (after ``import models.token_vit``). timm passes ``pretrained`` and its
    pretrained-config arguments to every entrypoint: there are no hub weights for these models (an exported
    model's ``model.safetensors`` loads with ``load_state_dict``). A name timm already has is refused, never
    overwritten (timm itself would overwrite it with a warning)."""
    name = fn.__name__
    if timm.models.is_model(name) and timm.models.model_entrypoint(name).__module__ != fn.__module__:
        raise RuntimeError(f"timm already has a model named {name!r} "
                           f"({timm.models.model_entrypoint(name).__module__}); rename ours")

    @functools.wraps(fn)
    def entrypoint(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kw):
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights in timm; build it with pretrained=False and load an "
                             f"exported model's model.safetensors (python jobs/export.py)")
        return fn(**kw)

    with warnings.catch_warnings():  # a re-import of this module replaces its own entries
        warnings.simplefilter("ignore", UserWarning)
        timm.models.register_model(entrypoint)
    return fn


class TokenEmbed(nn.Module):
    """timm ``embed_layer``: takes the keyword arguments timm passes to a patch embedding."""

    def __init__(self, img_size=8, patch_size=1, in_chans=32, embed_dim=128, bias=True, dynamic_img_pad=False,
                 *, vocab_size: int, token_dropout: float = 0.1, device=None, dtype=None, **_unused):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"token grid {h}x{w} is not divisible by the stem's patch size {patch_size}")
        self.img_size, self.patch_size = (h, w), (patch_size, patch_size)
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, in_chans, device=device, dtype=dtype)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.norm = nn.LayerNorm(in_chans, eps=1e-6, device=device, dtype=dtype)
        self.drop = nn.Dropout(token_dropout)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias, device=device, dtype=dtype)

    def feat_ratio(self, as_scalar=True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] (any integer dtype), or code distributions [B, V, h, w] (float; what Mixup
        mixes), -> token embeddings [B, h, w, d_tok]."""
        if tuple(ids.shape[-2:]) != self.img_size:
            raise ValueError(f"token grid {tuple(ids.shape[-2:])} does not match the model's grid {self.img_size}")
        if ids.is_floating_point():
            x = torch.einsum("bvhw,vd->bhwd", ids, self.embed.weight)
        else:
            x = self.embed(ids.long())
        return self.drop(self.norm(x))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids).permute(0, 3, 1, 2)
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


def token_vit(grid: tuple[int, int], vocab_size: int, num_classes: int = 0, *, stem: int = 1, token_dim: int = 32,
              embed_dim: int = 128, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
              drop_path_rate: float = 0.0, token_dropout: float = 0.1) -> VisionTransformer:
    return VisionTransformer(
        img_size=tuple(grid), patch_size=stem, in_chans=token_dim, num_classes=num_classes, embed_dim=embed_dim,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, global_pool="avg",
        class_token=True, fc_norm=True, drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        embed_layer=partial(TokenEmbed, vocab_size=vocab_size, token_dropout=token_dropout))


def describe_weights(state_dict: dict) -> str:
    """'width 128, depth 4, 512 codes' from a token-ViT state dict (what decides whether it loads)."""
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    width = state_dict["pos_embed"].shape[-1] if "pos_embed" in state_dict else "?"
    codes = state_dict["patch_embed.embed.weight"].shape[0] if "patch_embed.embed.weight" in state_dict else "?"
    return f"width {width}, depth {depth}, {codes} codes"


@register_timm
@register_model
def token_vit_tiny(grid=(8, 8), vocab_size=512, **kw):
    """CIFAR scale: width 128, depth 4, 1x1 stem (64 patches on an 8x8 grid)."""
    return token_vit(grid, vocab_size, **{"stem": 1, "embed_dim": 128, "depth": 4, "num_heads": 4, **kw})


@register_timm
@register_model
def token_vit_small(grid=(28, 28), vocab_size=391, **kw):
    """ViT-S/16 equivalent on SeiT's 28x28 token crops: 2x2 stem, 196 patches."""
    return token_vit(grid, vocab_size, **{"stem": 2, "embed_dim": 384, "depth": 12, "num_heads": 6, **kw})


@register_timm
@register_model
def token_vit_base(grid=(28, 28), vocab_size=391, **kw):
    """ViT-B/16 equivalent on SeiT's 28x28 token crops: 2x2 stem, 196 patches."""
    return token_vit(grid, vocab_size, **{"stem": 2, "embed_dim": 768, "depth": 12, "num_heads": 12, **kw})
