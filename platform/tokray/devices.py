"""Device selection in one place: the accelerator when the process has one, else the CPU."""

from __future__ import annotations

import torch


def local_device() -> torch.device:
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def has_accelerator() -> bool:
    return torch.accelerator.is_available()
