"""Datasets of any record kind on any store: open, read (verified), write (streamed, resumable), copy, verify.

Written once for every kind: the manifest's metadata names the record format
(``tokray.storage.formats``), which turns tables into shard bytes and back, through the dataset's
shard codec (``RecordFormat.bind``: e.g. context-coded token shards and their model).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa

from tokray.storage.cache import ShardCache
from tokray.storage.formats import LABEL, PARQUET, format_of
from tokray.storage.lmdbstore import LMDBStore
from tokray.storage.manifest import MANIFEST_NAME, PROGRESS_NAME, Manifest, ShardInfo, meta_from_json, meta_to_json
from tokray.storage.stores import ShardChecksumError, Store, open_store, same_location, sha256
from tokray.storage.uri import parse_uri

log = logging.getLogger(__name__)

RESERVED_NAMES = (MANIFEST_NAME, PROGRESS_NAME)


@dataclasses.dataclass(frozen=True)
class CodecStats:
    """What a dataset's shard codec costs and how fast it decodes (``Dataset.codec_stats``)."""

    codec: str  # context | parquet (shards), or lmdb (per-record values)
    format_version: int
    bytes_per_sample: float  # store bytes (manifest and side files included) per sample
    measured_samples: int  # the samples of the shards measured below
    decode_samples_per_s: float  # stored bytes -> Arrow table, per CPU second of one thread (one core)
    units_per_sample: int = 0  # tokens per sample; 0 for kinds not made of symbols (pixels)
    order0_bits: float | None = None  # per token: the bound for coding each token on its own
    stored_bits: float | None = None  # per token: every stored byte (8 * store bytes / tokens)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def stored_meta(meta, scheme: str):
    """``meta`` as a store of URI ``scheme`` keeps it: LMDB holds one value per record (random access),
    never coded shards, so its datasets are Parquet-era format 1 whatever codec was asked for."""
    return format_of(meta).with_codec(meta, PARQUET) if scheme == "lmdb" else meta


class Dataset:
    """A complete dataset (its manifest exists). Every shard read is checked against its sha256."""

    def __init__(self, store: Store, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self.format = format_of(manifest.meta).bind(manifest.meta, self.read_file)

    @property
    def uri(self) -> str:
        return str(self.store.uri)

    @property
    def meta(self):
        return self.manifest.meta

    def __len__(self) -> int:
        return self.manifest.num_samples

    def read_shard(self, i: int, columns: list[str] | None = None) -> pa.Table:
        """Shard ``i``, verified: its digest, then its rows against the manifest (count, sample ids, and what
        the format checks, e.g. ids per sample = the grid and every id < codebook_size)."""
        info = self.manifest.shards[i]
        table = self.store.read_shard(info, self.format, self.meta, columns)
        sids = table.column("sample_id") if "sample_id" in table.column_names else None
        if table.num_rows != info.rows or (sids is not None and table.num_rows and (
                sids[0].as_py() != info.first_sample_id or sids[-1].as_py() != info.last_sample_id)):
            raise ValueError(f"shard {info.path!r} of {self.uri} holds {table.num_rows} rows (sample ids "
                             f"{sids[0].as_py() if sids is not None and len(sids) else '-'}..), but the manifest says "
                             f"{info.rows} ({info.first_sample_id}..{info.last_sample_id}); the manifest was edited or "
                             f"belongs to another dataset: re-create or re-copy it")
        if columns is None:
            try:
                self.format.check_table(self.meta, table)
            except ValueError as e:
                raise ValueError(f"shard {info.path!r} of {self.uri} does not match its manifest: {e}; the manifest "
                                 "was edited or belongs to another dataset: re-create or re-copy it") from None
        return table

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
        want = self.manifest.files[name]["sha256"]
        data = self.store.read_file(self.manifest.files[name].get("path", name), want)
        if data is None:
            raise FileNotFoundError(f"{self.uri}: {name} is in the manifest but missing from the store")
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
            self.get_many([sample_id])  # raises the error that names the remedy
        value = self.store.get_one(sample_id, self.manifest.shards)
        return self.format.payloads_to_numpy(self.meta, [value[4:]])[0], int.from_bytes(value[:4], "little", signed=True)

    def get_many(self, sample_ids) -> dict[str, np.ndarray]:
        """A batch (as ``iter_batches`` yields) of the samples with these ids, in this order, read in one
        LMDB transaction; LMDB stores only."""
        if not isinstance(self.store, LMDBStore):
            raise ValueError(f"random access by sample id needs an LMDB store; {self.uri} is not one. "
                             f"Copy it: `python jobs/dataset.py copy {self.uri} lmdb:///path/to/env`")
        return self.store.get_many(sample_ids, self.manifest.shards, self.format, self.meta)

    @property
    def codec(self) -> str:
        return "lmdb" if isinstance(self.store, LMDBStore) else self.format.codec(self.meta)

    def codec_stats(self, max_shards: int | None = None, repeats: int = 3) -> CodecStats:
        """Bits and decode speed of the dataset's codec, measured on its first ``max_shards`` shards (None:
        all): decode = the verified stored bytes to the Arrow table, best of ``repeats``, CPU time of this
        thread (LMDB: the records' scan too)."""
        m = self.manifest
        shards = range(len(m.shards) if max_shards is None else min(max_shards, len(m.shards)))
        tables, cpu = [], 0.0
        for i in shards:
            info = m.shards[i]
            if isinstance(self.store, LMDBStore):
                decode = functools.partial(self.store.read_shard, info, self.format, self.meta)
            else:
                decode = functools.partial(self.format.decode_shard, self.store.read_shard_bytes(info))
            tables.append(decode())  # the first decode also builds the codec's tables
            best = float("inf")
            for _ in range(repeats):
                t0 = time.thread_time()
                decode()
                best = min(best, time.thread_time() - t0)
            cpu += best
        rows = sum(t.num_rows for t in tables)
        units = self.format.unit_stats(self.meta, tables)
        total_units = m.num_samples * units[0] if units else 0
        return CodecStats(codec=self.codec, format_version=self.format.format_version(self.meta),
                          bytes_per_sample=m.store_bytes / max(1, m.num_samples), measured_samples=rows,
                          decode_samples_per_s=rows / cpu if cpu > 0 else 0.0,
                          units_per_sample=units[0] if units else 0,
                          order0_bits=units[1] if units and rows else None,
                          stored_bits=8 * m.store_bytes / total_units if total_units else None)

    def verify(self, on_shard=None) -> list[str]:
        """Check every shard; return one line per problem (empty when the dataset is intact)."""
        problems = []
        for i, info in enumerate(self.manifest.shards):
            if on_shard:
                on_shard()
            try:
                self.read_shard(i)
            except ShardChecksumError as e:
                problems.append(f"{info.path}: sha256 mismatch ({e})")
            except FileNotFoundError:
                problems.append(f"{info.path}: missing from the store")
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{info.path}: unreadable ({type(e).__name__}: {e})")
            except ValueError as e:
                problems.append(f"{info.path}: {e}")
        return problems


def open_dataset(uri, cache: ShardCache | None | bool = None) -> Dataset:
    """The complete dataset at ``uri``, of any record kind (tokens, pixels). ``cache``: for remote stores,
    a ShardCache, None (the node's) or False (read the store itself, e.g. to verify it)."""
    store = open_store(uri, cache=cache)
    store.check(for_write=False)
    data = store.read_meta(MANIFEST_NAME)
    if data is None:
        store.confirm_location()  # e.g. a missing bucket, named as such
        partial = store.read_meta(PROGRESS_NAME) is not None
        why = ("an interrupted write is there (no manifest yet); rerun the same command to resume it"
               if partial else "no manifest.json there")
        raise FileNotFoundError(
            f"no complete dataset at {store.uri}: {why}. Create one with "
            f"`python jobs/dataset.py synth {store.uri}` or copy one there with `python jobs/dataset.py copy`.")
    return Dataset(store, Manifest.loads(data, str(store.uri)))


class DatasetWriter:
    """Streams records into shards of ``meta.shard_rows`` rows; the manifest is written last.

    ``meta`` (TokenMeta, PixelMeta, ...) fixes the record format and its shard codec. Memory is one
    shard's rows; a codec with a model (tokens: ``context``) first holds back the rows it is fitted on
    (``fit_rows``: the first ~4 M tokens), fits it, stores it as a side file, then writes them. Each
    finished shard is recorded in ``_progress.json``; a rerun with the same meta skips shards that
    are already on the store with the right digest (``shard_done``) and codes the rest with the model
    stored before them, so callers can also skip producing them. ``overwrite`` clears whatever is
    there first: a complete dataset or an interrupted write. Use as a context manager: an exception
    leaves the progress (for resume) and no manifest.
    """

    def __init__(self, uri, meta, overwrite: bool = False, store: Store | None = None, source: str = ""):
        """``source``: what the records come from (e.g. the source manifest's digest): a rerun that
        would resume an interrupted write from another source is refused, naming both."""
        self.store = store if store is not None else open_store(uri)
        self.meta = stored_meta(meta, self.store.uri.scheme)
        self.format = format_of(self.meta)  # bound to the codec's files once they exist (_bind_codec)
        self.source = source
        self.store.check(for_write=True)
        self._lock = self.store.writer_lock()
        self._lock.__enter__()  # held until commit, or until the with-block ends
        self._final: Store | None = None  # the location a replacing write swaps into at commit
        self._replaced_files: list[str] = []  # side files of the dataset a replacing write supersedes
        try:
            self._prepare_destination(overwrite)
            self.files: dict[str, dict] = {}
            self.done: dict[int, ShardInfo] = self._resumable_shards()
        except BaseException:
            self._release()
            raise
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._next = 0
        self._held: dict[int, pa.Table] = {}  # shards waiting for the codec to be fitted
        self._file_data: dict[str, bytes] = {}  # codec files this writer stored
        self._bound = False
        self._bind_codec()
        self.manifest: Manifest | None = None  # set by close()
        if self.done:
            log.info("resuming the write to %s: %d shards already present and intact",
                     self.store.uri, len(self.done))

    def _prepare_destination(self, overwrite: bool) -> None:
        """Refuse an existing dataset without ``overwrite``; with it, write the new one beside the old one
        (file stores: a new generation folder; LMDB: a staging environment), which stays readable and whole
        until the new manifest lands."""
        complete = self.store.read_meta(MANIFEST_NAME) is not None
        if hasattr(self.store, "remove_temp_files"):
            self.store.remove_temp_files()
        if not overwrite:
            if complete:
                raise FileExistsError(f"a dataset already exists at {self.store.uri}; choose another "
                                      "destination or pass --overwrite to replace it")
            return
        if not complete:
            if self.store.exists():
                self.store.clear()  # only an interrupted write there: nothing to keep
            return
        self.store.delete_meta(PROGRESS_NAME)  # an earlier interrupted replacement: start over
        if isinstance(self.store, LMDBStore):
            self._final = self.store
            self.store = LMDBStore(parse_uri(f"lmdb://{self.store.uri.path}.staging-{uuid.uuid4().hex[:8]}"))
            self.store.check(for_write=True)
        else:
            self._replaced_files = _side_file_paths(self.store.read_meta(MANIFEST_NAME))
            self.store.new_generation()

    def discard(self) -> None:
        """Drop what this write stored (a replaced dataset stays as it was) and release the destination."""
        self._held = {}
        if self._final is not None:
            self.store.close()
            shutil.rmtree(self.store.uri.path, ignore_errors=True)
        elif self.store.generation:
            for info in self.done.values():
                self.store.delete_shard(info)
            for f in self.files.values():
                self.store.delete_meta(f.get("path", ""))
            self.store.delete_meta(PROGRESS_NAME)
        else:
            self.store.clear()
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def _resumable_shards(self) -> dict[int, ShardInfo]:
        data = self.store.read_meta(PROGRESS_NAME)
        if data is None:
            return {}
        progress = json.loads(data)
        previous_source = progress.get("source", "")
        if self.source and previous_source and previous_source != self.source:
            raise ValueError(
                f"{self.store.uri} holds an interrupted write from another source ({previous_source}; this run reads "
                f"{self.source}); rerun with the first source to resume it, or --overwrite to start over")
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
        try:
            if exc_type is None:
                self.close()
        finally:
            self._release()

    def shard_done(self, index: int) -> bool:
        return index in self.done

    def add_file(self, name: str, data: bytes) -> None:
        """Store a side file (e.g. a codebook) with the dataset; listed and digested in the manifest.

        A codec file (``codec_files``, e.g. another dataset's context model, carried along by a loop over
        its side files) is not taken: this writer fits its own to the rows it writes."""
        if name in RESERVED_NAMES or name.endswith(".parquet") or "/" in name or name.startswith(("g-", "_", ".")):
            raise ValueError(f"side file name {name!r} is reserved or not a plain name")
        if name in self.format.codec_files(self.meta):
            log.debug("not taking %s for %s: the writer fits the codec's own", name, self.store.uri)
            return
        self._store_file(name, data)

    def _store_file(self, name: str, data: bytes) -> None:
        path = self.store.object_name(name)
        self.store.write_meta(path, data)
        self.files[name] = {"bytes": len(data), "sha256": sha256(data), **({"path": path} if path != name else {})}
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

    def write_shard(self, index: int, *columns) -> ShardInfo | None:
        """Write shard ``index`` from the format's columns (skipped when already there, intact; see
        ``write_shard_table``)."""
        return self.write_shard_table(index, self.format.records_to_table(self.meta, *columns))

    def write_shard_table(self, index: int, table: pa.Table) -> ShardInfo | None:
        """Write shard ``index`` (skipped when the same rows are already there, intact). None while the
        shard is held for fitting the codec (it is written once the model is stored, at the latest by
        ``finish``)."""
        prev = self.done.get(index)
        sids = table.column("sample_id")
        if prev and prev.rows == table.num_rows and table.num_rows and \
                prev.first_sample_id == sids[0].as_py() and prev.last_sample_id == sids[-1].as_py():
            return prev
        self.format.check_table(self.meta, table)
        if not self._bound:
            if not self._held:  # the settings are on the store from the first rows on, as with a written shard
                self._save_progress()
            self._held[index] = table.combine_chunks()
            if sum(t.num_rows for t in self._held.values()) >= self.format.fit_rows(self.meta):
                self._fit_codec()
            return None
        return self._put_shard(index, table)

    def _put_shard(self, index: int, table: pa.Table) -> ShardInfo:
        info = self.store.write_shard(index, table.combine_chunks(), self.format)
        self.done[index] = info
        self._save_progress()
        return info

    def _bind_codec(self) -> None:
        """Code shards through the codec once its files are stored (fitted now, or by an interrupted write)."""
        names = self.format.codec_files(self.meta)
        if not self._bound and all(n in self.files for n in names):
            self.format = self.format.bind(self.meta, self._codec_file)
            self._bound = True

    def _codec_file(self, name: str) -> bytes:
        if name in self._file_data:
            return self._file_data[name]
        info = self.files[name]
        data = self.store.read_meta(info.get("path", name))
        if data is None or sha256(data) != info["sha256"]:  # a resumed write codes on with what is stored
            raise ValueError(f"{self.store.uri}: the interrupted write's {name} is missing or damaged, and the "
                             "shards already written were coded with it; rerun with --overwrite to start over")
        return data

    def _fit_codec(self) -> None:
        """Fit the codec to the held shards (in index order), store its files, then write the shards."""
        held = [self._held[i] for i in sorted(self._held)]
        t0 = time.perf_counter()
        for name, data in self.format.fit_codec(self.meta, held).items():
            self._file_data[name] = data
            self._store_file(name, data)
        log.info("fitted the %s codec of %s on its first %d rows in %.1f s", self.format.codec(self.meta),
                 self.store.uri, min(sum(t.num_rows for t in held), self.format.fit_rows(self.meta)),
                 time.perf_counter() - t0)
        self._bind_codec()
        held, self._held = self._held, {}
        for i in sorted(held):
            self._put_shard(i, held[i])

    def _save_progress(self) -> None:
        progress = {"meta": meta_to_json(self.meta), "source": self.source, "files": self.files,
                    "shards": {str(i): dataclasses.asdict(s) for i, s in sorted(self.done.items())}}
        self.store.write_meta(PROGRESS_NAME, json.dumps(progress).encode())

    def finish(self, num_shards: int | None = None) -> Manifest:
        """Flush the last shard and return the manifest that ``commit`` would write.

        ``num_shards`` (default: as many as ``write`` produced) is how many shards this write
        has; shards beyond it, left by an earlier, longer interrupted write, are removed.
        """
        if self._buffered:
            self._flush(self._buffered)
        if self._held:  # fewer rows than the codec would fit on: fit on all of them
            self._fit_codec()
        if num_shards is None:
            num_shards = self._next if self._next else max(self.done, default=-1) + 1
        for i in [i for i in self.done if i >= num_shards]:
            self.store.delete_shard(self.done.pop(i))
        indices = sorted(self.done)
        if indices != list(range(len(indices))):
            raise ValueError(f"shards {indices} are not contiguous from 0; the write to {self.store.uri} is incomplete")
        shards = tuple(self.done[i] for i in indices)
        if not sum(s.rows for s in shards):  # an empty dataset trains nothing and would loop over empty epochs
            raise ValueError(f"no samples were written to {self.store.uri}; nothing to commit (check the source)")
        manifest = Manifest(meta=self.meta, num_samples=sum(s.rows for s in shards), shards=shards,
                            files=dict(self.files))
        return manifest.with_store_bytes(self.store.overhead_bytes(shards))

    def commit(self, manifest: Manifest) -> Manifest:
        replacing = self._final is not None or bool(self.store.generation)
        if replacing:  # the new dataset must be whole before it replaces the old one
            for info in manifest.shards:
                self.store.check_shard(info)
        self.store.write_meta(MANIFEST_NAME, manifest.dumps())  # last: only now is the dataset complete
        self.store.delete_meta(PROGRESS_NAME)
        for _ in range(5):  # report what the store really holds (LMDB pages move as the manifest lands)
            actual = self.store.measured_bytes(manifest)
            if actual == manifest.store_bytes:
                break
            manifest = dataclasses.replace(manifest, store_bytes=actual)
            self.store.write_meta(MANIFEST_NAME, manifest.dumps())
        self.store.close()
        if self._final is not None:
            swap_in(self.store, self._final)
            self.store = self._final
        elif replacing:
            self.store.remove_unreferenced(manifest)  # the old generation, after the commit point
            keep = set(_side_file_paths(manifest.dumps()))
            for path in self._replaced_files:  # e.g. the old model, named only by the old manifest
                if path not in keep:
                    self.store.delete_meta(path)
        self._release()
        self.manifest = manifest
        log.info("wrote %s: %d samples in %d shards, %d bytes on the store",
                 self.store.uri, manifest.num_samples, len(manifest.shards), manifest.store_bytes)
        return manifest

    def close(self, num_shards: int | None = None) -> Manifest:
        return self.manifest if self.manifest is not None else self.commit(self.finish(num_shards))


def _side_file_paths(manifest_bytes: bytes | None) -> list[str]:
    try:
        files = json.loads(manifest_bytes or b"{}").get("files", {})
        return [f.get("path", name) for name, f in files.items()]
    except (ValueError, AttributeError):  # a damaged manifest being replaced: nothing to name
        return []


def swap_in(staged: LMDBStore, final: LMDBStore) -> None:
    """Replace the environment at ``final`` by the complete one at ``staged`` (two renames)."""
    old = f"{final.uri.path}.old-{uuid.uuid4().hex[:8]}"
    final.close()
    os.rename(final.uri.path, old)
    os.rename(staged.uri.path, final.uri.path)
    shutil.rmtree(old, ignore_errors=True)


def manifest_digest(ds: Dataset) -> str:
    """The identity of a dataset's content: the digest of its manifest."""
    return "manifest:" + sha256(ds.manifest.dumps())[:16]


def refuse_same_location(src: Dataset, dst) -> None:
    if same_location(src.store.uri, parse_uri(dst)):
        raise ValueError(f"source and destination are the same dataset ({src.uri}); choose another destination "
                         "(--overwrite would replace the source while reading it)")


def carry_side_files(source: Dataset, writer: DatasetWriter) -> None:
    """The source's side files into ``writer``, except its codec's (the writer fits its own)."""
    own = source.format.codec_files(source.meta)
    for name in source.manifest.files:
        if name not in own:
            writer.add_file(name, source.read_file(name))


def copy_dataset(src, dst, overwrite: bool = False, progress=None, codec: str | None = None) -> Manifest:
    """Copy shard by shard between any two stores, verifying every shard read. ``codec``: of the copy's
    shards (tokens: context | parquet; None: the default for new datasets); the ids, labels and sample
    ids stay the same."""
    source = open_dataset(src)
    refuse_same_location(source, dst)
    meta = source.format.with_codec(source.meta, codec)
    with DatasetWriter(dst, meta, overwrite=overwrite, source=manifest_digest(source)) as writer:
        carry_side_files(source, writer)
        for i in range(len(source.manifest.shards)):
            if not writer.shard_done(i):
                writer.write_shard_table(i, source.read_shard(i))
            if progress:
                progress(1)
        return writer.close(num_shards=len(source.manifest.shards))
