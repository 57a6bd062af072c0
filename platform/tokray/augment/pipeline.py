"""The token augmentation pipeline of a training step (SeiT / SeiT++), batched on the device.

    ids [B, h, w]
      -> Token-EDA on ids                      one choice per sample: replace | swap | identity
      -> codebook embeddings [B, C, h, w]
      -> colour, one choice per iteration:     Emb-Noise | ColorAdapt | nothing (on a fraction)
      -> split: first B - B//2 samples "base", last B//2 "TokenAdapt" (when ``tokenadapt``)
           base:       RRC + flip on the embedding map (bicubic) -> cosine requantization -> CutMix
           TokenAdapt: f -> flip / affine / RRC in f-space -> Mixup|CutMix in f-space -> g -> argmax
      -> ids [B, h', w'] (+ soft targets when labels are given and mixing is on)

Everything ends as ids, as in SeiT++ (the model embeds them itself). Sample order is kept: output
row i comes from input row i (and its mixing partner inside its half, the mirrored index).
Its settings are ``tokray.config.AugmentConfig``; defaults are all off: ``TokenAugment(AugmentConfig(),
codebook, None)`` returns the ids unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from tokray.augment import ops
from tokray.augment.geometry import GeometrySpec, center_crop_ids, warp
from tokray.augment.tokenadapt import check_compatible, load_tokenadapt, tokenadapt_logits
from tokray.config import AugmentConfig

__all__ = ["TokenAugment", "build_token_augment", "center_crop_ids"]


def base_geometry(cfg: AugmentConfig) -> GeometrySpec:
    """The view of the base path: RRC + naive flip."""
    return GeometrySpec(flip_prob=cfg.flip_prob, crop_prob=cfg.rrc_prob, crop_scale=tuple(cfg.rrc_scale),
                        crop_ratio=tuple(cfg.rrc_ratio))


def tokenadapt_geometry(cfg: AugmentConfig) -> GeometrySpec:
    """The view of the TokenAdapt path: flip, the affine group and the same crop, in f-space."""
    return GeometrySpec(flip_prob=cfg.tokenadapt_flip_prob, affine_prob=cfg.tokenadapt_affine_prob,
                        crop_prob=cfg.rrc_prob, crop_scale=tuple(cfg.rrc_scale), crop_ratio=tuple(cfg.rrc_ratio))


class TokenAugment(nn.Module):
    """``aug(ids [B, h, w], labels [B] | None, generator) -> (ids [B, h', w'], targets)``.

    targets: soft targets [B, num_classes] (smoothing and mixing applied) when labels are given and
    mixing is on; else ``labels`` unchanged. Move it to the training device with ``.to(device)``;
    draws come from ``generator`` (on any device), so the same generator state gives the same output.
    """

    def __init__(self, cfg: AugmentConfig, codebook: torch.Tensor, tokenadapt: nn.Module | None = None):
        super().__init__()
        if cfg.tokenadapt and tokenadapt is None:
            raise ValueError("augment.tokenadapt is on but no TokenAdapt model was given; build the pipeline with "
                             "build_token_augment(cfg, codebook, tokenizer_fingerprint), which loads it")
        self.cfg = cfg
        self.register_buffer("codebook", codebook.detach().float().clone())
        need_synonyms = cfg.eda_replace_prob > 0
        self.register_buffer("synonyms", ops.synonym_table(codebook, cfg.eda_synonyms) if need_synonyms
                             else torch.zeros(0, cfg.eda_synonyms, dtype=torch.long))
        self.tokenadapt = None
        if cfg.tokenadapt:
            check_compatible(tokenadapt, codebook)
            self.tokenadapt = tokenadapt.eval().requires_grad_(False)
        self.base_geometry = base_geometry(cfg)
        self.tokenadapt_geometry = tokenadapt_geometry(cfg)

    def train(self, mode: bool = True):  # TokenAdapt stays frozen in eval mode
        super().train(mode)
        if self.tokenadapt is not None:
            self.tokenadapt.eval()
        return self

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        cfg, dev = self.cfg, ids.device
        if generator is None:
            raise ValueError("TokenAugment needs an explicit torch.Generator (seeded from seed, epoch, rank)")
        b, h, w = ids.shape
        out_hw = (cfg.out_size, cfg.out_size) if cfg.out_size else (h, w)
        if out_hw[0] > h or out_hw[1] > w:
            raise ValueError(f"augment.out_size {cfg.out_size} is larger than the {h}x{w} token grid")
        # per-iteration decisions, drawn once (one host sync): colour, mixing kind, Beta seeds
        u = torch.rand(4, generator=generator, device=generator.device, dtype=torch.float64).tolist()
        ids = ids.long()

        if cfg.eda_replace_prob > 0 or cfg.eda_swap_prob > 0:
            r = ops.rand(b, generator, dev)
            replace = r < cfg.eda_replace_prob
            swap = (r >= cfg.eda_replace_prob) & (r < cfg.eda_replace_prob + cfg.eda_swap_prob)
            if cfg.eda_replace_prob > 0:
                ids = ops.eda_replace(ids, self.synonyms, replace, cfg.eda_replace_token_prob, generator)
            if cfg.eda_swap_prob > 0:
                ids = ops.eda_swap(ids, swap, cfg.eda_swap_scale, generator)

        emb = ops.embed(ids, self.codebook)
        coloured = False
        if u[0] < cfg.noise_prob:
            emb = ops.emb_noise(emb, cfg.noise_fraction, cfg.noise_offset_std, cfg.noise_std, generator)
            coloured = True
        elif u[0] < cfg.noise_prob + cfg.coloradapt_prob:
            emb = ops.color_adapt(emb, cfg.coloradapt_fraction, generator)
            coloured = True

        n_ta = b // 2 if self.tokenadapt is not None else 0
        n_base = b - n_ta
        mix = cfg.mixing and labels is not None
        parts, targets = [], []
        seeds = [int(v * 2**62) for v in u[2:4]]

        # base path: geometry on the embedding map, requantize, CutMix on ids
        theta = self.base_geometry.sample(n_base, generator, aspect=w / h)
        if self.base_geometry.is_identity and out_hw == (h, w):
            base = ops.requantize(emb[:n_base], self.codebook) if coloured else ids[:n_base]
        else:  # (no crop but out_size < grid: the whole grid resized, bicubic)
            base = ops.requantize(warp(emb[:n_base], theta, out_hw), self.codebook)
        if mix:
            lam = 1.0
            if cfg.cutmix_alpha > 0:
                lam = float(np.random.default_rng(seeds[0]).beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
                box = ops.cutmix_box(out_hw[0], out_hw[1], lam, generator)
                base, lam = ops.cutmix(base, box), box[4]
            targets.append(ops.soft_targets(labels[:n_base], cfg.num_classes, cfg.label_smoothing, lam))
        parts.append(base)

        # TokenAdapt path: f, the view in f-space, Mixup/CutMix in f-space, g, argmax
        if n_ta:
            theta = self.tokenadapt_geometry.sample(n_ta, generator, aspect=w / h)
            lam, mix_fn = 1.0, None
            if mix:
                use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or u[1] < cfg.mix_switch_prob)
                alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
                lam = float(np.random.default_rng(seeds[1]).beta(alpha, alpha))
                if use_cutmix:
                    fh, fw = self.tokenadapt.feature_size(out_hw)
                    box = ops.cutmix_box(fh, fw, lam, generator)
                    lam = box[4]
                    mix_fn = lambda x: ops.cutmix(x, box)  # noqa: E731
                else:
                    mix_fn = lambda x: ops.mixup(x, lam)  # noqa: E731
                targets.append(ops.soft_targets(labels[n_base:], cfg.num_classes, cfg.label_smoothing, lam))
            logits = tokenadapt_logits(self.tokenadapt, emb[n_base:], theta, out_hw, mix=mix_fn)
            parts.append(logits.argmax(1))

        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out, (torch.cat(targets) if mix else labels)


def build_token_augment(cfg: AugmentConfig, codebook: torch.Tensor, tokenizer_fingerprint: str | None = None
                        ) -> TokenAugment:
    """The pipeline of ``cfg``, loading TokenAdapt (``cfg.tokenadapt_path``, "" = shipped) when it is on;
    weights trained for another tokenizer than ``tokenizer_fingerprint`` are refused."""
    tokenadapt = None
    if cfg.tokenadapt:
        tokenadapt, _ = load_tokenadapt(cfg.tokenadapt_path, tokenizer_fingerprint)
    return TokenAugment(cfg, codebook, tokenadapt)
