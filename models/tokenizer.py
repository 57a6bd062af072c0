"""Convolutional VQ tokenizer: encoder -> cosine vector quantizer -> decoder.

Pixels [-1, 1] -> an (H/f)x(W/f) grid of codebook ids. The quantizer compares l2-normalised
encodings with l2-normalised codes (cosine lookup, as ViT-VQGAN/SeiT); codes follow their
assigned encodings by EMA and unused codes are restarted on live encodings, so the codebook
does not collapse. After training, ``prune_to_used`` keeps only the codes the data uses.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


def _encoder(in_ch: int, widths: tuple[int, ...], blocks: int, embed_dim: int) -> nn.Sequential:
    # every conv is strided: on a CPU, full-resolution layers would cost more than the rest together
    layers: list[nn.Module] = []
    for cin, cout in zip((in_ch, *widths[:-1]), widths):
        layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.SiLU()]
    layers += [ResBlock(widths[-1]) for _ in range(blocks)]
    layers += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], embed_dim, 1)]
    return nn.Sequential(*layers)


def _decoder(out_ch: int, widths: tuple[int, ...], blocks: int, embed_dim: int) -> nn.Sequential:
    rev = widths[::-1]
    layers: list[nn.Module] = [nn.Conv2d(embed_dim, rev[0], 3, padding=1)]
    layers += [ResBlock(rev[0]) for _ in range(blocks)]
    layers += [nn.GroupNorm(8, rev[0]), nn.SiLU()]
    for cin, cout in zip(rev, (*rev[1:], rev[-1] // 2)):
        layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.SiLU()]
    layers += [nn.Conv2d(rev[-1] // 2, out_ch, 3, padding=1)]
    return nn.Sequential(*layers)


class CosineQuantizer(nn.Module):
    """Nearest code by cosine similarity; EMA code updates; dead-code restarts."""

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, dead_after: float = 0.03):
        super().__init__()
        self.decay = decay
        self.dead_after = dead_after  # a code whose EMA usage falls below this share of average is dead
        self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, dim), dim=1))
        self.register_buffer("ema_count", torch.ones(codebook_size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, H, W] -> ids [B, H, W] (nearest normalised code)."""
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)
        ids = (zf @ self.codebook.t()).argmax(dim=1)
        return ids.view(z.shape[0], z.shape[2], z.shape[3])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, H, W] -> codes [B, D, H, W]."""
        return F.embedding(ids.long(), self.codebook).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor):
        zn = F.normalize(z, dim=1)
        if self.training and not bool(self.initialized):
            self._init_from(zn)
        ids = self.lookup(zn)
        q = self.embed(ids)
        commit = F.mse_loss(zn, q.detach())
        if self.training:
            self._ema_update(zn, ids)
        q = zn + (q - zn).detach()  # straight-through
        return q, ids, commit

    @torch.no_grad()
    def _init_from(self, zn):
        flat = zn.permute(0, 2, 3, 1).reshape(-1, zn.shape[1])
        pick = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        self.codebook.copy_(flat[pick])
        self.ema_sum.copy_(self.codebook)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, zn, ids):
        flat = zn.permute(0, 2, 3, 1).reshape(-1, zn.shape[1]).float()
        onehot_count = torch.bincount(ids.reshape(-1), minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids.reshape(-1), flat)
        self.ema_count.mul_(self.decay).add_(onehot_count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.codebook.copy_(F.normalize(self.ema_sum, dim=1))
        dead = self.ema_count < self.dead_after * self.ema_count.mean()
        n = int(dead.sum())
        if n:  # restart dead codes on random live encodings of this batch
            pick = flat[torch.randint(0, flat.shape[0], (n,), device=flat.device)]
            self.codebook[dead] = pick
            self.ema_sum[dead] = pick
            self.ema_count[dead] = self.ema_count.mean()

    @torch.no_grad()
    def prune(self, keep: torch.Tensor) -> None:
        """Keep only the codes at indices ``keep`` (in that order)."""
        for name in ("codebook", "ema_count", "ema_sum"):
            setattr(self, name, getattr(self, name)[keep].clone())


class VQTokenizer(nn.Module):
    def __init__(self, image_size: int = 32, widths: tuple[int, ...] = (64, 128), enc_blocks: int = 1,
                 dec_blocks: int = 2, embed_dim: int = 32, codebook_size: int = 512, in_chans: int = 3,
                 commit_weight: float = 0.25):
        super().__init__()
        downsample = 2 ** len(widths)  # one stride-2 stage per width
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not divisible by downsample {downsample}")
        self.image_size, self.downsample, self.commit_weight = image_size, downsample, commit_weight
        self.grid = (image_size // downsample, image_size // downsample)
        self.encoder = _encoder(in_chans, tuple(widths), enc_blocks, embed_dim)
        self.quantizer = CosineQuantizer(codebook_size, embed_dim)
        self.decoder = _decoder(in_chans, tuple(widths), dec_blocks, embed_dim)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> reconstruction, ids and losses."""
        q, ids, commit = self.quantizer(self.encoder(x))
        recon = self.decoder(q)
        rec_loss = F.mse_loss(recon, x)
        return {"recon": recon, "ids": ids, "rec_loss": rec_loss, "commit": commit,
                "loss": rec_loss + self.commit_weight * commit}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [-1, 1] -> ids [B, h, w]."""
        return self.quantizer.lookup(self.encoder(x))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> pixels [-1, 1]."""
        return self.decoder(self.quantizer.embed(ids)).clamp(-1, 1)

    @torch.no_grad()
    def prune_to_used(self, counts: torch.Tensor) -> torch.Tensor:
        """Drop codes with zero count; return the old->new id map (-1 for dropped codes)."""
        keep = torch.nonzero(counts > 0).flatten()
        remap = torch.full((self.codebook_size,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        self.quantizer.prune(keep)
        return remap


from models.registry import register_model  # noqa: E402


@register_model
def vq_cifar_8x8(**kw) -> VQTokenizer:
    """32x32 images -> 8x8 ids, 512 codes (~1.2M parameters)."""
    return VQTokenizer(**{"image_size": 32, "widths": (64, 128), "enc_blocks": 1, "dec_blocks": 2,
                          "embed_dim": 32, "codebook_size": 512, **kw})


@register_model
def vq_imagenet_32x32(**kw) -> VQTokenizer:
    """256x256 images -> 32x32 ids, 8192 codes (SeiT's grid; prune to the codes used)."""
    return VQTokenizer(**{"image_size": 256, "widths": (128, 192, 256), "enc_blocks": 2, "dec_blocks": 3,
                          "embed_dim": 32, "codebook_size": 8192, **kw})
