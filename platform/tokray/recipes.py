"""Named recipes: functions returning a complete config. The CLI only picks one and overrides a few fields."""

from __future__ import annotations

import dataclasses
from typing import Callable

from tokray.config import PretrainConfig

_RECIPES: dict[str, Callable[[], PretrainConfig]] = {}


def recipe(fn):
    _RECIPES[fn.__name__] = fn
    return fn


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str, **overrides) -> PretrainConfig:
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())}")
    cfg = _RECIPES[name]()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)} for recipe {name!r}")
    return dataclasses.replace(cfg, **overrides)


@recipe
def cifar_mtm() -> PretrainConfig:
    """MTM on the embedded CIFAR-10 tokens (8x8, 512 codes), width 128 / depth 4: ~10 min on 2 CPU cores."""
    return PretrainConfig(recipe="cifar_mtm", model="mtm_tiny", epochs=3.0, batch_size=256, lr=1e-3,
                          warmup_steps=50, num_workers=2, ckpt_every=100, log_every=20)


@recipe
def smoke() -> PretrainConfig:
    """Seconds on CPU: a tiny MTM model, 2 Ray workers, a few steps."""
    return PretrainConfig(recipe="smoke", model="mtm_tiny",
                          model_args={"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_dim": 16,
                                      "decoder_depth": 1, "decoder_heads": 2},
                          max_steps=6, batch_size=32, warmup_steps=2, num_workers=2, ckpt_every=3, log_every=2,
                          shuffle_buffer=0, max_failures=0)
