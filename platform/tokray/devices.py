"""Device selection in one place: the accelerator when the process has one, else the CPU."""

from __future__ import annotations

import torch


def local_device() -> torch.device:
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def has_accelerator() -> bool:
    return torch.accelerator.is_available()


def bf16_autocast_pays(device: torch.device) -> bool:
    """bf16 autocast is faster on GPUs and on CPUs with native bf16 (AVX-512 BF16 / AMX; measured 1.2-1.4x
    less CPU per sample for token_vit_tiny here); elsewhere the CPU emulates it, slower than fp32."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
