"""Pixel baselines of a sweep: per budget, the token subset's own images stored as downsampled JPEGs
whose bytes on the store (manifest included) fit the same budget, plus the validation split stored
the same way."""

from __future__ import annotations

import logging
import os

import numpy as np

from tokray.sweep.plan import budget_slug

log = logging.getLogger(__name__)


def _pixel_set(images: str, uri: str, size: int, quality: int, **kw) -> dict:
    """Open a finished pixel set, or write it (resumable)."""
    from tokray.data.pixels import write_pixel_dataset
    from tokray.storage.dataset import open_dataset

    try:
        m = open_dataset(uri).manifest
        return {"samples": m.num_samples, "store_bytes": m.store_bytes}
    except FileNotFoundError:
        return write_pixel_dataset(images, uri, size=size, quality=quality, **kw)


def pixel_trials(cfg, subsets: dict) -> list[dict]:
    from tokray.data.pixels import match_budget
    from tokray.storage.dataset import open_dataset

    root = os.path.join(os.path.abspath(cfg.out), "data")
    trials = []
    for b, sub in subsets.items():
        ids = np.concatenate([batch["sample_id"] for batch in open_dataset(sub["uri"]).iter_batches(8192)])
        fits = match_budget(cfg.images, sub["store_bytes"], sizes=cfg.pixel_sizes, num_images=len(ids))
        chosen = None
        for size, quality, _ in fits:  # the estimate can run over: the bytes written decide
            uri = os.path.join(root, f"pixels-{budget_slug(b)}-{size}px-q{quality}")
            info = _pixel_set(cfg.images, uri, size, quality, sample_ids=ids)
            if info["store_bytes"] <= sub["store_bytes"]:
                chosen = (size, quality, uri, info)
                break
            log.info("budget %s: %dpx q%d takes %d bytes > %d; trying the next setting", b, size, quality,
                     info["store_bytes"], sub["store_bytes"])
        if chosen is None:
            log.warning("budget %s (%d bytes): no pixel setting among sizes %s fits %d images; no baseline", b,
                        sub["store_bytes"], cfg.pixel_sizes, len(ids))
            continue
        size, quality, uri, info = chosen
        val = os.path.join(root, f"pixels-val-{size}px-q{quality}")
        _pixel_set(cfg.images, val, size, quality, split="val")
        log.info("budget %s: pixel baseline %dpx JPEG q%d, %d images, %d bytes", b, size, quality, len(ids),
                 info["store_bytes"])
        trials.append({"phase": "finetune", "kind": "pixels", "recipe": "cifar_pixels", "budget": b, "data": uri,
                       "eval_data": val, "size": size, "quality": quality, "epochs": cfg.epochs,
                       "store_bytes": info["store_bytes"], "samples": len(ids),
                       "pct_jpeg": sub["pct_jpeg"] * info["store_bytes"] / sub["store_bytes"] if sub["pct_jpeg"] else None,
                       "out": os.path.join(os.path.abspath(cfg.out), "trials", f"pixels-{budget_slug(b)}")})
    return trials
