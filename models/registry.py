"""Named model variants: tiny factory functions registered by name (timm-style)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def create_model(name: str, **overrides) -> nn.Module:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**overrides)


def _import_all() -> None:
    from models import mtm, pixel_vit, token_vit, tokenadapt, tokenizer  # noqa: F401  (register their variants)
