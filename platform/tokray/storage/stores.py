"""Where bytes live: one shard-level API over a local directory, an S3 prefix, an LMDB env (and memory).

Backends move bytes only: a file store (local, S3, memory) holds ``manifest.json`` plus shard
files whose bytes the record format produced; an LMDB env holds the same records keyed by sample
id (for random access) in logical shards, each one write transaction over a key range whose
digest covers its keys and values in key order. The record format (``tokray.storage.formats``)
turns tables into bytes; a store never looks inside them.

A new backend is one module holding a ``Store`` subclass plus one line in ``BACKENDS`` (and, for a
new URI scheme, one in ``tokray.storage.uri.SCHEMES``).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import importlib
import json
import uuid

import pyarrow as pa

from tokray.storage.manifest import MANIFEST_NAME, PROGRESS_NAME, ShardInfo
from tokray.storage.uri import StoreURI, parse_uri

VERIFY_HINT = "python jobs/dataset.py verify {uri}"

# URI scheme -> "module:class" of its backend (imported on first use)
BACKENDS = {"local": "tokray.storage.local:LocalStore",
            "s3": "tokray.storage.s3:S3Store",
            "lmdb": "tokray.storage.lmdbstore:LMDBStore"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ShardChecksumError(ValueError):
    """A shard's bytes do not match the digest its manifest recorded."""

    def __init__(self, uri: str, shard: str, expected: str, actual: str):
        self.uri, self.shard, self.expected, self.actual = uri, shard, expected, actual
        super().__init__(
            f"shard {shard!r} of {uri} is corrupt: sha256 expected {expected}, got {actual}. "
            f"It was not used. Check the whole dataset with `{VERIFY_HINT.format(uri=uri)}` and "
            "re-copy or re-create the bad shards.")

    def __reduce__(self):  # crosses process boundaries (Ray read tasks) intact
        return type(self), (self.uri, self.shard, self.expected, self.actual)


class StoreUnavailableError(ConnectionError):
    """The store cannot be reached or is misconfigured (endpoint, credentials)."""


class StoreWriteError(ValueError):
    """The store refused a write: disk full, read-only, no permission. Nothing partial is left behind."""


class WriterLockedError(ValueError):
    """Another writer holds the destination."""


_WRITE_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the filesystem is read-only",
                 errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}


def write_error(uri, name: str, e: OSError) -> StoreWriteError:
    """One clear line for a failed write (what failed, why, what to do)."""
    why = _WRITE_FAULTS.get(e.errno, f"{type(e).__name__}: {e}")
    return StoreWriteError(f"cannot write {name} to {uri}: {why}; free space or fix the permissions, or choose "
                           "another destination, then rerun the same command (finished shards are kept)")


def same_location(a: StoreURI, b: StoreURI) -> bool:
    return (a.scheme, a.bucket, a.path.rstrip("/")) == (b.scheme, b.bucket, b.path.rstrip("/"))


def shard_name(index: int, scheme: str) -> str:
    return f"records-{index:05d}" if scheme == "lmdb" else f"shard-{index:05d}.parquet"


class Store(abc.ABC):
    """Common API; ``open_store`` picks the implementation from the URI."""

    uri: StoreURI
    generation = ""  # file stores: the folder new objects go to (see FileStore)

    def object_name(self, name: str) -> str:
        return f"{self.generation}/{name}" if self.generation else name

    def check(self, for_write: bool) -> None:
        """Fail early with a clear error if the location cannot be used."""

    def confirm_location(self) -> None:
        """Raise a clear error when the location itself is missing (called when no manifest was found)."""
        self.check(for_write=False)

    @abc.abstractmethod
    def read_meta(self, name: str) -> bytes | None:
        ...

    def read_file(self, path: str, digest: str) -> bytes | None:
        """A side file a manifest names, with its sha256 (which the caller checks); None if absent. Remote
        stores answer it from the cache tier."""
        return self.read_meta(path)

    @abc.abstractmethod
    def write_meta(self, name: str, data: bytes) -> None:
        ...

    @abc.abstractmethod
    def delete_meta(self, name: str) -> None:
        ...

    @abc.abstractmethod
    def write_shard(self, index: int, table: pa.Table, fmt) -> ShardInfo:
        """Store ``table`` as shard ``index`` in the bytes of record format ``fmt``."""

    @abc.abstractmethod
    def read_shard(self, info: ShardInfo, fmt, meta, columns: list[str] | None = None) -> pa.Table:
        """The verified table of one shard (``ShardChecksumError`` when its digest differs)."""

    @abc.abstractmethod
    def check_shard(self, info: ShardInfo) -> None:
        """Raise ``ShardChecksumError`` (or ``FileNotFoundError``) unless the shard is there, intact."""

    def shard_intact(self, info: ShardInfo) -> bool:
        try:
            self.check_shard(info)
            return True
        except (ShardChecksumError, FileNotFoundError):
            return False

    @abc.abstractmethod
    def delete_shard(self, info: ShardInfo) -> None:
        ...

    @abc.abstractmethod
    def overhead_bytes(self, shards: tuple[ShardInfo, ...]) -> int:
        """Bytes on the store beyond the shards' own bytes and the manifest (e.g. LMDB pages)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every dataset file at this location (used by --overwrite and budget retries)."""

    def exists(self) -> bool:
        """True when this location holds anything of a dataset (a manifest or progress)."""
        return self.read_meta(MANIFEST_NAME) is not None or self.read_meta(PROGRESS_NAME) is not None

    def measured_bytes(self, manifest) -> int:
        """Bytes the complete dataset occupies on the store now."""
        return (manifest.shard_bytes + manifest.file_bytes + self.overhead_bytes(manifest.shards)
                + len(manifest.dumps()))

    def close(self) -> None:
        """Release handles (LMDB envs); the store reopens on next use."""

    @abc.abstractmethod
    def writer_lock(self):
        """A context manager held by the one writer of this location; a second writer gets
        ``WriterLockedError`` at once."""

    def _checked(self, info: ShardInfo, data: bytes) -> bytes:
        actual = sha256(data)
        if actual != info.sha256:
            raise ShardChecksumError(str(self.uri), info.path, info.sha256, actual)
        return data


class FileStore(Store):
    """Shards as named objects; subclasses provide the byte primitives.

    ``generation`` (a folder name, "" = the top) is where new shards and side files go: replacing a
    complete dataset (``--overwrite``) writes a new generation beside the old one, and the manifest
    that names it is the commit point; the old objects are removed only after it.
    """

    def new_generation(self) -> None:
        self.generation = f"g-{uuid.uuid4().hex[:8]}"

    @abc.abstractmethod
    def _list_all(self) -> list[str]:
        """Every object below the location, as names relative to it."""

    def remove_temp_files(self) -> None:
        """Temp files of a killed writer (the lock holder calls this: no other writer is running)."""
        for name in self._list_all():
            if ".tmp-" in name:
                self._delete(name)

    def remove_unreferenced(self, manifest) -> None:
        """After a commit: delete the objects the manifest does not name (an older generation, stale temps)."""
        keep = {s.path for s in manifest.shards} | {f.get("path", n) for n, f in manifest.files.items()}
        keep |= {MANIFEST_NAME, PROGRESS_NAME}
        side = self._side_file_names()  # read once, not per listed object
        for name in self._list_all():
            if name not in keep and (name.endswith(".parquet") or name.startswith("g-") or ".tmp-" in name
                                     or name in side):
                self._delete(name)

    @abc.abstractmethod
    def _get(self, name: str) -> bytes:
        ...

    @abc.abstractmethod
    def _put(self, name: str, data: bytes) -> None:
        ...

    @abc.abstractmethod
    def _size(self, name: str) -> int | None:
        ...

    @abc.abstractmethod
    def _delete(self, name: str) -> None:
        ...

    def read_meta(self, name):
        try:
            return self._get(name)
        except FileNotFoundError:
            return None

    def write_meta(self, name, data):
        self._put(name, data)

    def delete_meta(self, name):
        self._delete(name)

    def write_shard(self, index, table, fmt):
        data = fmt.encode_shard(table)
        name = self.object_name(shard_name(index, self.uri.scheme))
        self._put(name, data)
        sids = table.column("sample_id")
        return ShardInfo(path=name, rows=table.num_rows, bytes=len(data), sha256=sha256(data),
                         first_sample_id=int(sids[0].as_py()), last_sample_id=int(sids[-1].as_py()))

    def read_shard_bytes(self, info: ShardInfo) -> bytes:
        return self._checked(info, self._get(info.path))

    def read_shard(self, info, fmt, meta, columns=None):
        return fmt.decode_shard(self.read_shard_bytes(info), columns)

    def check_shard(self, info):
        if self._size(info.path) != info.bytes:  # cheap: a missing or truncated shard needs no GET
            raise FileNotFoundError(f"{info.path} is missing or has another size than {info.bytes} bytes")
        self.read_shard_bytes(info)

    def delete_shard(self, info):
        self._delete(info.path)

    def overhead_bytes(self, shards):
        return 0

    def _side_file_names(self) -> set[str]:
        side = set()
        for meta in (MANIFEST_NAME, PROGRESS_NAME):  # side files are named there
            data = self.read_meta(meta)
            if data:
                with contextlib.suppress(ValueError, AttributeError):
                    side |= {f.get("path", n) if isinstance(f, dict) else n
                             for n, f in json.loads(data).get("files", {}).items()}
        return side

    def clear(self):
        side = self._side_file_names()
        for name in self._list_all():
            if name.endswith(".parquet") or name in side or name in (MANIFEST_NAME, PROGRESS_NAME) \
                    or ".tmp-" in name or name.startswith("g-"):
                self._delete(name)

    def exists(self):
        return self._size(MANIFEST_NAME) is not None or self._size(PROGRESS_NAME) is not None


def open_store(uri, cache=None) -> Store:
    """The backend for ``uri`` (``cache``: the shard cache of remote stores; default from the environment)."""
    u = parse_uri(uri)
    module, cls = BACKENDS[u.scheme].split(":")
    store_type = getattr(importlib.import_module(module), cls)
    return store_type(u, cache=cache) if getattr(store_type, "remote", False) else store_type(u)
