"""The fixed, seeded validation split of an image source, and the indices of a split.

Every job that holds images out (tokenizer and TokenAdapt training, tokenization, pixel datasets,
evaluation on raw images) selects them here, so "val" means the same images everywhere: by
default 500 images of each class drawn with seed 0.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "all")


def validation_split(labels: np.ndarray, per_class: int = 500, seed: int = 0) -> np.ndarray:
    """Boolean mask of a stratified validation split: ``per_class`` images of each class, seeded.

    A class with fewer than ``2 * per_class`` images gives a tenth of them (at least one)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = min(per_class, max(1, len(idx) // 10)) if len(idx) < 2 * per_class else per_class
        mask[rng.choice(idx, take, replace=False)] = True
    return mask


def split_indices(labels: np.ndarray, split: str, val_per_class: int = 500, seed: int = 0,
                  max_images: int = 0) -> np.ndarray:
    """Source indices (ascending) of ``split`` (train | val | all); the first ``max_images`` if it is > 0."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0 (0 = all), got {max_images}")
    if split == "all":
        idx = np.arange(len(labels))
    else:
        val = validation_split(np.asarray(labels), val_per_class, seed)
        idx = np.flatnonzero(val if split == "val" else ~val)
    return idx[:max_images] if max_images else idx


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Positions (ascending) of ``n`` samples drawn per class in proportion to the class sizes, seeded: what
    "evaluate on N samples" means (the first N rows of a class-sorted store would be one or two classes)."""
    from tokray.storage.budget import allocate, stratified_order

    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    remap = np.searchsorted(classes, labels)
    order = stratified_order(remap, len(classes), seed)
    counts = allocate(np.array([len(o) for o in order]), n)
    return np.sort(np.concatenate([o[:k] for o, k in zip(order, counts)]))
