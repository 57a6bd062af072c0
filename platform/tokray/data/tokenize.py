"""Images -> token dataset: a Ray Data pipeline (decode tasks, tokenizer actor pool) streaming into
the foundation's writer, plus the plain in-process loop it is measured against.

Any tokenizer ``load_tokenizer`` resolves (tokray, ``diffusers:PATH``; ``pruned_like`` encodes into a
pruned dataset's id space, e.g. the validation split into the training split's codes). Shards are
fixed ranges of the source's (sorted) members, so a rerun skips shards already on the store and
tokenizes only the rest. Shards use the default token codec (context): the writer holds the first
~4 M tokens (all of CIFAR-10) until it has fitted and stored their model, so a run stopped before
that starts over. A corrupt or non-image file is logged by name, counted and skipped; the job
goes on. Sample id = the member's index in the sorted source.

Where it runs, said in the log: one tokenizer per actor, one GPU per actor when the cluster has GPUs;
a big tokenizer (``BF16_MIN_PARAMS``) runs there under bf16 autocast (``dtype="auto"``), a small one
and every CPU run in float32. ``tokenize_pruned`` tokenizes into a staging dataset and prunes it into
the destination (``tokray.data.prune``).
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
from tokray.data.tokenizer import Tokenizer, load_tokenizer, require_can
from tokray.devices import local_device
from tokray.storage.dataset import DatasetWriter
from tokray.storage.formats.tokens import TokenMeta
from tokray.storage.manifest import Manifest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizeJob:
    images: str
    dst: str
    tokenizer: str  # a load_tokenizer spec: PATH.safetensors, diffusers:PATH
    split: str = "all"  # all | train | val (the fixed, seeded validation split)
    val_per_class: int = 500
    split_seed: int = 0
    shard_rows: int = 8192
    batch_size: int = 0  # 0: by image size (256 at 32x32, 4 at 256x256 on a CPU; 8x that on a GPU)
    num_actors: int = 1
    max_images: int = 0
    dtype: str = "auto"  # auto | float32 | bfloat16
    pruned_like: str = ""  # a pruned token dataset: encode into its id space

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be all, train or val, got {self.split!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_MIN_PARAMS = 10_000_000  # tokenizers this big run under bf16 autocast on a GPU (dtype auto)


def load_job_tokenizer(job: TokenizeJob) -> Tokenizer:
    """The job's tokenizer (the pruned view with ``pruned_like``); refuses one that cannot encode."""
    tok, _ = load_tokenizer(job.tokenizer, for_dataset=job.pruned_like or None)
    require_can(tok, "encode", "tokenizing images")
    return tok


def compute_dtype(job: TokenizeJob, tok: Tokenizer, on_gpu: bool) -> torch.dtype:
    if DTYPES[job.dtype] is not None:
        return DTYPES[job.dtype]
    return torch.bfloat16 if on_gpu and tok.num_parameters >= BF16_MIN_PARAMS else torch.float32


def batch_size(job: TokenizeJob, image_size: int, on_gpu: bool) -> int:
    if job.batch_size:
        return job.batch_size
    return max(4, (256 * 32 * 32) // (image_size * image_size)) * (8 if on_gpu else 1)


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
    """Ray Data actor: loads the tokenizer once, encodes pixel batches on its device in ``dtype``."""

    def __init__(self, job: TokenizeJob, dtype: torch.dtype):
        import os

        self.device = local_device()
        if self.device.type == "cpu":  # Ray pins workers to 1 thread; the encoder is the heavy stage
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // job.num_actors))
        self.tok = load_job_tokenizer(job).to(self.device, dtype)
        log.info("tokenizer actor: %s on %s in %s", self.tok.describe(), self.device, str(dtype).replace("torch.", ""))

    def __call__(self, batch: dict) -> dict:
        return {"index": batch["index"], "valid": batch["valid"], "ids": self.tok.encode_pixels(batch["pixels"])}


def _ray_batches(job: TokenizeJob, tok: Tokenizer, todo: np.ndarray, size: int) -> Iterator[dict]:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards are written in source order
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    dtype, batch = compute_dtype(job, tok, use_gpu), batch_size(job, size, use_gpu)
    log.info("tokenizing with %s: %d actor(s) on %s in %s, batches of %d", tok.describe(), job.num_actors,
             "1 GPU each" if use_gpu else "CPU", _dtype_words(dtype), batch)
    blocks = max(1, len(todo) // (4 * batch))
    ds = ray.data.from_items([{"index": int(i)} for i in todo], override_num_blocks=blocks)
    # decoding is light (a few thousand images/s per process): a fraction of a CPU keeps it
    # running beside the tokenizer actors instead of waiting for a whole core
    ds = ds.map_batches(DecodeImages, fn_constructor_args=(job.images, size), batch_size=batch,
                        batch_format="numpy", concurrency=1, num_cpus=0.5)
    ds = ds.map_batches(TokenizeActor, fn_constructor_args=(job, dtype), batch_size=batch,
                        batch_format="numpy", concurrency=job.num_actors, num_gpus=1 if use_gpu else 0)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _inprocess_batches(job: TokenizeJob, tok: Tokenizer, todo: np.ndarray, size: int) -> Iterator[dict]:
    device = local_device()
    on_gpu = device.type != "cpu"
    dtype, batch = compute_dtype(job, tok, on_gpu), batch_size(job, size, on_gpu)
    tok.to(device, dtype)
    log.info("tokenizing with %s in-process on %s in %s, batches of %d", tok.describe(), device,
             _dtype_words(dtype), batch)
    decode = DecodeImages(job.images, size)
    for s in range(0, len(todo), batch):
        b = decode({"index": todo[s:s + batch]})
        yield {"index": b["index"], "valid": b["valid"], "ids": tok.encode_pixels(b["pixels"])}


def _dtype_words(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else \
        f"{str(dtype).replace('torch.', '')} (autocast; nearest-code search in float32)"


def tokenize(job: TokenizeJob, use_ray: bool = True, overwrite: bool = False, progress=None) -> dict:
    """Tokenize ``job.images`` into ``job.dst``; returns counts, skipped files and throughput."""
    tok = load_job_tokenizer(job)  # fail early, on the driver, on a bad tokenizer
    src = ImageSource(job.images)
    indices = split_indices(src.labels, job.split, job.val_per_class, job.split_seed, job.max_images)
    meta = TokenMeta(grid=tok.grid, codebook_size=tok.codebook_size, class_names=src.class_names,
                     tokenizer=tok.fingerprint, shard_rows=job.shard_rows,
                     extra={"source": src.uri.rstrip("/").rsplit("/", 1)[-1], "split": job.split,
                            "val_per_class": job.val_per_class, "split_seed": job.split_seed,
                            "jpeg_bytes": src.file_bytes(indices), "images": int(len(indices))})
    writer = DatasetWriter(job.dst, meta, overwrite=overwrite, source=src.identity())
    for name, data in tok.dataset_files().items():  # a pruned view's codebook and map
        writer.add_file(name, data)
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
    for b in (batches(job, tok, todo, tok.image_size) if len(todo) else []):
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
            "jpeg_bytes": meta.extra["jpeg_bytes"], "path": "ray" if use_ray else "in-process",
            "tokenizer": tok.fingerprint, "tokenizer_kind": tok.kind, "codebook_size": tok.codebook_size}


def staging_uri(dst: str) -> str:
    """Where ``tokenize_pruned`` writes the unpruned tokens: a sibling of ``dst`` on the same store."""
    return str(dst).rstrip("/") + "-unpruned"


def tokenize_pruned(job: TokenizeJob, use_ray: bool = True, overwrite: bool = False, progress=None,
                    keep_unpruned: bool = False) -> dict:
    """Tokenize into ``staging_uri(job.dst)`` (resumable like any run), then prune it into ``job.dst``
    (``tokray.data.prune``); the staging dataset is removed unless ``keep_unpruned``."""
    import os

    from tokray.data.prune import prune_dataset
    from tokray.storage.stores import open_store
    from tokray.storage.uri import parse_uri

    staging = staging_uri(job.dst)
    res = tokenize(dataclasses.replace(job, dst=staging), use_ray=use_ray, overwrite=overwrite, progress=progress)
    pruned = prune_dataset(staging, job.dst, tokenizer=job.tokenizer, overwrite=overwrite)
    if not keep_unpruned:
        open_store(staging).clear()
        local = parse_uri(staging)
        if local.scheme == "local" and os.path.isdir(local.path) and not os.listdir(local.path):
            os.rmdir(local.path)
    log.info("pruned %d of %d codes into %s%s", pruned["codebook_size"], pruned["codes_before"], job.dst,
             "" if not keep_unpruned else f" (unpruned tokens kept at {staging})")
    return {**res, "dst": job.dst, "unpruned": staging if keep_unpruned else "", "store_bytes": pruned["store_bytes"],
            "num_samples": pruned["num_samples"], "codebook_size": pruned["codebook_size"],
            "codes_before": pruned["codes_before"], "tokenizer": pruned["tokenizer"],
            "base_tokenizer": pruned["base_tokenizer"]}


def _write(writer: DatasetWriter, shard: int, rows: list, src: ImageSource) -> None:
    sids = np.array([r[0] for r in rows], dtype=np.int64)
    writer.write_shard(shard, np.stack([r[1] for r in rows]), src.labels[sids], sids)
