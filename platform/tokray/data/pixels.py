"""Pixel baselines at matched storage: the training images as small JPEGs in checksummed shards.

A pixel dataset is the token format's sibling on the same stores (a local directory or s3://):
``manifest.json`` (kind ``tokray.pixels``) plus Parquet shards with columns ``jpeg`` (binary),
``label`` (int32) and ``sample_id`` (int64, the image's index in the sorted source, as for
tokens). Each image is decoded, resized to size x size (bicubic, the same resize tokenization
uses) and re-encoded as baseline JPEG at one quality. Standard Huffman tables (no per-image
``optimize``) make every image's ~600 header bytes identical, and the shard's zstd stores
them about once; on CIFAR-10 that is 3-10x fewer bytes than the loose files (32 px q75: about
300 B per image instead of 887; 16 px q50: about 67 B).

``store_bytes`` counts every byte on the store, manifest included, as for token datasets, so a
pixel setting and a token dataset compare byte for byte. Writes are atomic per object (the
store's temp + rename or single PUT), the manifest comes last, and a rerun of an interrupted
write skips the shards already there with the right digest. Every shard read is checked
against its sha256; a mismatch raises ``ShardChecksumError`` naming the shard.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.block import BlockMetadata
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.datasource import Datasource, ReadTask

from tokray.data.images import ImageSource, decode_image, decode_many, validation_split
from tokray.storage import codec
from tokray.storage.dataset import ShardedDataset
from tokray.storage.manifest import MANIFEST_NAME, PROGRESS_NAME, ShardInfo
from tokray.storage.stores import VERIFY_HINT, FileStore, ShardChecksumError, Store, open_store, shard_name

log = logging.getLogger(__name__)

KIND = "tokray.pixels"
FORMAT_VERSION = 1
JPEG, LABEL, SAMPLE_ID = "jpeg", "label", "sample_id"
SPLITS = ("train", "val", "all")
_DECODE_CHUNK = 512  # images decoded at once while writing (bounds memory for large sources)


# ---------------------------------------------------------------------------------------------
# shard codec


def schema() -> pa.Schema:
    return pa.schema([pa.field(JPEG, pa.binary(), nullable=False),
                      pa.field(LABEL, pa.int32(), nullable=False),
                      pa.field(SAMPLE_ID, pa.int64(), nullable=False)])


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> baseline JPEG (4:2:0, standard tables: the header is the same for every
    image of one size and quality, so the shard's zstd keeps it about once)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=int(quality), optimize=False)
    return buf.getvalue()


def decode_jpegs(blobs: Iterable[bytes], size: int) -> np.ndarray:
    """JPEG bytes -> uint8 [B, size, size, 3] (PIL, RGB). A blob of another size is an error."""
    from PIL import Image

    blobs = list(blobs)
    out = np.empty((len(blobs), size, size, 3), np.uint8)
    for j, b in enumerate(blobs):
        with Image.open(io.BytesIO(b)) as im:
            if im.size != (size, size):
                raise ValueError(f"a stored image is {im.size[0]}x{im.size[1]}, the dataset says {size}x{size}")
            out[j] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return out


def records_to_table(jpegs: list[bytes], labels, sample_ids) -> pa.Table:
    return pa.Table.from_arrays([pa.array(jpegs, type=pa.binary()),
                                 pa.array(np.asarray(labels, dtype=np.int32)),
                                 pa.array(np.asarray(sample_ids, dtype=np.int64))], schema=schema())


def encode_shard(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=3, use_dictionary=[LABEL],
                   column_encoding={SAMPLE_ID: "DELTA_BINARY_PACKED"}, write_statistics=False,
                   data_page_size=1 << 20)
    return sink.getvalue()


def decode_shard(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)


# ---------------------------------------------------------------------------------------------
# manifest


@dataclasses.dataclass(frozen=True)
class PixelManifest:
    """What a pixel dataset is. Also its ``.meta``: size, quality, class_names, num_samples, store_bytes."""

    size: int
    quality: int
    class_names: tuple[str, ...]
    shard_rows: int
    extra: dict = dataclasses.field(default_factory=dict, hash=False)  # split, source, images, ...
    num_samples: int = 0
    shards: tuple[ShardInfo, ...] = ()
    store_bytes: int = 0  # every byte on the store, this manifest included

    @property
    def shard_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def files(self) -> dict:  # no side files (the stores' clear/measure read this)
        return {}

    @property
    def file_bytes(self) -> int:
        return 0

    @property
    def bytes_per_image(self) -> float:
        return self.store_bytes / self.num_samples if self.num_samples else 0.0

    def settings(self) -> dict:
        """What must match for a rerun to resume an interrupted write."""
        return {"size": self.size, "quality": self.quality, "class_names": list(self.class_names),
                "shard_rows": self.shard_rows, "extra": self.extra}

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": KIND, "encoding": "jpeg", **self.settings(),
                "num_samples": self.num_samples, "shard_bytes": self.shard_bytes, "store_bytes": self.store_bytes,
                "files": {}, "shards": [dataclasses.asdict(s) for s in self.shards]}

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> "PixelManifest":
        try:
            d = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: manifest.json is not valid JSON ({e})") from e
        kind = d.get("kind")
        if kind != KIND:
            hint = ("it is a token dataset: open it with tokray.storage.dataset.open_dataset"
                    if kind == "tokray.tokens" else "write one with tokray.data.pixels.write_pixel_dataset")
            raise ValueError(f"{where}: manifest kind is {kind!r}, not a pixel dataset ({KIND!r}); {hint}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: pixel manifest format_version {d.get('format_version')!r} is not supported; "
                             f"this tokray reads {FORMAT_VERSION}. Re-create the dataset or upgrade tokray.")
        try:
            m = cls(size=int(d["size"]), quality=int(d["quality"]), class_names=tuple(d["class_names"]),
                    shard_rows=int(d["shard_rows"]), extra=dict(d.get("extra", {})),
                    num_samples=int(d["num_samples"]), shards=tuple(ShardInfo(**s) for s in d["shards"]),
                    store_bytes=int(d["store_bytes"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: manifest.json is missing or has a malformed field ({e!r})") from e
        if sum(s.rows for s in m.shards) != m.num_samples:
            raise ValueError(f"{where}: manifest num_samples {m.num_samples} != sum of shard rows")
        return m

    def with_store_bytes(self) -> "PixelManifest":
        """Fix point: store bytes = shard bytes + the manifest's own length (which holds the number)."""
        m = dataclasses.replace(self, store_bytes=0)
        for _ in range(4):
            total = self.shard_bytes + len(m.dumps())
            if total == m.store_bytes:
                return m
            m = dataclasses.replace(m, store_bytes=total)
        return m


# ---------------------------------------------------------------------------------------------
# reading


class PixelShardChecksumError(ShardChecksumError):
    """A pixel shard's bytes do not match its manifest digest (the hint names the pixel check)."""

    def __init__(self, message: str, shard: str):
        self.shard = shard
        ValueError.__init__(self, message)

    def __reduce__(self):  # crosses process boundaries (Ray read tasks) intact
        return type(self), (self.args[0], self.shard)


class PixelDataset(ShardedDataset):
    """A complete pixel dataset (its manifest exists). Every shard read is checked against its sha256."""

    @property
    def meta(self) -> PixelManifest:
        return self.manifest

    def read_shard(self, i: int, columns: list[str] | None = None) -> pa.Table:
        try:  # the store checks the digest (S3: through the verified cache tier) and names the shard
            data = self.store.read_shard_bytes(self.manifest.shards[i])
        except ShardChecksumError as e:
            check = f"tokray.data.pixels.open_pixel_dataset({self.uri!r}).verify()"
            raise PixelShardChecksumError(str(e).replace(VERIFY_HINT.format(uri=self.uri), check), e.shard) from None
        return decode_shard(data, columns)

    def iter_batches(self, batch_size: int = 1024, decode: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Dicts {pixels: uint8 [B, size, size, 3] (or jpeg: a list of B JPEG byte strings when
        ``decode=False``), label: int32 [B], sample_id: int64 [B]} of numpy arrays, in shard order."""
        for table in self.iter_tables():
            for start in range(0, table.num_rows, batch_size):
                t = table.slice(start, batch_size)
                blobs = t.column(JPEG).to_pylist()
                b = {"pixels": decode_jpegs(blobs, self.meta.size)} if decode else {JPEG: blobs}
                b[LABEL] = t.column(LABEL).to_numpy()
                b[SAMPLE_ID] = t.column(SAMPLE_ID).to_numpy()
                yield b

    def verify(self) -> list[str]:
        """Check every shard; one line per problem (empty when intact)."""
        problems = []
        for i, info in enumerate(self.manifest.shards):
            try:
                if self.read_shard(i, [SAMPLE_ID]).num_rows != info.rows:
                    problems.append(f"{info.path}: row count differs from the manifest's {info.rows}")
            except ShardChecksumError as e:
                problems.append(f"{info.path}: sha256 mismatch ({e})")
            except FileNotFoundError:
                problems.append(f"{info.path}: missing from the store")
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{info.path}: unreadable ({type(e).__name__}: {e})")
        return problems


def _file_store(uri) -> FileStore:
    store = open_store(uri)
    if not isinstance(store, FileStore):
        raise ValueError(f"{uri}: pixel datasets live on file stores (a local directory or s3://bucket/prefix); "
                         "lmdb:// holds token records only. Choose a directory or an s3:// URI.")
    return store


def open_pixel_dataset(uri) -> PixelDataset:
    store = _file_store(uri)
    store.check(for_write=False)
    data = store.read_meta(MANIFEST_NAME)
    if data is None:
        why = ("an interrupted write is there (no manifest yet); rerun the same write to resume it"
               if store.read_meta(PROGRESS_NAME) is not None else "no manifest.json there")
        raise FileNotFoundError(f"no complete pixel dataset at {store.uri}: {why}. Create one with "
                                "tokray.data.pixels.write_pixel_dataset(IMAGES, URI, size=..., quality=...)")
    return PixelDataset(store, PixelManifest.loads(data, str(store.uri)))


# ---------------------------------------------------------------------------------------------
# writing


def _select(src: ImageSource, split: str, max_images: int, val_per_class: int, split_seed: int) -> np.ndarray:
    """Source indices of a split, as tokenization selects them (same split, same order)."""
    if split == "all":
        idx = np.arange(len(src))
    else:
        val = validation_split(src.labels, val_per_class, split_seed)
        idx = np.flatnonzero(val if split == "val" else ~val)
    return idx[:max_images] if max_images else idx


def _extra(src: ImageSource, split: str, val_per_class: int, split_seed: int, images: int) -> dict:
    return {"source": src.uri.rstrip("/").rsplit("/", 1)[-1], "split": split, "val_per_class": val_per_class,
            "split_seed": split_seed, "images": int(images)}


def _check_settings(size: int, quality: int, split: str, shard_rows: int, max_images: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive number of pixels (e.g. 32, 16, 8), got {size!r}")
    if not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be a JPEG quality in 1..100 (e.g. 75), got {quality!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0 (0 = all), got {max_images}")


def _encode_rows(src: ImageSource, indices: np.ndarray, size: int, quality: int) -> tuple[list, np.ndarray, list]:
    """(jpegs, kept source indices, names of undecodable files) for one shard's indices."""
    jpegs, kept, skipped = [], [], []
    for s in range(0, len(indices), _DECODE_CHUNK):
        pixels, ok, bad = decode_many(src, indices[s:s + _DECODE_CHUNK], size)
        jpegs += [encode_jpeg(p, quality) for p in pixels]
        kept.append(ok)
        skipped += bad
    return jpegs, np.concatenate(kept) if kept else np.zeros(0, np.int64), skipped


def _resumable(store: Store, target: PixelManifest) -> dict[int, ShardInfo]:
    data = store.read_meta(PROGRESS_NAME)
    if data is None:
        return {}
    progress = json.loads(data)
    if progress.get("settings") != json.loads(json.dumps(target.settings())):
        raise ValueError(f"{store.uri} holds an interrupted write with other settings ({progress.get('settings')} "
                         f"vs {target.settings()}); rerun with the same settings to resume, or overwrite=True to "
                         "start over")
    done = {}
    for i, s in progress["shards"].items():
        info = ShardInfo(**s)
        if store.shard_intact(info):
            done[int(i)] = info
        else:
            log.warning("shard %s from the interrupted write is damaged; it will be rewritten", info.path)
    return done


def write_pixel_dataset(images_uri: str, dst_uri: str, *, size: int, quality: int, split: str = "train",
                        max_images: int = 0, shard_rows: int = 8192, overwrite: bool = False,
                        val_per_class: int = 500, split_seed: int = 0,
                        progress: Callable[[int], None] | None = None, sample_ids=None) -> dict:
    """Write ``split`` of ``images_uri`` as size x size JPEGs at ``quality`` to ``dst_uri``.

    Shards are fixed ranges of the split's (sorted) source indices, so a rerun of an interrupted
    write skips the shards already on the store with the right digest. Undecodable source files
    are logged by name and skipped. ``progress(n)`` is called after each shard with its image
    count. Returns {dst, samples, store_bytes, bytes_per_image, size, quality, shards,
    shards_written, shards_skipped, skipped (file names), seconds}.
    """
    _check_settings(size, quality, split, shard_rows, max_images)
    store = _file_store(dst_uri)
    src = ImageSource(images_uri)  # bad input fails here, before anything is written
    indices = _select(src, split, max_images, val_per_class, split_seed)
    if sample_ids is not None:  # exactly these source images (e.g. a token subset's sample ids)
        chosen = np.unique(np.asarray(sample_ids, dtype=np.int64))
        outside = np.setdiff1d(chosen, indices)
        if len(outside):
            raise ValueError(f"{len(outside)} sample ids (e.g. {outside[:3].tolist()}) are not in split {split!r} of "
                             f"{images_uri}")
        indices = chosen
    if not len(indices):
        raise ValueError(f"split {split!r} of {images_uri} selects no images")
    store.check(for_write=True)
    if overwrite:
        store.clear()  # a complete dataset or an interrupted write: start over
    elif store.read_meta(MANIFEST_NAME) is not None:
        raise FileExistsError(f"a dataset already exists at {store.uri}; choose another destination or "
                              "pass overwrite=True to replace it")
    target = PixelManifest(size=int(size), quality=int(quality), class_names=tuple(src.class_names),
                           shard_rows=int(shard_rows),
                           extra=_extra(src, split, val_per_class, split_seed, len(indices)))
    done = _resumable(store, target)
    if done:
        log.info("resuming the write to %s: %d shards already present and intact", store.uri, len(done))

    def save_progress():
        store.write_meta(PROGRESS_NAME, json.dumps({
            "settings": target.settings(),
            "shards": {str(i): dataclasses.asdict(s) for i, s in sorted(done.items())}}).encode())

    t0 = time.perf_counter()
    num_shards = -(-len(indices) // shard_rows)
    written, skipped = 0, []
    for i in range(num_shards):
        part = indices[i * shard_rows:(i + 1) * shard_rows]
        if i not in done:
            jpegs, kept, bad = _encode_rows(src, part, size, quality)
            skipped += bad
            data = encode_shard(records_to_table(jpegs, src.labels[kept], kept))
            name = shard_name(i, store.uri.scheme)
            store.write_meta(name, data)  # the store's atomic object write (temp + rename, or one PUT)
            done[i] = ShardInfo(path=name, rows=len(kept), bytes=len(data), sha256=codec.sha256(data),
                                first_sample_id=int(kept[0]) if len(kept) else -1,
                                last_sample_id=int(kept[-1]) if len(kept) else -1)
            save_progress()
            written += 1
        if progress:
            progress(len(part))
    shards = tuple(done[i] for i in range(num_shards))
    manifest = dataclasses.replace(target, num_samples=sum(s.rows for s in shards), shards=shards).with_store_bytes()
    store.write_meta(MANIFEST_NAME, manifest.dumps())  # last: only now is the dataset complete
    store.delete_meta(PROGRESS_NAME)
    log.info("wrote %s: %d images at %dx%d q%d in %d shards, %d bytes on the store (%.1f B/image)",
             store.uri, manifest.num_samples, size, size, quality, num_shards, manifest.store_bytes,
             manifest.bytes_per_image)
    return {"dst": str(store.uri), "samples": manifest.num_samples, "store_bytes": manifest.store_bytes,
            "bytes_per_image": manifest.bytes_per_image, "size": int(size), "quality": int(quality),
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
            _check_settings(size, q, split, 1, 0)
    src = images_uri if isinstance(images_uri, ImageSource) else ImageSource(images_uri)
    idx = _select(src, split, 0, val_per_class, split_seed)
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
            table = records_to_table([encode_jpeg(p, q) for p in pixels], np.zeros(len(pixels)), np.arange(len(pixels)))
            out[(int(size), int(q))] = len(encode_shard(table)) / len(pixels)
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
    n = num_images or len(_select(src, split, 0, val_per_class, split_seed))
    shards = -(-n // shard_rows)
    fake = ShardInfo(path=shard_name(0, "local"), rows=shard_rows, bytes=10**9, sha256="0" * 64,
                     first_sample_id=10**9, last_sample_id=10**9)
    manifest_bytes = len(PixelManifest(size=max(sizes), quality=100, class_names=src.class_names,
                                       shard_rows=shard_rows, extra=_extra(src, split, val_per_class, split_seed, n),
                                       num_samples=n, shards=(fake,) * shards, store_bytes=10**12).dumps())
    bpi = estimate_bytes_per_image(src, sizes, qualities, sample=sample, split=split, seed=seed,
                                   val_per_class=val_per_class, split_seed=split_seed)
    fits = [(s, q, b) for (s, q), b in bpi.items() if n * b + manifest_bytes <= target_bytes]
    return sorted(fits, key=lambda t: (-t[2], -t[0]))


# ---------------------------------------------------------------------------------------------
# Ray Data


class PixelDatasource(Datasource):
    """Ray Data Datasource for pixel datasets: one read task per group of shards, each shard
    verified against its sha256 in the task that reads it (as ``TokenDatasource`` does)."""

    def __init__(self, uri: str, shard_indices: Iterable[int] | None = None):
        ds = open_pixel_dataset(uri)  # fail on the driver, with a clear error, before any task starts
        self.uri = str(ds.store.uri)
        self.manifest = ds.manifest
        self.shard_indices = list(range(len(ds.manifest.shards)) if shard_indices is None else shard_indices)

    @staticmethod
    def _size(infos) -> int:
        # the loose JPEGs are a few times the shard bytes (their headers are zstd-shared on the store)
        return sum(4 * s.bytes + 12 * s.rows for s in infos)

    def estimate_inmemory_data_size(self) -> int:
        return self._size([self.manifest.shards[i] for i in self.shard_indices])

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        groups = [g for g in np.array_split(np.array(self.shard_indices, dtype=int),
                                            max(1, min(parallelism, len(self.shard_indices)))) if len(g)]
        tasks = []
        for group in groups:
            infos = [self.manifest.shards[i] for i in group]
            meta = BlockMetadata(num_rows=sum(s.rows for s in infos), size_bytes=self._size(infos),
                                 exec_stats=None, input_files=tuple(s.path for s in infos))
            tasks.append(ReadTask(_reader(self.uri, [int(i) for i in group]), meta, schema=schema(),
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _reader(uri: str, shard_indices: list[int]):
    def read() -> Iterable[pa.Table]:
        ds = open_pixel_dataset(uri)
        for i in shard_indices:
            yield ds.read_shard(i)
    return read


def read_pixel_ray_dataset(uri, shard_indices=None, **read_args):
    """A ``ray.data.Dataset`` of {jpeg: binary, label: int32, sample_id: int64}; ``read_args`` go to
    ``ray.data.read_datasource``. Batch it with ``PixelBatchCollate`` / ``iter_pixel_torch_batches``."""
    import ray.data

    return ray.data.read_datasource(PixelDatasource(str(uri), shard_indices), **read_args)


class PixelBatchCollate(ArrowBatchCollateFn):
    """Arrow batch -> {pixels uint8 [B, 3, size, size], label int64 [B], sample_id int64 [B]} (CPU
    tensors). JPEGs are decoded here (PIL); the model normalizes on the device."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        pixels = decode_jpegs(batch.column(JPEG).to_pylist(), self.size)
        return {"pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                "label": torch.from_numpy(batch.column(LABEL).to_numpy().astype(np.int64)),
                "sample_id": torch.from_numpy(batch.column(SAMPLE_ID).to_numpy().copy())}


def iter_pixel_torch_batches(data_iter, size: int, batch_size: int, *, drop_last: bool = False,
                             prefetch_batches: int = 2, shuffle_buffer: int | None = None,
                             seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from a Ray ``Dataset`` or ``DataIterator`` (e.g. a streaming_split part)."""
    return data_iter.iter_torch_batches(
        batch_size=batch_size, collate_fn=PixelBatchCollate(size), drop_last=drop_last,
        prefetch_batches=prefetch_batches, local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed)
