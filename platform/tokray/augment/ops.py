"""Batched token-domain operations on the device: lookup and cosine requantization, Emb-Noise,
ColorAdapt, Token-EDA (synonym replacement, patch swap), CutMix/Mixup with soft targets.

Every random draw takes an explicit ``torch.Generator``; the same generator state gives the same
output. A "fraction" of a batch is drawn per sample (Bernoulli), so a batch of one and a fraction
of 0 need no special case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rand(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device, then moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def randn(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def randint(high: int, shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randint(high, shape, generator=generator, device=generator.device).to(device)


def choose(n: int, fraction: float, generator: torch.Generator, device) -> torch.Tensor:
    """Bool [n]: each sample chosen with probability ``fraction``."""
    return rand(n, generator, device) < fraction


def embed(ids: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """ids [B, h, w] -> embeddings [B, C, h, w]."""
    return F.embedding(ids.long(), codebook).permute(0, 3, 1, 2).contiguous()


def requantize(emb: torch.Tensor, codebook: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Embeddings [B, C, h, w] -> ids [B, h, w] of the nearest code by cosine similarity (the
    tokenizer's own rule, SeiT++'s ``convert_to_codes``)."""
    b, c, h, w = emb.shape
    flat = F.normalize(emb.permute(0, 2, 3, 1).reshape(-1, c).float(), dim=1)
    codes = F.normalize(codebook.float(), dim=1).t()
    ids = torch.cat([(flat[s:s + chunk] @ codes).argmax(1) for s in range(0, flat.shape[0], chunk)]) \
        if flat.shape[0] else flat.new_zeros(0, dtype=torch.long)
    return ids.view(b, h, w)


def emb_noise(emb: torch.Tensor, fraction: float, offset_std: float, std: float,
              generator: torch.Generator) -> torch.Tensor:
    """SeiT's Emb-Noise: on a ``fraction`` of the samples, add one per-channel offset
    (N(0, offset_std^2), shared over positions) and i.i.d. per-position noise (N(0, std^2))."""
    b, c, h, w = emb.shape
    pick = choose(b, fraction, generator, emb.device).view(b, 1, 1, 1).to(emb.dtype)
    noise = offset_std * randn((b, c, 1, 1), generator, emb.device) + std * randn((b, c, h, w), generator, emb.device)
    return emb + pick * noise.to(emb.dtype)


def channel_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over positions ([B, C, 1, 1] each; population std,
    so a 1x1 map works; ``eps`` keeps a constant channel finite)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    return mean, (var + eps).sqrt()


def color_adapt(emb: torch.Tensor, fraction: float, generator: torch.Generator, eps: float = 1e-5) -> torch.Tensor:
    """ColorAdapt (SeiT++ section 6): on a ``fraction`` of the samples, per-channel AdaIN toward the
    statistics of the partner sample at the mirrored batch index (i <-> B-1-i):
    ``sigma_p * (x - mu_x) / sigma_x + mu_p``. Numerically safe: a constant channel becomes the
    partner's mean, never NaN. Other samples are returned unchanged."""
    b = emb.shape[0]
    pick = choose(b, fraction, generator, emb.device).view(b, 1, 1, 1)
    if emb.numel() == 0:
        return emb
    x = emb.float()
    mean, std = channel_stats(x, eps)
    out = (x - mean) / std * std.flip(0) + mean.flip(0)
    return torch.where(pick, out.to(emb.dtype), emb)


@torch.no_grad()
def synonym_table(codebook: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """[V, k] ids: for each code, the k other codes most similar to it by cosine similarity (most
    similar first; the code itself excluded). SeiT's construction is not published; this is ours."""
    v = codebook.shape[0]
    if not 1 <= k < v:
        raise ValueError(f"eda_synonyms must be in 1 .. {v - 1} (codebook of {v} codes), got {k}")
    cb = F.normalize(codebook.float(), dim=1)
    rows = []
    for s in range(0, v, chunk):
        sim = cb[s:s + chunk] @ cb.t()
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")
        rows.append(sim.topk(k, dim=1).indices)
    return torch.cat(rows)


def eda_replace(ids: torch.Tensor, synonyms: torch.Tensor, sample_mask: torch.Tensor, token_prob: float,
                generator: torch.Generator) -> torch.Tensor:
    """Token-EDA synonym replacement: in the samples of ``sample_mask``, each token with probability
    ``token_prob`` becomes a uniform choice among its synonyms."""
    b, h, w = ids.shape
    ids = ids.long()
    hit = (rand((b, h, w), generator, ids.device) < token_prob) & sample_mask.view(b, 1, 1)
    which = randint(synonyms.shape[1], (b, h, w), generator, ids.device)
    return torch.where(hit, synonyms[ids, which], ids)


def eda_swap(ids: torch.Tensor, sample_mask: torch.Tensor, scale: float, generator: torch.Generator,
             tries: int = 16) -> torch.Tensor:
    """Token-EDA patch swap: in the samples of ``sample_mask``, two non-overlapping ps x ps squares
    of tokens trade places, ps = int(min(h, w) * U(0, scale)) (0 = no-op). Corners are drawn
    uniformly; of ``tries`` candidate pairs the first that does not overlap is used (none: no-op)."""
    b, h, w = ids.shape
    dev = ids.device
    ps = (min(h, w) * scale * rand(b, generator, dev)).long().clamp(max=min(h, w) // 2)
    ps = torch.where(sample_mask, ps, 0)
    u = rand((b, tries, 4), generator, dev)
    ya, yb = (u[..., 0] * (h - ps + 1)[:, None]).long(), (u[..., 1] * (h - ps + 1)[:, None]).long()
    xa, xb = (u[..., 2] * (w - ps + 1)[:, None]).long(), (u[..., 3] * (w - ps + 1)[:, None]).long()
    ok = torch.maximum((ya - yb).abs(), (xa - xb).abs()) >= ps[:, None]
    first = ok.float().argmax(1, keepdim=True)
    ps = torch.where(ok.any(1), ps, 0).view(b, 1, 1)
    ya, yb, xa, xb = (t.gather(1, first).view(b, 1, 1) for t in (ya, yb, xa, xb))
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    in_a = (yy >= ya) & (yy < ya + ps) & (xx >= xa) & (xx < xa + ps)
    in_b = (yy >= yb) & (yy < yb + ps) & (xx >= xb) & (xx < xb + ps)
    src_y = torch.where(in_a, yy - ya + yb, torch.where(in_b, yy - yb + ya, yy)).expand(b, h, w)
    src_x = torch.where(in_a, xx - xa + xb, torch.where(in_b, xx - xb + xa, xx)).expand(b, h, w)
    return ids.long().flatten(1).gather(1, (src_y * w + src_x).flatten(1)).view(b, h, w)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float, lam: float) -> torch.Tensor:
    """timm-style mixed, smoothed targets: lam * y + (1 - lam) * y[mirrored], y one-hot smoothed."""
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    y.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)
    return lam * y + (1.0 - lam) * y.flip(0)


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int, float]:
    """A box covering about (1 - lam) of an h x w map, clipped at the border (timm's rule):
    (top, bottom, left, right, lam corrected to the box actually pasted)."""
    r = (1.0 - lam) ** 0.5
    ch, cw = int(h * r), int(w * r)
    cy, cx = (int(v) for v in torch.randint(0, 1 << 30, (2,), generator=generator, device=generator.device).tolist())
    cy, cx = cy % h, cx % w
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return top, bottom, left, right, 1.0 - (bottom - top) * (right - left) / float(h * w)


def cutmix(x: torch.Tensor, box: tuple[int, int, int, int, float]) -> torch.Tensor:
    """Paste the box of the mirrored sample into every sample (any [B, ..., H, W] tensor)."""
    top, bottom, left, right, _ = box
    out = x.clone()
    out[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
    return out


def mixup(x: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * x + (1.0 - lam) * x.flip(0)
