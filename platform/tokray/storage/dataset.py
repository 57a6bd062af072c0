"""Datasets of any record kind on any store: open, read (verified), write (streamed, resumable), copy, verify.

Written once for every kind: the manifest's metadata names the record format
(``tokray.storage.formats``), which turns tables into shard bytes and back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa

from tokray.storage.cache import ShardCache
from tokray.storage.formats import LABEL, format_of
from tokray.storage.lmdbstore import LMDBStore
from tokray.storage.manifest import MANIFEST_NAME, PROGRESS_NAME, Manifest, ShardInfo, meta_from_json, meta_to_json
from tokray.storage.stores import ShardChecksumError, Store, open_store, sha256

log = logging.getLogger(__name__)

RESERVED_NAMES = (MANIFEST_NAME, PROGRESS_NAME)


class Dataset:
    """A complete dataset (its manifest exists). Every shard read is checked against its sha256."""

    def __init__(self, store: Store, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self.format = format_of(manifest.meta)

    @property
    def uri(self) -> str:
        return str(self.store.uri)

    @property
    def meta(self):
        return self.manifest.meta

    def __len__(self) -> int:
        return self.manifest.num_samples

    def read_shard(self, i: int, columns: list[str] | None = None) -> pa.Table:
        return self.store.read_shard(self.manifest.shards[i], self.format, self.meta, columns)

    def iter_tables(self, shard_indices=None) -> Iterator[pa.Table]:
        for i in (range(len(self.manifest.shards)) if shard_indices is None else shard_indices):
            yield self.read_shard(i)

    def iter_batches(self, batch_size: int = 1024) -> Iterator[dict[str, np.ndarray]]:
        """Plain in-process iterator of numpy dicts: tokens {ids [B, h, w] uint16, label, sample_id},
        pixels {pixels [B, s, s, 3] uint8, label, sample_id}."""
        for table in self.iter_tables():
            for start in range(0, table.num_rows, batch_size):
                yield self.format.to_numpy(self.meta, table.slice(start, batch_size))

    def read_file(self, name: str) -> bytes:
        """A side file of the dataset (e.g. its codebook), checked against its recorded sha256."""
        if name not in self.manifest.files:
            raise FileNotFoundError(f"{self.uri} has no file {name!r}; it has: {sorted(self.manifest.files) or 'none'}")
        data = self.store.read_meta(name)
        if data is None:
            raise FileNotFoundError(f"{self.uri}: {name} is in the manifest but missing from the store")
        want = self.manifest.files[name]["sha256"]
        if sha256(data) != want:
            raise ShardChecksumError(self.uri, name, want, sha256(data))
        return data

    def labels(self) -> np.ndarray:
        return np.concatenate([self.read_shard(i, [LABEL]).column(LABEL).to_numpy()
                               for i in range(len(self.manifest.shards))])

    def get(self, sample_id: int) -> tuple[np.ndarray, int]:
        """(payload, label) of one sample: tokens (ids [h, w], label), pixels (uint8 [s, s, 3], label);
        LMDB stores only."""
        if not isinstance(self.store, LMDBStore):
            raise ValueError(f"random access by sample id needs an LMDB store; {self.uri} is not one. "
                             f"Copy it: `python jobs/dataset.py copy {self.uri} lmdb:///path/to/env`")
        one = self.store.get(sample_id, self.manifest.shards, self.format, self.meta)
        return one[self.format.payload_key][0], int(one[LABEL][0])

    def verify(self, on_shard=None) -> list[str]:
        """Check every shard; return one line per problem (empty when the dataset is intact)."""
        problems = []
        for info in self.manifest.shards:
            if on_shard:
                on_shard()
            try:
                table = self.store.read_shard(info, self.format, self.meta)
                if table.num_rows != info.rows:
                    problems.append(f"{info.path}: {table.num_rows} rows, manifest says {info.rows}")
            except ShardChecksumError as e:
                problems.append(f"{info.path}: sha256 mismatch ({e})")
            except FileNotFoundError:
                problems.append(f"{info.path}: missing from the store")
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{info.path}: unreadable ({type(e).__name__}: {e})")
        return problems


def open_dataset(uri, cache: ShardCache | None = None) -> Dataset:
    """The complete dataset at ``uri``, of any record kind (tokens, pixels)."""
    store = open_store(uri, cache=cache)
    store.check(for_write=False)
    data = store.read_meta(MANIFEST_NAME)
    if data is None:
        partial = store.read_meta(PROGRESS_NAME) is not None
        why = ("an interrupted write is there (no manifest yet); rerun the same command to resume it"
               if partial else "no manifest.json there")
        raise FileNotFoundError(
            f"no complete dataset at {store.uri}: {why}. Create one with "
            f"`python jobs/dataset.py synth {store.uri}` or copy one there with `python jobs/dataset.py copy`.")
    return Dataset(store, Manifest.loads(data, str(store.uri)))


class DatasetWriter:
    """Streams records into shards of ``meta.shard_rows`` rows; the manifest is written last.

    ``meta`` (TokenMeta, PixelMeta, ...) fixes the record format. Memory is one shard's rows. Each
    finished shard is recorded in ``_progress.json``; a rerun with the same meta skips shards that
    are already on the store with the right digest (``shard_done``), so callers can also skip
    producing them. ``overwrite`` clears whatever is there first: a complete dataset or an
    interrupted write. Use as a context manager: an exception leaves the progress (for resume) and
    no manifest.
    """

    def __init__(self, uri, meta, overwrite: bool = False, store: Store | None = None):
        self.store = store if store is not None else open_store(uri)
        self.meta = meta
        self.format = format_of(meta)
        self.store.check(for_write=True)
        if overwrite and self.store.exists():
            self.store.clear()
        elif self.store.read_meta(MANIFEST_NAME) is not None:
            raise FileExistsError(f"a dataset already exists at {self.store.uri}; choose another "
                                  "destination or pass --overwrite to replace it")
        self.files: dict[str, dict] = {}
        self.done: dict[int, ShardInfo] = self._resumable_shards()
        self._buf: list[pa.Table] = []
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
        previous = meta_from_json(progress["meta"], str(self.store.uri))
        if previous != self.meta or type(previous) is not type(self.meta):
            raise ValueError(
                f"{self.store.uri} holds an interrupted write with other settings ({meta_to_json(previous)} vs "
                f"{meta_to_json(self.meta)}); rerun with the same settings to resume, or --overwrite to start over")
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
        if name in RESERVED_NAMES or name.endswith(".parquet") or "/" in name:
            raise ValueError(f"side file name {name!r} is reserved or not a plain name")
        self.store.write_meta(name, data)
        self.files[name] = {"bytes": len(data), "sha256": sha256(data)}
        self._save_progress()

    def write(self, *columns) -> None:
        """Append records (the format's columns, e.g. ids, labels, sample ids) in order."""
        self.write_table(self.format.records_to_table(self.meta, *columns))

    def write_table(self, table: pa.Table) -> None:
        """Append a table of the format's schema in order; full shards are flushed as they fill."""
        self._buf.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.meta.shard_rows:
            self._flush(self.meta.shard_rows)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._buf) if len(self._buf) > 1 else self._buf[0]
        head, tail = table.slice(0, rows), table.slice(rows)
        self._buf = [tail] if tail.num_rows else []
        self._buffered = tail.num_rows
        self.write_shard_table(self._next, head)
        self._next += 1

    def write_shard(self, index: int, *columns) -> ShardInfo:
        """Write shard ``index`` from the format's columns (skipped when already there, intact)."""
        return self.write_shard_table(index, self.format.records_to_table(self.meta, *columns))

    def write_shard_table(self, index: int, table: pa.Table) -> ShardInfo:
        """Write shard ``index`` (skipped when the same rows are already there, intact)."""
        prev = self.done.get(index)
        sids = table.column("sample_id")
        if prev and prev.rows == table.num_rows and table.num_rows and \
                prev.first_sample_id == sids[0].as_py() and prev.last_sample_id == sids[-1].as_py():
            return prev
        self.format.check_table(self.meta, table)
        info = self.store.write_shard(index, table.combine_chunks(), self.format)
        self.done[index] = info
        self._save_progress()
        return info

    def _save_progress(self) -> None:
        progress = {"meta": meta_to_json(self.meta), "files": self.files,
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
                writer.write_shard_table(i, source.read_shard(i))
            if progress:
                progress(1)
        return writer.close(num_shards=len(source.manifest.shards))
