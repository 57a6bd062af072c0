"""The embedded defaults every job finds without arguments: the trained CIFAR-10 tokenizer, the
45,000 CIFAR-10 training images as tokens (40,000 train + the fixed 5,000-image validation split)
and the TokenAdapt weights trained for that tokenizer.

Rebuild them with the commands in README.md ("Embedded default"); they ship as package data.
"""

from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "cifar10")
REBUILD = "see README.md, section 'Embedded default', to rebuild it"


def default_tokenizer() -> str:
    path = os.path.join(ASSETS, "tokenizer.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the embedded CIFAR-10 tokenizer is missing at {path}; {REBUILD}")
    return path


def default_tokens(split: str = "train") -> str:
    """URI of the embedded CIFAR-10 token dataset: split 'train' (40,000) or 'val' (5,000)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    path = os.path.join(ASSETS, f"tokens-{split}")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        raise FileNotFoundError(f"the embedded CIFAR-10 {split} tokens are missing at {path}; {REBUILD}")
    return path


def default_tokenadapt() -> str:
    """The shipped TokenAdapt (f, g) weights for the embedded CIFAR-10 tokenizer."""
    path = os.path.join(ASSETS, "tokenadapt.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the embedded CIFAR-10 TokenAdapt weights are missing at {path}; rebuild them with "
                                "`python jobs/train_tokenadapt.py --images ../shared/datasets/cifar10-train.tar` "
                                "(README.md, 'TokenAdapt')")
    return path
