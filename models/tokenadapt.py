"""TokenAdapt (SeiT++ section 5): f maps token embeddings into a space where pixel-style geometric
augmentations apply, g maps back to token logits.

    ids -> codebook embeddings [B, C, h, w] -f-> features [B, C, u*h, u*w]
        -> A (flip / affine / crop, in normalized coordinates; done outside the model)
        -g-> logits [B, V, H/u, W/u] -> argmax -> ids of the augmented view

f: LayerNorm(C) (ours), Linear(C -> dim), fixed 2-D sin-cos positions, ``depth`` pre-LN transformer blocks (qkv without
bias, Tanh MLP), LayerNorm, ConvTranspose2d(dim -> C, u, stride u): a C-channel map at u times the
grid. g: Conv2d(C -> dim, u, stride u), sin-cos positions, ``depth`` blocks, LayerNorm,
Linear(dim -> V): one V-way classifier per output token, trained with cross-entropy against the
tokens of the augmented image (``tokray.fit.tokenadapt``). The ImageNet variant has the widths of
the released SeiT++ code (f 1.84 M + g 1.97 M parameters); the CIFAR variant is a narrow one.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from models.mtm import sincos_pos_embed
from models.registry import register_model


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    return nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=False, act_layer=nn.Tanh,
                                 norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth)])


class _Positions(nn.Module):
    """Fixed sin-cos positions: a buffer for the built grid, computed on the fly for any other."""

    def __init__(self, dim: int, grid: tuple[int, int]):
        super().__init__()
        self.dim, self.grid = dim, tuple(grid)
        self.register_buffer("table", sincos_pos_embed(dim, self.grid), persistent=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        table = self.table if tuple(hw) == self.grid else sincos_pos_embed(self.dim, tuple(hw)).to(self.table.device)
        return x + table.to(x.dtype)


class TokenToFeature(nn.Module):
    """f: embeddings [B, C, h, w] -> features [B, C, u*h, u*w]."""

    def __init__(self, token_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, upsample: int,
                 grid: tuple[int, int]):
        super().__init__()
        self.in_norm = nn.LayerNorm(token_dim, eps=1e-6)  # ours: f does not depend on the codebook's scale
        self.proj = nn.Linear(token_dim, dim)
        self.pos = _Positions(dim, grid)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.up = nn.ConvTranspose2d(dim, token_dim, upsample, stride=upsample)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        b, _, h, w = emb.shape
        x = self.pos(self.proj(self.in_norm(emb.flatten(2).transpose(1, 2))), (h, w))
        x = self.norm(self.blocks(x))
        return self.up(x.transpose(1, 2).reshape(b, -1, h, w))


class FeatureToToken(nn.Module):
    """g: features [B, C, H, W] -> token logits [B, V, H/u, W/u]."""

    def __init__(self, token_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, downsample: int,
                 vocab_size: int, grid: tuple[int, int]):
        super().__init__()
        self.proj = nn.Conv2d(token_dim, dim, downsample, stride=downsample)
        self.pos = _Positions(dim, grid)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.proj(feat)
        b, _, h, w = x.shape
        x = self.norm(self.blocks(self.pos(x.flatten(2).transpose(1, 2), (h, w))))
        return self.head(x).transpose(1, 2).reshape(b, -1, h, w)


class TokenAdapt(nn.Module):
    def __init__(self, vocab_size: int = 512, token_dim: int = 32, grid: tuple[int, int] = (8, 8),
                 out_grid: tuple[int, int] = (8, 8), *, upsample: int = 2, dim: int = 96, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0, g_dim: int = 0, g_depth: int = 0, g_heads: int = 0):
        super().__init__()
        if upsample < 1:
            raise ValueError(f"upsample must be >= 1, got {upsample}")
        self.vocab_size, self.token_dim, self.upsample = vocab_size, token_dim, upsample
        self.grid, self.out_grid = tuple(grid), tuple(out_grid)
        self.f = TokenToFeature(token_dim, dim, depth, num_heads, mlp_ratio, upsample, self.grid)
        self.g = FeatureToToken(token_dim, g_dim or dim, g_depth or depth, g_heads or num_heads, mlp_ratio, upsample,
                                vocab_size, self.out_grid)
        self.apply(self._init_weights)
        for proj in (self.f.proj, self.g.proj):  # input projections as a ViT patch embedding (MAE): xavier
            nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def feature_size(self, out_grid: tuple[int, int]) -> tuple[int, int]:
        """Size of the f-space view that g turns into an ``out_grid`` of tokens."""
        return out_grid[0] * self.upsample, out_grid[1] * self.upsample

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Identity view: embeddings [B, C, h, w] -> logits [B, V, h, w]."""
        return self.g(self.f(emb))


@register_model
def tokenadapt_cifar(**kw) -> TokenAdapt:
    """8x8 grids, 512 codes of 32-d: width 96, 2 blocks each for f and g (~0.5 M parameters)."""
    return TokenAdapt(**{"vocab_size": 512, "token_dim": 32, "grid": (8, 8), "out_grid": (8, 8), "upsample": 2,
                         "dim": 96, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, **kw})


@register_model
def tokenadapt_imagenet(**kw) -> TokenAdapt:
    """SeiT++'s released widths: 32x32 grid of 391 codes (32-d) -> 64x64 f-space -> 56x56 crop -> 28x28
    logits; width 384, 6 heads, MLP 1536, one block each for f and g."""
    return TokenAdapt(**{"vocab_size": 391, "token_dim": 32, "grid": (32, 32), "out_grid": (28, 28), "upsample": 2,
                         "dim": 384, "depth": 1, "num_heads": 6, "mlp_ratio": 4.0, **kw})
