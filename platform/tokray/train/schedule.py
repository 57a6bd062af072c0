"""The learning-rate schedule every trainer here uses (linear warmup, then half a cosine to a floor),
and how many optimizer steps a run takes."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def lr_at(step: int, total: int, cfg) -> float:
    return warmup_cosine(step, total, cfg.lr, cfg.min_lr, cfg.warmup_steps)


def total_steps(cfg, num_samples: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps in the run) of a TrainConfig over ``num_samples`` samples."""
    per_epoch = max(1, num_samples // cfg.batch_size)
    total = int(cfg.epochs * per_epoch) if cfg.epochs > 0 else cfg.max_steps
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total
