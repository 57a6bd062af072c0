"""Masked Token Modeling (SeiT++ MTM): predict masked token ids from the visible ones.

Per batch one mask ratio r ~ truncated normal(mu, std) on [r_min, r_max]; per sample, the
ceil(N r) patches with the lowest uniform noise are masked and the lowest ceil(N r_min) of those
are dropped from the encoder (dropped is a subset of masked). Masked-but-kept patches become a
learned mask token. A narrower, shallower decoder sees the encoder's visible patches and, at
every masked or dropped position, the projected CLS output, plus a learned position embedding.
The head is tied (detached) to the token embedding, with a per-token bias; the loss is
cross-entropy over the tokens of masked patches only.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from models.registry import register_model
from models.token_vit import token_vit


ENCODER_PREFIX = "encoder."  # an MTM model's encoder is exactly a token ViT (without its head)


def token_vit_keys(state_dict: dict) -> dict[str, str]:
    """{state-dict key: token ViT key} of the token-ViT weights in a state dict: an MTM model's
    ``encoder.*`` (prefix removed), else a classifier's own keys unchanged."""
    enc = {k: k[len(ENCODER_PREFIX):] for k in state_dict if k.startswith(ENCODER_PREFIX)}
    return enc or {k: k for k in state_dict}


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [h*w, dim] (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"embed_dim {dim} must be divisible by 4 for a 2-D sin-cos embedding")
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                            torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        angles = pos[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def truncated_normal(mu, std, lo, hi, generator=None) -> float:
    """One draw by inverse CDF (no SciPy, and reproducible from a torch.Generator)."""
    a, b = torch.special.ndtr(torch.tensor([(lo - mu) / std, (hi - mu) / std], dtype=torch.float64))
    u = a + (b - a) * torch.rand((), dtype=torch.float64, generator=generator)
    return float(min(hi, max(lo, mu + std * torch.special.ndtri(u).item())))


class MaskedTokenModel(nn.Module):
    def __init__(self, grid=(8, 8), vocab_size=512, *, stem=1, token_dim=32, embed_dim=128, depth=4, num_heads=4,
                 decoder_dim=96, decoder_depth=2, decoder_heads=4, mask_ratio_min=0.4, mask_ratio_mu=0.45,
                 mask_ratio_std=0.25, mask_ratio_max=1.0, label_smoothing=0.0, token_dropout=0.1):
        super().__init__()
        if not 0.0 <= mask_ratio_min <= mask_ratio_max <= 1.0:
            raise ValueError(f"need 0 <= mask_ratio_min ({mask_ratio_min}) <= mask_ratio_max ({mask_ratio_max}) <= 1")
        self.mask_ratio = (mask_ratio_mu, mask_ratio_std, mask_ratio_min, mask_ratio_max)
        self.label_smoothing = label_smoothing
        # the encoder is exactly the fine-tuning model (minus its head), so weights load strictly
        self.encoder = token_vit(grid, vocab_size, num_classes=0, stem=stem, token_dim=token_dim,
                                 embed_dim=embed_dim, depth=depth, num_heads=num_heads, token_dropout=token_dropout)
        pe = self.encoder.patch_embed
        self.stem, self.grid, self.num_patches, self.vocab_size = stem, pe.img_size, pe.num_patches, vocab_size
        with torch.no_grad():  # fixed sin-cos positions (CLS at position 0 gets zeros)
            self.encoder.pos_embed.zero_()
            self.encoder.pos_embed[0, 1:] = sincos_pos_embed(embed_dim, pe.grid_size)
        self.encoder.pos_embed.requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.num_patches, decoder_dim))
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True,
                                                    norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, stem * stem * token_dim)  # each patch predicts its k*k tokens
        self.token_bias = nn.Parameter(torch.zeros(vocab_size))

    def sample_masks(self, batch: int, device, generator=None):
        """(ratio, masked [B, N] bool, dropped [B, N] bool) with dropped a subset of masked."""
        mu, std, lo, hi = self.mask_ratio
        ratio = truncated_normal(mu, std, lo, hi, generator)
        n_mask = min(self.num_patches, math.ceil(self.num_patches * ratio))
        n_drop = min(n_mask, math.ceil(self.num_patches * lo))
        noise = torch.rand(batch, self.num_patches, generator=generator).to(device)
        rank = noise.argsort(dim=1).argsort(dim=1)  # 0 = lowest noise
        return ratio, rank < n_mask, rank < n_drop

    def forward(self, ids: torch.Tensor, generator=None) -> dict[str, torch.Tensor]:
        b = ids.shape[0]
        ratio, masked, dropped = self.sample_masks(b, ids.device, generator)
        enc = self.encoder
        x = enc.patch_embed(ids)  # [B, N, D]
        x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x) + enc.pos_embed[:, 1:]
        n_keep = self.num_patches - int(dropped[0].sum())
        keep_idx = (~dropped).float().argsort(dim=1, descending=True, stable=True)[:, :n_keep]  # kept, in order
        x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        # with global average pooling timm's final LayerNorm is fc_norm (norm is Identity): apply it
        # per token here, so the fine-tuning model inherits a trained one
        x = enc.fc_norm(enc.norm(enc.blocks(torch.cat([cls, x], dim=1))))

        y = self.decoder_embed(x)
        full = y[:, :1].expand(-1, self.num_patches, -1).clone()  # CLS output at every position...
        full.scatter_(1, keep_idx[..., None].expand(-1, -1, y.shape[-1]), y[:, 1:])  # ...visible ones own
        full = torch.where(masked[..., None], y[:, :1].expand_as(full), full)  # masked-but-kept: CLS too
        h = self.decoder_norm(self.decoder_blocks(full + self.decoder_pos))
        logits = self._token_logits(self.decoder_pred(h))  # [B, H, W, V]

        token_mask = self._patch_to_token_mask(masked)
        loss = F.cross_entropy(logits[token_mask].float(), ids.long()[token_mask],
                               label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits, "masked": masked, "dropped": dropped, "token_mask": token_mask,
                "mask_ratio": torch.tensor(ratio)}

    def _token_logits(self, pred: torch.Tensor) -> torch.Tensor:
        k, (gh, gw) = self.stem, self.encoder.patch_embed.grid_size
        b = pred.shape[0]
        tok = pred.view(b, gh, gw, k, k, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, gh * k, gw * k, -1)
        pe = self.encoder.patch_embed
        # tied to the token vectors the encoder sees (embedding after its LayerNorm: unit scale, so
        # logits start at a useful scale), detached: the head does not train the embedding
        weight = pe.norm(pe.embed.weight).detach()
        return tok @ weight.t() / math.sqrt(weight.shape[1]) + self.token_bias

    def _patch_to_token_mask(self, masked: torch.Tensor) -> torch.Tensor:
        gh, gw = self.encoder.patch_embed.grid_size
        m = masked.view(-1, gh, gw)
        return m.repeat_interleave(self.stem, 1).repeat_interleave(self.stem, 2)


@register_model
def mtm_tiny(grid=(8, 8), vocab_size=512, **kw):
    """CIFAR scale: the token_vit_tiny encoder, a 96-wide 2-block decoder."""
    return MaskedTokenModel(grid, vocab_size, **{"stem": 1, "embed_dim": 128, "depth": 4, "num_heads": 4,
                                                 "decoder_dim": 96, "decoder_depth": 2, "decoder_heads": 4, **kw})


@register_model
def mtm_base(grid=(28, 28), vocab_size=391, **kw):
    """SeiT++ ImageNet: ViT-B encoder, 2x2 stem, 512-wide 4-block decoder. Masking and smoothing are
    what the released pre-training script runs (r_min 0.4, mu 0.45, std 0.25, r_max 1.0, no label
    smoothing); the paper's own values were not found (method digest, section 10)."""
    return MaskedTokenModel(grid, vocab_size, **{
        "stem": 2, "embed_dim": 768, "depth": 12, "num_heads": 12, "decoder_dim": 512, "decoder_depth": 4,
        "decoder_heads": 16, "mask_ratio_min": 0.4, "mask_ratio_mu": 0.45, "mask_ratio_std": 0.25,
        "mask_ratio_max": 1.0, "label_smoothing": 0.0, **kw})
