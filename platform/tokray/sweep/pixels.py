"""Pixel trials of a sweep: per budget, the token subset's own images stored as downsampled JPEGs
whose bytes on the store (manifest included) fit the same budget; and the full-pixel reference, the
whole training split at its source size and JPEG quality (method ``pixels-full``, the 100% row of
every table). Each with its validation split stored the same way."""

from __future__ import annotations

import io
import logging
import os

import numpy as np

from tokray.sweep.plan import budget_slug, run_length

log = logging.getLogger(__name__)

PIXEL_RECIPE = "cifar_pixels"


def _pixel_set(images: str, uri: str, size: int, quality: int, **kw) -> dict:
    """Open a finished pixel set, or write it (resumable)."""
    from tokray.data.pixels import write_pixel_dataset
    from tokray.storage.dataset import open_dataset

    try:
        m = open_dataset(uri).manifest
        return {"samples": m.num_samples, "store_bytes": m.store_bytes}
    except FileNotFoundError:
        return write_pixel_dataset(images, uri, size=size, quality=quality, **kw)


def _sample_ids(uri: str) -> np.ndarray:
    from tokray.storage.dataset import open_dataset

    return np.concatenate([batch["sample_id"] for batch in open_dataset(uri).iter_batches(8192)])


def pixel_trials(cfg, subsets: dict, full_samples: int) -> list[dict]:
    from tokray.data.pixels import match_budget

    root = os.path.join(os.path.abspath(cfg.out), "data")
    trials = []
    for b, sub in subsets.items():
        ids = _sample_ids(sub["uri"])
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
        trials.append({"phase": "finetune", "kind": "pixels", "recipe": PIXEL_RECIPE, "budget": b, "data": uri,
                       "method": f"pixels {size}px q{quality}", "eval_data": val, "size": size, "quality": quality,
                       **run_length(cfg, PIXEL_RECIPE, full_samples), "store_bytes": info["store_bytes"],
                       "samples": len(ids),
                       "pct_jpeg": sub["pct_jpeg"] * info["store_bytes"] / sub["store_bytes"] if sub["pct_jpeg"] else None,
                       "out": os.path.join(os.path.abspath(cfg.out), "trials", f"pixels-{budget_slug(b)}")})
    return trials


def full_pixel_trial(cfg, full_samples: int, ids=None) -> dict:
    """The full-pixel reference: every training image at the source's own size and JPEG quality (so the
    compact store is close to the files themselves), into the same pixel ViT, under the same protocol. Its
    bytes both ways: the JPEG files (``jpeg_bytes``) and the compact pixel store (``store_bytes``). ``ids``:
    the source images (default: those of the whole token training set)."""
    from PIL import Image

    from tokray.assets import default_tokens
    from tokray.data.images import ImageSource

    src = ImageSource(cfg.images)
    ids = _sample_ids(cfg.data or default_tokens("train")) if ids is None else np.asarray(ids)
    with Image.open(io.BytesIO(src.read(int(ids[0])))) as im:
        size = max(im.size)  # the source's own side (CIFAR: 32)
    root = os.path.join(os.path.abspath(cfg.out), "data")
    q = cfg.full_pixel_quality
    uri = os.path.join(root, f"pixels-full-{size}px-q{q}")
    info = _pixel_set(cfg.images, uri, size, q, sample_ids=ids)
    val = os.path.join(root, f"pixels-val-{size}px-q{q}")
    _pixel_set(cfg.images, val, size, q, split="val")
    jpeg_bytes = src.file_bytes(ids)
    log.info("full-pixel reference: %d images at %dpx, %d bytes as JPEG files, %d bytes as the pixel store (q%d)",
             len(ids), size, jpeg_bytes, info["store_bytes"], q)
    return {"phase": "finetune", "kind": "pixels", "recipe": PIXEL_RECIPE, "method": "pixels-full", "budget": "100%",
            "data": uri, "eval_data": val, "size": size, "quality": q, **run_length(cfg, PIXEL_RECIPE, full_samples),
            "store_bytes": info["store_bytes"], "jpeg_bytes": jpeg_bytes, "samples": len(ids),
            "pct_jpeg": 100.0 * info["store_bytes"] / jpeg_bytes,
            "out": os.path.join(os.path.abspath(cfg.out), "trials", "pixels-full")}
