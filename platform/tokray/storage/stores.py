"""Where bytes live: one shard-level API over a local directory, an S3 prefix and an LMDB env.

File stores (local, S3) hold ``manifest.json`` plus Parquet shards. An LMDB env holds the same
records keyed by sample id (for random access) in logical shards: each shard is one write
transaction over a key range, and its digest covers its keys and values in key order.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import struct
import uuid

import numpy as np
import pyarrow as pa

from tokray.storage import codec
from tokray.storage.cache import ShardCache, default_cache
from tokray.storage.manifest import ShardInfo
from tokray.storage.uri import StoreURI, parse_uri

log = logging.getLogger(__name__)

VERIFY_HINT = "python jobs/dataset.py verify {uri}"


class ShardChecksumError(ValueError):
    """A shard's bytes do not match the digest its manifest recorded."""

    def __init__(self, uri: str, shard: str, expected: str, actual: str):
        self.shard = shard
        super().__init__(
            f"shard {shard!r} of {uri} is corrupt: sha256 expected {expected}, got {actual}. "
            f"It was not used. Check the whole dataset with `{VERIFY_HINT.format(uri=uri)}` and "
            "re-copy or re-create the bad shards.")


class StoreUnavailableError(ConnectionError):
    """The store cannot be reached or is misconfigured (endpoint, credentials)."""


def shard_name(index: int, scheme: str) -> str:
    return f"records-{index:05d}" if scheme == "lmdb" else f"shard-{index:05d}.parquet"


class Store(abc.ABC):
    """Common API; ``open_store`` picks the implementation from the URI."""

    uri: StoreURI

    def check(self, for_write: bool) -> None:
        """Fail early with a clear error if the location cannot be used."""

    @abc.abstractmethod
    def read_meta(self, name: str) -> bytes | None:
        ...

    @abc.abstractmethod
    def write_meta(self, name: str, data: bytes) -> None:
        ...

    @abc.abstractmethod
    def delete_meta(self, name: str) -> None:
        ...

    @abc.abstractmethod
    def write_shard(self, index: int, table: pa.Table) -> ShardInfo:
        ...

    @abc.abstractmethod
    def read_shard(self, info: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        ...

    @abc.abstractmethod
    def shard_intact(self, info: ShardInfo) -> bool:
        ...

    @abc.abstractmethod
    def delete_shard(self, info: ShardInfo) -> None:
        ...

    @abc.abstractmethod
    def overhead_bytes(self, shards: tuple[ShardInfo, ...]) -> int:
        """Bytes on the store beyond the shards' own bytes and the manifest (e.g. LMDB pages)."""
        ...

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every dataset file at this location (used by --overwrite and budget retries)."""
        ...

    @abc.abstractmethod
    def exists(self) -> bool:
        """True when this location holds anything of a dataset (a manifest or progress)."""
        ...

    def measured_bytes(self, manifest) -> int:
        """Bytes the complete dataset occupies on the store now."""
        return (manifest.shard_bytes + manifest.file_bytes + self.overhead_bytes(manifest.shards)
                + len(manifest.dumps()))

    def close(self) -> None:
        """Release handles (LMDB envs); the store reopens on next use."""

    def _checked(self, info: ShardInfo, data: bytes) -> bytes:
        actual = codec.sha256(data)
        if actual != info.sha256:
            raise ShardChecksumError(str(self.uri), info.path, info.sha256, actual)
        return data


class FileStore(Store):
    """Parquet shards as files; subclasses provide the byte primitives."""

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

    @abc.abstractmethod
    def _list(self) -> list[str]:
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

    def write_shard(self, index, table):
        data = codec.encode_shard(table)
        name = shard_name(index, self.uri.scheme)
        self._put(name, data)
        sids = table.column(codec.SAMPLE_ID)
        return ShardInfo(path=name, rows=table.num_rows, bytes=len(data), sha256=codec.sha256(data),
                         first_sample_id=int(sids[0].as_py()), last_sample_id=int(sids[-1].as_py()))

    def read_shard_bytes(self, info: ShardInfo) -> bytes:
        return self._checked(info, self._get(info.path))

    def read_shard(self, info, columns=None):
        return codec.decode_shard(self.read_shard_bytes(info), columns)

    def shard_intact(self, info):
        if self._size(info.path) != info.bytes:
            return False
        try:
            self.read_shard_bytes(info)
            return True
        except ShardChecksumError:
            return False

    def delete_shard(self, info):
        self._delete(info.path)

    def overhead_bytes(self, shards):
        return 0

    def clear(self):
        side = set()
        for meta in ("manifest.json", "_progress.json"):  # side files are named there
            data = self.read_meta(meta)
            if data:
                with contextlib.suppress(ValueError, AttributeError):
                    side |= set(json.loads(data).get("files", {}))
        for name in self._list():
            if name.endswith(".parquet") or name in side or name in ("manifest.json", "_progress.json") \
                    or ".tmp-" in name:
                self._delete(name)

    def exists(self):
        return self._size("manifest.json") is not None or self._size("_progress.json") is not None


class LocalStore(FileStore):
    def __init__(self, uri: StoreURI):
        self.uri = uri

    def check(self, for_write):
        if os.path.exists(self.uri.path) and not os.path.isdir(self.uri.path):
            raise ValueError(f"{self.uri} is a file, not a dataset directory; choose a directory path")
        if for_write:
            os.makedirs(self.uri.path, exist_ok=True)

    def _path(self, name):
        return self.uri.child(name)

    def _get(self, name):
        with open(self._path(name), "rb") as f:
            return f.read()

    def _put(self, name, data):
        # temp + rename: a reader (or a killed writer) never sees a half-written file
        tmp = self._path(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(name))

    def _size(self, name):
        try:
            return os.path.getsize(self._path(name))
        except FileNotFoundError:
            return None

    def _delete(self, name):
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            pass

    def _list(self):
        return sorted(os.listdir(self.uri.path)) if os.path.isdir(self.uri.path) else []


class MemoryStore(FileStore):
    """Bytes in a dict: what a dataset would cost on a file store, without writing it anywhere."""

    def __init__(self):
        self.uri = StoreURI("local", "<memory>")
        self.objects: dict[str, bytes] = {}

    def _get(self, name):
        if name not in self.objects:
            raise FileNotFoundError(name)
        return self.objects[name]

    def _put(self, name, data):
        self.objects[name] = data

    def _size(self, name):
        return len(self.objects[name]) if name in self.objects else None

    def _delete(self, name):
        self.objects.pop(name, None)

    def _list(self):
        return sorted(self.objects)


class S3Store(FileStore):
    """S3 (or any S3-compatible endpoint) through s3fs.

    Endpoint and credentials come from the standard AWS chain: AWS_ENDPOINT_URL(_S3),
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/{config,credentials}, instance
    profiles. Nothing of them is stored in a manifest or logged. A single PUT is atomic on S3,
    and the manifest is written last, so an interrupted write never looks complete.
    """

    def __init__(self, uri: StoreURI, cache: ShardCache | None = None):
        self.uri = uri
        self.cache = cache if cache is not None else default_cache()
        self._fs = None

    @property
    def endpoint(self) -> str:
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"

    @property
    def fs(self):
        if self._fs is None:
            import s3fs

            client_kwargs = {}
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            self._fs = s3fs.S3FileSystem(
                client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True,
                # botocore retries transient errors (throttling, 5xx, resets); s3fs retries its own set
                config_kwargs={"connect_timeout": 5, "read_timeout": 60,
                               "retries": {"max_attempts": 3, "mode": "standard"}})
        return self._fs

    def __getstate__(self):
        return {"uri": self.uri, "cache": self.cache, "_fs": None}

    def _key(self, name):
        return f"{self.uri.bucket}/{self.uri.child(name)}"

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise StoreUnavailableError(
                f"S3 denied {what} at {self.uri} (endpoint {self.endpoint}): {e}. Check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance profile) and the "
                "bucket policy.") from None
        except Exception as e:  # botocore/aiohttp raise many types for the same few causes
            raise StoreUnavailableError(
                f"S3 {what} at {self.uri} failed (endpoint {self.endpoint}): {type(e).__name__}: {e}. "
                "Check AWS_ENDPOINT_URL, the network and the credentials.") from None

    def check(self, for_write):
        try:
            self._call("HEAD bucket", lambda: self.fs.call_s3("head_bucket", Bucket=self.uri.bucket))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"S3 bucket {self.uri.bucket!r} does not exist at endpoint {self.endpoint}; create it "
                f"(e.g. `aws s3 mb s3://{self.uri.bucket}`) or fix the URI {self.uri}") from None

    def _get(self, name):
        return self._call(f"GET {name}", self.fs.cat_file, self._key(name))

    def _put(self, name, data):
        self._call(f"PUT {name}", self.fs.pipe_file, self._key(name), data)

    def _size(self, name):
        try:
            return int(self._call(f"HEAD {name}", self.fs.size, self._key(name)))
        except FileNotFoundError:
            return None

    def _delete(self, name):
        try:
            self._call(f"DELETE {name}", self.fs.rm_file, self._key(name))
        except FileNotFoundError:
            pass

    def _list(self):
        try:
            paths = self._call("LIST", self.fs.ls, f"{self.uri.bucket}/{self.uri.path}", False)
        except FileNotFoundError:
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in paths)

    def read_shard_bytes(self, info):
        if self.cache is None:
            return super().read_shard_bytes(info)
        return self.cache.get(info.sha256, lambda: self._checked(info, self._get(info.path)),
                              on_corrupt=lambda actual: ShardChecksumError(str(self.uri), info.path,
                                                                           info.sha256, actual))


class LMDBStore(Store):
    """Records keyed by big-endian sample id; value = int32 label + uint16 ids (little-endian).

    Environments are opened lazily in the process that uses them (never inherited across fork)
    and read-only for reading. A full map grows and the transaction is retried.
    """

    _KEY = struct.Struct(">q")
    _LABEL = struct.Struct("<i")

    def __init__(self, uri: StoreURI, map_size: int = 1 << 30):
        self.uri = uri
        self.map_size = map_size
        self._env = None
        self._handles = None
        self._verified: set[str] = set()

    def __getstate__(self):
        return {**self.__dict__, "_env": None, "_handles": None, "_verified": set()}

    def check(self, for_write):
        if os.path.exists(self.uri.path) and not os.path.isdir(self.uri.path):
            raise ValueError(f"{self.uri} is a file; LMDB URIs name the environment directory")
        if not for_write and not os.path.exists(os.path.join(self.uri.path, "data.mdb")):
            raise FileNotFoundError(
                f"no LMDB environment at {self.uri} (no data.mdb); write one with "
                f"`python jobs/dataset.py copy SRC {self.uri}`")

    def _open(self, write: bool):
        """The process's one handle on this env (LMDB allows one per process), write-capable on demand."""
        import lmdb

        key = (os.getpid(), self.uri.path)
        entry = _LMDB_ENVS.get(key)
        if entry is not None and (entry[1] or not write):
            self._env, self._handles = entry[0], entry[2]
            return self._env
        if entry is not None:
            entry[0].close()
        if write:
            os.makedirs(self.uri.path, exist_ok=True)
            env = lmdb.open(self.uri.path, map_size=self.map_size, max_dbs=2, subdir=True)
        else:
            self.check(for_write=False)
            env = lmdb.open(self.uri.path, readonly=True, lock=False, max_dbs=2, subdir=True, readahead=False)
        # opened once, outside any transaction (open_db inside a write txn would deadlock)
        handles = (env.open_db(b"meta", create=write), env.open_db(b"records", create=write))
        _LMDB_ENVS[key] = (env, write, handles)
        self._env, self._handles = env, handles
        return env

    def _dbs(self, env):
        return self._handles

    def _write_txn(self, fn):
        import lmdb

        env = self._open(write=True)
        self.map_size = max(self.map_size, env.info()["map_size"])
        while True:
            try:
                with env.begin(write=True) as txn:
                    return fn(txn, *self._dbs(env))
            except lmdb.MapFullError:
                self.map_size *= 2  # a large map costs no disk; grow and redo the whole transaction
                env.set_mapsize(self.map_size)
                log.info("LMDB map full at %s; grew map to %d MiB", self.uri, self.map_size >> 20)

    def read_meta(self, name):
        if not os.path.exists(os.path.join(self.uri.path, "data.mdb")):
            return None
        env = self._open(write=False)
        meta, _ = self._dbs(env)
        with env.begin(db=meta) as txn:
            v = txn.get(name.encode())
            return bytes(v) if v is not None else None

    def write_meta(self, name, data):
        self._write_txn(lambda txn, meta, rec: txn.put(name.encode(), data, db=meta))

    def delete_meta(self, name):
        self._write_txn(lambda txn, meta, rec: txn.delete(name.encode(), db=meta))

    def _encode_records(self, table: pa.Table) -> list[tuple[bytes, bytes]]:
        ids = codec.table_ids(table).astype("<u2", copy=False)
        labels = table.column(codec.LABEL).to_numpy()
        sids = table.column(codec.SAMPLE_ID).to_numpy()
        order = np.argsort(sids, kind="stable")
        return [(self._KEY.pack(int(sids[i])), self._LABEL.pack(int(labels[i])) + ids[i].tobytes())
                for i in order]

    @staticmethod
    def _digest(records) -> tuple[str, int]:
        import hashlib

        h, n = hashlib.sha256(), 0
        for k, v in records:
            h.update(k)
            h.update(v)
            n += len(v)
        return h.hexdigest(), n

    def write_shard(self, index, table):
        records = self._encode_records(table)
        digest, nbytes = self._digest(records)

        def put(txn, meta, rec):
            for k, v in records:
                txn.put(k, v, db=rec)

        self._write_txn(put)  # one transaction: a shard is all there or not at all
        return ShardInfo(path=shard_name(index, "lmdb"), rows=len(records), bytes=nbytes, sha256=digest,
                         first_sample_id=self._KEY.unpack(records[0][0])[0],
                         last_sample_id=self._KEY.unpack(records[-1][0])[0])

    def _scan(self, info: ShardInfo) -> list[tuple[bytes, bytes]]:
        env = self._open(write=False)
        _, rec = self._dbs(env)
        out = []
        last = self._KEY.pack(info.last_sample_id)
        with env.begin(db=rec) as txn:
            cur = txn.cursor()
            if cur.set_range(self._KEY.pack(info.first_sample_id)):
                for k, v in cur:
                    if k > last:
                        break
                    out.append((bytes(k), bytes(v)))
        return out

    def _verified_scan(self, info: ShardInfo):
        records = self._scan(info)
        digest, _ = self._digest(records)
        if digest != info.sha256 or len(records) != info.rows:
            raise ShardChecksumError(str(self.uri), info.path, info.sha256, digest)
        self._verified.add(info.path)
        return records

    def read_shard(self, info, columns=None):
        records = self._verified_scan(info)
        return self._records_to_table(records)

    def _records_to_table(self, records) -> pa.Table:
        n = len(records)
        values = b"".join(v for _, v in records)
        width = len(records[0][1]) if n else 4
        raw = np.frombuffer(values, dtype=np.uint8).reshape(n, width)
        labels = raw[:, :4].copy().view("<i4").reshape(n)
        ids = raw[:, 4:].copy().view("<u2")
        sids = np.array([self._KEY.unpack(k)[0] for k, _ in records], dtype=np.int64)
        return codec.records_to_table(ids, labels, sids)

    def shard_intact(self, info):
        try:
            self._verified_scan(info)
            return True
        except ShardChecksumError:
            return False

    def delete_shard(self, info):
        keys = [k for k, _ in self._scan(info)]

        def delete(txn, meta, rec):
            for k in keys:
                txn.delete(k, db=rec)

        self._write_txn(delete)

    def get(self, sample_id: int, shards: tuple[ShardInfo, ...]) -> tuple[np.ndarray, int]:
        """Random access by sample id; the shard holding it is verified on its first access."""
        info = self._shard_of(sample_id, shards)
        if info.path not in self._verified:
            self._verified_scan(info)
        env = self._open(write=False)
        _, rec = self._dbs(env)
        with env.begin(db=rec) as txn:
            v = txn.get(self._KEY.pack(sample_id))
        if v is None:
            raise KeyError(f"sample id {sample_id} is not in {self.uri}")
        v = bytes(v)
        return np.frombuffer(v[4:], dtype="<u2").copy(), self._LABEL.unpack(v[:4])[0]

    @staticmethod
    def _shard_of(sample_id: int, shards) -> ShardInfo:
        for s in shards:
            if s.first_sample_id <= sample_id <= s.last_sample_id:
                return s
        raise KeyError(f"sample id {sample_id} is not in this dataset")

    def overhead_bytes(self, shards):
        env = self._open(write=False)
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]  # pages in use: what the env costs
        return max(0, used - sum(s.bytes for s in shards))

    def measured_bytes(self, manifest):
        self.close()  # the file's size once every page is down
        return os.path.getsize(os.path.join(self.uri.path, "data.mdb"))

    def close(self):
        entry = _LMDB_ENVS.pop((os.getpid(), self.uri.path), None)
        if entry is not None:
            entry[0].close()
        self._env = self._handles = None

    def clear(self):
        # remove the env files: dropping the tables would leave the file at its old size
        self.close()
        for name in ("data.mdb", "lock.mdb"):
            try:
                os.remove(os.path.join(self.uri.path, name))
            except FileNotFoundError:
                pass

    def exists(self):
        return self.read_meta("manifest.json") is not None or self.read_meta("_progress.json") is not None


_LMDB_ENVS: dict[tuple[int, str], tuple] = {}  # (pid, path) -> (env, writable, db handles)


def open_store(uri, cache: ShardCache | None = None) -> Store:
    u = parse_uri(uri)
    if u.scheme == "s3":
        return S3Store(u, cache=cache)
    if u.scheme == "lmdb":
        return LMDBStore(u)
    return LocalStore(u)
