"""The learning-rate schedule every trainer here uses: linear warmup, then half a cosine to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))
