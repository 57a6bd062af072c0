"""Token datasets on any store: open, read (verified), write (streamed, resumable), copy, verify."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa

from tokray.storage import codec
from tokray.storage.cache import ShardCache
from tokray.storage.manifest import MANIFEST_NAME, PROGRESS_NAME, DatasetMeta, Manifest, ShardInfo
from tokray.storage.stores import LMDBStore, ShardChecksumError, Store, open_store

log = logging.getLogger(__name__)


class ShardedDataset:
    """A complete dataset on a store (its manifest exists): token datasets here, pixel datasets in
    tokray.data.pixels. Subclasses read (and verify) one shard in ``read_shard``."""

    def __init__(self, store: Store, manifest):
        self.store = store
        self.manifest = manifest

    @property
    def uri(self) -> str:
        return str(self.store.uri)

    def __len__(self) -> int:
        return self.manifest.num_samples

    def iter_tables(self, shard_indices=None) -> Iterator[pa.Table]:
        for i in (range(len(self.manifest.shards)) if shard_indices is None else shard_indices):
            yield self.read_shard(i)


class TokenDataset(ShardedDataset):
    """A complete token dataset. Every shard read is checked against its sha256."""

    @property
    def meta(self) -> DatasetMeta:
        return self.manifest.meta

    def read_shard(self, i: int, columns: list[str] | None = None) -> pa.Table:
        return self.store.read_shard(self.manifest.shards[i], columns)

    def iter_batches(self, batch_size: int = 1024) -> Iterator[dict[str, np.ndarray]]:
        """Plain in-process iterator of numpy dicts {ids [B, h, w] uint16, label, sample_id}."""
        h, w = self.meta.grid
        for table in self.iter_tables():
            for start in range(0, table.num_rows, batch_size):
                b = codec.table_to_numpy(table.slice(start, batch_size))
                b[codec.IDS] = b[codec.IDS].reshape(-1, h, w)
                yield b

    def read_file(self, name: str) -> bytes:
        """A side file of the dataset (e.g. its codebook), checked against its recorded sha256."""
        if name not in self.manifest.files:
            raise FileNotFoundError(f"{self.uri} has no file {name!r}; it has: {sorted(self.manifest.files) or 'none'}")
        data = self.store.read_meta(name)
        if data is None:
            raise FileNotFoundError(f"{self.uri}: {name} is in the manifest but missing from the store")
        want = self.manifest.files[name]["sha256"]
        if codec.sha256(data) != want:
            raise ShardChecksumError(self.uri, name, want, codec.sha256(data))
        return data

    def labels(self) -> np.ndarray:
        return np.concatenate([t.column(codec.LABEL).to_numpy() for t in
                               (self.read_shard(i, [codec.LABEL]) for i in range(len(self.manifest.shards)))])

    def get(self, sample_id: int) -> tuple[np.ndarray, int]:
        """(ids [h, w], label) of one sample; LMDB stores only."""
        if not isinstance(self.store, LMDBStore):
            raise ValueError(f"random access by sample id needs an LMDB store; {self.uri} is not one. "
                             f"Copy it: `python jobs/dataset.py copy {self.uri} lmdb:///path/to/env`")
        ids, label = self.store.get(sample_id, self.manifest.shards)
        return ids.reshape(self.meta.grid), label

    def verify(self, on_shard=None) -> list[str]:
        """Check every shard; return one line per problem (empty when the dataset is intact)."""
        problems = []
        for info in self.manifest.shards:
            if on_shard:
                on_shard()
            try:
                table = self.store.read_shard(info)
                if table.num_rows != info.rows:
                    problems.append(f"{info.path}: {table.num_rows} rows, manifest says {info.rows}")
            except ShardChecksumError as e:
                problems.append(f"{info.path}: sha256 mismatch ({e})")
            except FileNotFoundError:
                problems.append(f"{info.path}: missing from the store")
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{info.path}: unreadable ({type(e).__name__}: {e})")
        return problems


def open_dataset(uri, cache: ShardCache | None = None) -> TokenDataset:
    store = open_store(uri, cache=cache)
    store.check(for_write=False)
    data = store.read_meta(MANIFEST_NAME)
    if data is None:
        partial = store.read_meta(PROGRESS_NAME) is not None
        why = ("an interrupted write is there (no manifest yet); rerun the same command to resume it"
               if partial else "no manifest.json there")
        raise FileNotFoundError(
            f"no complete token dataset at {store.uri}: {why}. Create one with "
            f"`python jobs/dataset.py synth {store.uri}` or copy one there with `python jobs/dataset.py copy`.")
    return TokenDataset(store, Manifest.loads(data, str(store.uri)))


class DatasetWriter:
    """Streams records into shards of ``meta.shard_rows`` rows; the manifest is written last.

    Memory is one shard's rows. Each finished shard is recorded in ``_progress.json``; a rerun
    with the same meta skips shards that are already on the store with the right digest
    (``shard_done``), so callers can also skip producing them. Use as a context manager: an
    exception leaves the progress (for resume) and no manifest.
    """

    def __init__(self, uri, meta: DatasetMeta, overwrite: bool = False, store: Store | None = None):
        self.store = store if store is not None else open_store(uri)
        self.meta = meta
        self.store.check(for_write=True)
        if self.store.read_meta(MANIFEST_NAME) is not None:
            if not overwrite:
                raise FileExistsError(f"a dataset already exists at {self.store.uri}; choose another "
                                      "destination or pass --overwrite to replace it")
            self.store.clear()
        self.files: dict[str, dict] = {}
        self.done: dict[int, ShardInfo] = self._resumable_shards()
        self._buf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._next = 0
        self.manifest: Manifest | None = None  # set by close()
        if self.done:
            log.info("resuming the write to %s: %d shards already present and intact",
                     self.store.uri, len(self.done))

    def _resumable_shards(self) -> dict[int, ShardInfo]:
        data = self.store.read_meta(PROGRESS_NAME)
        if data is None:
            return {}
        progress = json.loads(data)
        self.files = dict(progress.get("files", {}))
        previous = DatasetMeta.from_json(progress["meta"])
        if previous != self.meta:
            raise ValueError(
                f"{self.store.uri} holds an interrupted write with other settings ({previous.to_json()} vs "
                f"{self.meta.to_json()}); rerun with the same settings to resume, or --overwrite to start over")
        done = {}
        for i, s in progress["shards"].items():
            info = ShardInfo(**s)
            if self.store.shard_intact(info):
                done[int(i)] = info
            else:
                log.warning("shard %s from the interrupted write is damaged; it will be rewritten", info.path)
        return done

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()

    def shard_done(self, index: int) -> bool:
        return index in self.done

    def add_file(self, name: str, data: bytes) -> None:
        """Store a side file (e.g. a codebook) with the dataset; listed and digested in the manifest."""
        if name in ("manifest.json", "_progress.json") or name.endswith(".parquet") or "/" in name:
            raise ValueError(f"side file name {name!r} is reserved or not a plain name")
        self.store.write_meta(name, data)
        self.files[name] = {"bytes": len(data), "sha256": codec.sha256(data)}
        self._save_progress()

    def write(self, ids: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray) -> None:
        """Append records in order; full shards are flushed as they fill."""
        self._buf.append((np.asarray(ids), np.asarray(labels), np.asarray(sample_ids)))
        self._buffered += len(ids)
        while self._buffered >= self.meta.shard_rows:
            self._flush(self.meta.shard_rows)

    def _flush(self, rows: int) -> None:
        parts = [np.concatenate(x) for x in zip(*self._buf)]
        head, tail = [p[:rows] for p in parts], [p[rows:] for p in parts]
        self._buf = [tuple(tail)] if len(tail[0]) else []
        self._buffered = len(tail[0])
        self.write_shard(self._next, *head)
        self._next += 1

    def write_shard(self, index: int, ids, labels, sample_ids) -> ShardInfo:
        """Write shard ``index`` (skipped when the same rows are already there, intact)."""
        prev = self.done.get(index)
        sids = np.asarray(sample_ids)
        if prev and prev.rows == len(sids) and prev.first_sample_id == sids[0] and prev.last_sample_id == sids[-1]:
            return prev
        if self.meta.codebook_size <= int(np.max(ids)):
            raise ValueError(f"token id {int(np.max(ids))} is outside the codebook (size {self.meta.codebook_size})")
        info = self.store.write_shard(index, codec.records_to_table(ids, labels, sids))
        self.done[index] = info
        self._save_progress()
        return info

    def _save_progress(self) -> None:
        progress = {"meta": self.meta.to_json(), "files": self.files,
                    "shards": {str(i): dataclasses.asdict(s) for i, s in sorted(self.done.items())}}
        self.store.write_meta(PROGRESS_NAME, json.dumps(progress).encode())

    def finish(self, num_shards: int | None = None) -> Manifest:
        """Flush the last shard and return the manifest that ``commit`` would write.

        ``num_shards`` (default: as many as ``write`` produced) is how many shards this write
        has; shards beyond it, left by an earlier, longer interrupted write, are removed.
        """
        if self._buffered:
            self._flush(self._buffered)
        if num_shards is None:
            num_shards = self._next if self._next else max(self.done, default=-1) + 1
        for i in [i for i in self.done if i >= num_shards]:
            self.store.delete_shard(self.done.pop(i))
        indices = sorted(self.done)
        if indices != list(range(len(indices))):
            raise ValueError(f"shards {indices} are not contiguous from 0; the write to {self.store.uri} is incomplete")
        shards = tuple(self.done[i] for i in indices)
        manifest = Manifest(meta=self.meta, num_samples=sum(s.rows for s in shards), shards=shards,
                            files=dict(self.files))
        return manifest.with_store_bytes(self.store.overhead_bytes(shards))

    def commit(self, manifest: Manifest) -> Manifest:
        self.store.write_meta(MANIFEST_NAME, manifest.dumps())  # last: only now is the dataset complete
        self.store.delete_meta(PROGRESS_NAME)
        for _ in range(5):  # report what the store really holds (LMDB pages move as the manifest lands)
            actual = self.store.measured_bytes(manifest)
            if actual == manifest.store_bytes:
                break
            manifest = dataclasses.replace(manifest, store_bytes=actual)
            self.store.write_meta(MANIFEST_NAME, manifest.dumps())
        self.store.close()
        self.manifest = manifest
        log.info("wrote %s: %d samples in %d shards, %d bytes on the store",
                 self.store.uri, manifest.num_samples, len(manifest.shards), manifest.store_bytes)
        return manifest

    def close(self, num_shards: int | None = None) -> Manifest:
        return self.manifest if self.manifest is not None else self.commit(self.finish(num_shards))


def copy_dataset(src, dst, overwrite: bool = False, progress=None) -> Manifest:
    """Copy shard by shard between any two stores, verifying every shard read."""
    source = open_dataset(src)
    with DatasetWriter(dst, source.meta, overwrite=overwrite) as writer:
        for name in source.manifest.files:
            writer.add_file(name, source.read_file(name))
        for i in range(len(source.manifest.shards)):
            if not writer.shard_done(i):
                b = codec.table_to_numpy(source.read_shard(i))
                writer.write_shard(i, b[codec.IDS], b[codec.LABEL], b[codec.SAMPLE_ID])
            if progress:
                progress(1)
        return writer.close(num_shards=len(source.manifest.shards))
