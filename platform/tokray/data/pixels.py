"""Pixel baselines at matched storage: an image source written as a pixel dataset of small JPEGs.

Each image is decoded, resized to size x size (bicubic, the same resize tokenization uses) and
re-encoded as baseline JPEG at one quality (``tokray.storage.formats.pixels``); the shards, the
manifest, resume, verification and every ``jobs/dataset.py`` command are the storage core's, as
for tokens. ``store_bytes`` counts every byte on the store, manifest included, so a pixel setting
and a token dataset compare byte for byte. Sample id = the image's index in the sorted source.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from tokray.data.images import ImageSource, decode_image, decode_many
from tokray.data.splits import split_indices
from tokray.storage.dataset import DatasetWriter
from tokray.storage.formats.pixels import FORMAT, PixelMeta, encode_jpeg
from tokray.storage.manifest import Manifest, ShardInfo
from tokray.storage.stores import shard_name

log = logging.getLogger(__name__)

_DECODE_CHUNK = 512  # images decoded at once while writing (bounds memory for large sources)


def _extra(src: ImageSource, split: str, val_per_class: int, split_seed: int, images: int) -> dict:
    return {"source": src.uri.rstrip("/").rsplit("/", 1)[-1], "split": split, "val_per_class": val_per_class,
            "split_seed": split_seed, "images": int(images)}


def _encode_rows(src: ImageSource, indices: np.ndarray, size: int, quality: int) -> tuple[list, np.ndarray, list]:
    """(jpegs, kept source indices, names of undecodable files) for one shard's indices."""
    jpegs, kept, skipped = [], [], []
    for s in range(0, len(indices), _DECODE_CHUNK):
        pixels, ok, bad = decode_many(src, indices[s:s + _DECODE_CHUNK], size)
        jpegs += [encode_jpeg(p, quality) for p in pixels]
        kept.append(ok)
        skipped += bad
    return jpegs, np.concatenate(kept) if kept else np.zeros(0, np.int64), skipped


def _chosen_indices(src: ImageSource, images_uri: str, split: str, max_images: int, val_per_class: int,
                    split_seed: int, sample_ids) -> np.ndarray:
    indices = split_indices(src.labels, split, val_per_class, split_seed, max_images)
    if sample_ids is not None:  # exactly these source images (e.g. a token subset's sample ids)
        chosen = np.unique(np.asarray(sample_ids, dtype=np.int64))
        outside = np.setdiff1d(chosen, indices)
        if len(outside):
            raise ValueError(f"{len(outside)} sample ids (e.g. {outside[:3].tolist()}) are not in split {split!r} of "
                             f"{images_uri}")
        indices = chosen
    if not len(indices):
        raise ValueError(f"split {split!r} of {images_uri} selects no images")
    return indices


def write_pixel_dataset(images_uri: str, dst_uri: str, *, size: int, quality: int, split: str = "train",
                        max_images: int = 0, shard_rows: int = 8192, overwrite: bool = False,
                        val_per_class: int = 500, split_seed: int = 0,
                        progress: Callable[[int], None] | None = None, sample_ids=None) -> dict:
    """Write ``split`` of ``images_uri`` as size x size JPEGs at ``quality`` to ``dst_uri`` (any store).

    Shards are fixed ranges of the split's (sorted) source indices, so a rerun of an interrupted
    write skips the shards already on the store with the right digest. Undecodable source files
    are logged by name and skipped. ``progress(n)`` is called after each shard with its image
    count. Returns {dst, samples, store_bytes, bytes_per_image, size, quality, shards,
    shards_written, shards_skipped, skipped (file names), seconds}.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    src = ImageSource(images_uri)  # bad input fails here, before anything is written
    indices = _chosen_indices(src, images_uri, split, max_images, val_per_class, split_seed, sample_ids)
    meta = PixelMeta(size=size, quality=quality, class_names=tuple(src.class_names), shard_rows=int(shard_rows),
                     extra=_extra(src, split, val_per_class, split_seed, len(indices)))
    writer = DatasetWriter(dst_uri, meta, overwrite=overwrite, source=src.identity())
    t0 = time.perf_counter()
    num_shards = -(-len(indices) // shard_rows)
    written, skipped = 0, []
    for i in range(num_shards):
        part = indices[i * shard_rows:(i + 1) * shard_rows]
        if not writer.shard_done(i):
            jpegs, kept, bad = _encode_rows(src, part, meta.size, meta.quality)
            skipped += bad
            writer.write_shard(i, jpegs, src.labels[kept], kept)
            written += 1
        if progress:
            progress(len(part))
    manifest = writer.close(num_shards=num_shards)
    per_image = manifest.store_bytes / max(1, manifest.num_samples)
    log.info("wrote %s: %d images at %dx%d q%d in %d shards, %d bytes on the store (%.1f B/image)",
             writer.store.uri, manifest.num_samples, size, size, quality, num_shards, manifest.store_bytes, per_image)
    return {"dst": str(writer.store.uri), "samples": manifest.num_samples, "store_bytes": manifest.store_bytes,
            "bytes_per_image": per_image, "size": int(size), "quality": int(quality),
            "shards": num_shards, "shards_written": written, "shards_skipped": num_shards - written,
            "skipped": skipped, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# storage budgets


def estimate_bytes_per_image(images_uri: str | ImageSource, sizes=(32, 24, 16, 8),
                             qualities=(95, 90, 75, 50, 25, 10), *,
                             sample: int = 256, split: str = "train", seed: int = 0,
                             val_per_class: int = 500, split_seed: int = 0) -> dict[tuple[int, int], float]:
    """Shard bytes per image for each (size, quality), measured on ``sample`` seeded images of the
    split encoded exactly as ``write_pixel_dataset`` does, in one shard of that many rows.

    A full shard (8192 rows) amortizes its Parquet footer and the repeated JPEG headers over more
    images, so the estimate is a little high: settings chosen with it land at or under a budget.
    """
    for size in sizes:
        for q in qualities:
            PixelMeta(size=size, quality=q, class_names=("x",), shard_rows=1)  # validates the settings
    src = images_uri if isinstance(images_uri, ImageSource) else ImageSource(images_uri)
    idx = split_indices(src.labels, split, val_per_class, split_seed)
    idx = np.sort(np.random.default_rng(seed).choice(idx, min(sample, len(idx)), replace=False))
    blobs = [src.read(int(i)) for i in idx]
    out = {}
    for size in sizes:
        pixels = []
        for b in blobs:
            try:
                pixels.append(decode_image(b, size))
            except Exception:  # PIL raises many types for a bad file; write_pixel_dataset skips them too
                continue
        if not pixels:
            raise ValueError(f"none of the {len(blobs)} sampled images of {src.uri} could be decoded")
        for q in qualities:
            table = FORMAT.records_to_table(None, [encode_jpeg(p, q) for p in pixels], np.zeros(len(pixels)),
                                            np.arange(len(pixels)))
            out[(int(size), int(q))] = len(FORMAT.encode_shard(table)) / len(pixels)
    return out


def match_budget(images_uri: str, target_bytes: int, sizes=(32, 24, 16, 8), qualities=(95, 90, 75, 50, 25, 10), *,
                 num_images: int = 0, split: str = "train", shard_rows: int = 8192, sample: int = 256,
                 seed: int = 0, val_per_class: int = 500, split_seed: int = 0) -> list[tuple[int, int, float]]:
    """Pixel settings whose dataset should fit ``target_bytes`` (e.g. a token dataset's ``store_bytes``).

    Estimated store bytes = images x bytes_per_image (``estimate_bytes_per_image``) + the manifest
    for that many shards. ``num_images`` defaults to the whole split. Returns the fitting
    (size, quality, bytes_per_image), closest to the budget first (larger size first on ties);
    empty if none fits. It is an estimate: the written dataset's ``store_bytes`` is the truth,
    so a sweep should check it (and step to the next setting if over).
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    src = ImageSource(images_uri)
    n = num_images or len(split_indices(src.labels, split, val_per_class, split_seed))
    shards = -(-n // shard_rows)
    fake = ShardInfo(path=shard_name(0, "local"), rows=shard_rows, bytes=10**9, sha256="0" * 64,
                     first_sample_id=10**9, last_sample_id=10**9)
    meta = PixelMeta(size=max(sizes), quality=100, class_names=src.class_names, shard_rows=shard_rows,
                     extra=_extra(src, split, val_per_class, split_seed, n))
    manifest_bytes = len(Manifest(meta=meta, num_samples=n, shards=(fake,) * shards, store_bytes=10**12).dumps())
    bpi = estimate_bytes_per_image(src, sizes, qualities, sample=sample, split=split, seed=seed,
                                   val_per_class=val_per_class, split_seed=split_seed)
    fits = [(s, q, b) for (s, q), b in bpi.items() if n * b + manifest_bytes <= target_bytes]
    return sorted(fits, key=lambda t: (-t[2], -t[0]))
