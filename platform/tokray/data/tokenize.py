"""Images -> token dataset: a Ray Data pipeline (decode tasks, tokenizer actor pool) streaming into
the foundation's writer, plus the plain in-process loop it is measured against.

Shards are fixed ranges of the source's (sorted) members, so a rerun skips shards already on the
store and tokenizes only the rest. A corrupt or non-image file is logged by name, counted and
skipped; the job goes on. Sample id = the member's index in the sorted source.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

import numpy as np
import torch

from tokray.data.images import ImageSource, decode_batch
from tokray.data.splits import SPLITS, split_indices
from tokray.data.tokenizer import encode_pixels, load_tokenizer
from tokray.devices import has_accelerator, local_device
from tokray.storage.dataset import DatasetWriter
from tokray.storage.formats.tokens import TokenMeta
from tokray.storage.manifest import Manifest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizeJob:
    images: str
    dst: str
    tokenizer: str  # path to tokenizer.safetensors
    split: str = "all"  # all | train | val (the fixed, seeded validation split)
    val_per_class: int = 500
    split_seed: int = 0
    shard_rows: int = 8192
    batch_size: int = 256
    num_actors: int = 1
    max_images: int = 0

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be all, train or val, got {self.split!r}")


class DecodeImages:
    """Ray Data batch fn: source indices -> pixels (zeros + valid=False for unreadable files)."""

    def __init__(self, images: str, size: int):
        self.images, self.size = images, size
        self.src = None  # listed lazily, in the worker process

    def __call__(self, batch: dict) -> dict:
        if self.src is None:
            self.src = ImageSource(self.images)
        pixels, valid = decode_batch(self.src, batch["index"], self.size)
        return {"index": batch["index"], "pixels": pixels, "valid": valid}


class TokenizeActor:
    """Ray Data actor: loads the tokenizer once, encodes pixel batches on its device."""

    def __init__(self, tokenizer_path: str, num_actors: int = 1):
        import os

        self.device = local_device()
        if self.device.type == "cpu":  # Ray pins workers to 1 thread; the encoder is the heavy stage
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // num_actors))
        self.model, _ = load_tokenizer(tokenizer_path)
        self.model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        return {"index": batch["index"], "valid": batch["valid"], "ids": encode_pixels(self.model, batch["pixels"], self.device)}


def _ray_batches(job: TokenizeJob, src: ImageSource, todo: np.ndarray, size: int) -> Iterator[dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards are written in source order
    use_gpu = has_accelerator()
    blocks = max(1, len(todo) // (4 * job.batch_size))
    ds = ray.data.from_items([{"index": int(i)} for i in todo], override_num_blocks=blocks)
    # decoding is light (a few thousand images/s per process): a fraction of a CPU keeps it
    # running beside the tokenizer actors instead of waiting for a whole core
    ds = ds.map_batches(DecodeImages, fn_constructor_args=(job.images, size), batch_size=job.batch_size,
                        batch_format="numpy", concurrency=1, num_cpus=0.5)
    ds = ds.map_batches(TokenizeActor, fn_constructor_args=(job.tokenizer, job.num_actors), batch_size=job.batch_size,
                        batch_format="numpy", concurrency=job.num_actors, num_gpus=1 if use_gpu else 0)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _inprocess_batches(job: TokenizeJob, src: ImageSource, todo: np.ndarray, size: int) -> Iterator[dict]:
    device = local_device()
    model, _ = load_tokenizer(job.tokenizer)
    model.to(device)
    decode = DecodeImages(job.images, size)
    for s in range(0, len(todo), job.batch_size):
        b = decode({"index": todo[s:s + job.batch_size]})
        yield {"index": b["index"], "valid": b["valid"], "ids": encode_pixels(model, b["pixels"], device)}


def tokenize(job: TokenizeJob, use_ray: bool = True, overwrite: bool = False, progress=None) -> dict:
    """Tokenize ``job.images`` into ``job.dst``; returns counts, skipped files and throughput."""
    model, info = load_tokenizer(job.tokenizer)  # fail early, on the driver, on a bad tokenizer path
    src = ImageSource(job.images)
    indices = split_indices(src.labels, job.split, job.val_per_class, job.split_seed, job.max_images)
    meta = TokenMeta(grid=model.grid, codebook_size=model.codebook_size, class_names=src.class_names,
                     tokenizer=info["fingerprint"], shard_rows=job.shard_rows,
                     extra={"source": src.uri.rstrip("/").rsplit("/", 1)[-1], "split": job.split,
                            "val_per_class": job.val_per_class, "split_seed": job.split_seed,
                            "jpeg_bytes": src.file_bytes(indices), "images": int(len(indices))})
    writer = DatasetWriter(job.dst, meta, overwrite=overwrite)
    num_shards = -(-len(indices) // job.shard_rows)
    pending = [s for s in range(num_shards) if not writer.shard_done(s)]
    todo = np.concatenate([indices[s * job.shard_rows:(s + 1) * job.shard_rows] for s in pending]) \
        if pending else np.zeros(0, np.int64)
    position = {int(i): p for p, i in enumerate(indices)}  # source index -> position in this split
    log.info("%d images in %d shards; %d shards to tokenize", len(indices), num_shards, len(pending))

    t0 = time.perf_counter()
    skipped: list[str] = []
    buf: dict[int, list] = {}
    batches = _ray_batches if use_ray else _inprocess_batches
    for b in (batches(job, src, todo, model.image_size) if len(todo) else []):
        for i, ok, ids in zip(b["index"], b["valid"], b["ids"]):
            shard = position[int(i)] // job.shard_rows
            if not ok:
                skipped.append(src.members[int(i)])
            else:
                buf.setdefault(shard, []).append((int(i), ids))
        if progress:
            progress(len(b["index"]))
        for shard in [s for s in buf if s < position[int(b["index"][-1])] // job.shard_rows]:
            _write(writer, shard, buf.pop(shard), src)  # every earlier shard is complete (order kept)
    for shard in sorted(buf):
        _write(writer, shard, buf.pop(shard), src)
    seconds = time.perf_counter() - t0
    manifest: Manifest = writer.close(num_shards=num_shards)
    return {"dst": job.dst, "images": int(len(todo)), "tokenized": int(len(todo) - len(skipped)),
            "skipped": skipped, "seconds": seconds, "images_per_s": len(todo) / seconds if seconds else 0.0,
            "num_samples": manifest.num_samples, "store_bytes": manifest.store_bytes,
            "jpeg_bytes": meta.extra["jpeg_bytes"], "path": "ray" if use_ray else "in-process"}


def _write(writer: DatasetWriter, shard: int, rows: list, src: ImageSource) -> None:
    sids = np.array([r[0] for r in rows], dtype=np.int64)
    writer.write_shard(shard, np.stack([r[1] for r in rows]), src.labels[sids], sids)
