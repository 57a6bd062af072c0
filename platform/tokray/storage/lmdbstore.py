"""An LMDB environment: records keyed by big-endian sample id, for random access.

A value is the int32 label followed by the record format's payload (token ids, a JPEG). A shard
is one write transaction over a key range; its digest covers its keys and values in key order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from tokray.storage.formats import LABEL, SAMPLE_ID
from tokray.storage.manifest import ShardInfo
from tokray.storage.local import sibling_lock
from tokray.storage.stores import ShardChecksumError, Store, StoreWriteError, shard_name
from tokray.storage.uri import StoreURI

log = logging.getLogger(__name__)


class LMDBStore(Store):
    """Records keyed by big-endian sample id; value = int32 label (little-endian) + the format's payload.

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
        # id(shard tuple) -> (that tuple, first ids, last ids); holding the tuple keeps its id from being reused
        self._key_ranges: dict[int, tuple[tuple, np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {**self.__dict__, "_env": None, "_handles": None, "_verified": set(), "_key_ranges": {}}

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
        if entry is not None and (entry.writable or not write):
            self._env, self._handles = entry.env, entry.handles
            return self._env
        if entry is not None:
            entry.env.close()
            _LMDB_MAPS.pop(key, None)
        data = os.path.join(self.uri.path, "data.mdb")
        before = _file_identity(data)
        if write:
            os.makedirs(self.uri.path, exist_ok=True)
            env = lmdb.open(self.uri.path, map_size=self.map_size, max_dbs=2, subdir=True)
        else:
            self.check(for_write=False)
            check_not_truncated(data, str(self.uri))
            env = lmdb.open(self.uri.path, readonly=True, lock=False, max_dbs=2, subdir=True, readahead=False)
        after = _file_identity(data)
        # opened once, outside any transaction (open_db inside a write txn would deadlock)
        handles = (env.open_db(b"meta", create=write), env.open_db(b"records", create=write))
        # the file the env maps, for get_many's own map of it; unknown if the path was swapped meanwhile
        _LMDB_ENVS[key] = _OpenEnv(env, write, handles, after if before in (None, after) else None)
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
            except lmdb.Error as e:  # e.g. no space left on the device: the transaction did not happen
                raise StoreWriteError(f"cannot write to the LMDB environment {self.uri}: {e}; free space or choose "
                                      "another destination, then rerun the same command (finished shards are kept)"
                                      ) from None

    def writer_lock(self):
        return sibling_lock(self.uri.path, self.uri)

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

    def _encode_records(self, table: pa.Table, fmt) -> list[tuple[bytes, bytes]]:
        labels = table.column(LABEL).to_numpy()
        sids = table.column(SAMPLE_ID).to_numpy()
        payloads = fmt.payloads(table)
        order = np.argsort(sids, kind="stable")
        return [(self._KEY.pack(int(sids[i])), self._LABEL.pack(int(labels[i])) + payloads[i]) for i in order]

    @staticmethod
    def _digest(records) -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        for k, v in records:
            h.update(k)
            h.update(v)
            n += len(v)
        return h.hexdigest(), n

    def write_shard(self, index, table, fmt):
        records = self._encode_records(table, fmt)
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

    def read_shard(self, info, fmt, meta, columns=None):
        table = self._records_to_table(self._verified_scan(info), fmt, meta)
        return table.select(columns) if columns else table

    def _records_to_table(self, records, fmt, meta) -> pa.Table:
        labels = np.array([self._LABEL.unpack_from(v)[0] for _, v in records], dtype=np.int32)
        sids = np.array([self._KEY.unpack(k)[0] for k, _ in records], dtype=np.int64)
        return fmt.table_from_payloads(meta, [v[4:] for _, v in records], labels, sids)

    def check_shard(self, info):
        self._verified_scan(info)

    def delete_shard(self, info):
        keys = [k for k, _ in self._scan(info)]

        def delete(txn, meta, rec):
            for k in keys:
                txn.delete(k, db=rec)

        self._write_txn(delete)

    def _check_owned(self, sample_ids: np.ndarray, shards: tuple[ShardInfo, ...]) -> None:
        """Every id lies in a shard's key range; each shard touched is verified on its first access."""
        firsts, lasts = self._ranges(shards)
        owner = np.searchsorted(firsts, sample_ids, side="right") - 1  # shards hold ascending key ranges
        outside = (owner < 0) | (sample_ids > lasts[np.maximum(owner, 0)])
        if outside.any():
            raise KeyError(f"sample id {int(sample_ids[outside.argmax()])} is not in {self.uri}")
        if any(s.path not in self._verified for s in shards):  # once all are verified: no per-call work
            for i in np.unique(owner):
                if shards[int(i)].path not in self._verified:
                    self._verified_scan(shards[int(i)])

    def _ranges(self, shards: tuple[ShardInfo, ...]) -> tuple[np.ndarray, np.ndarray]:
        """First and last sample id of each shard, computed once per shard tuple (a manifest's)."""
        entry = self._key_ranges.get(id(shards))
        if entry is None:
            entry = self._key_ranges[id(shards)] = (
                shards, np.array([s.first_sample_id for s in shards], dtype=np.int64),
                np.array([s.last_sample_id for s in shards], dtype=np.int64))
        return entry[1], entry[2]

    def get_one(self, sample_id: int, shards: tuple[ShardInfo, ...]) -> bytes:
        """The stored value (int32 label + payload) of one sample id."""
        firsts, lasts = self._ranges(shards)
        i = int(np.searchsorted(firsts, sample_id, side="right")) - 1
        if i < 0 or sample_id > lasts[i]:
            raise KeyError(f"sample id {sample_id} is not in {self.uri}")
        if shards[i].path not in self._verified:
            self._verified_scan(shards[i])
        env = self._env if self._env is not None else self._open(write=False)
        with env.begin(db=self._handles[1], buffers=False) as txn:
            v = txn.get(self._KEY.pack(int(sample_id)))
        if v is None:
            raise KeyError(f"sample id {sample_id} is not in {self.uri}")
        return v

    def get_many(self, sample_ids, shards: tuple[ShardInfo, ...], fmt, meta) -> dict:
        """Records by sample id, in the order asked, as one batch: one read transaction, the keys
        sorted and looked up together (the compiled reader of ``lmdb_kernel``; py-lmdb's ``getmulti``
        where the environment's layout is not one that reader knows)."""
        from tokray.storage import lmdb_kernel  # numba: imported (and compiled, cached) on first use

        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self._check_owned(sample_ids, shards)
        order = np.argsort(sample_ids, kind="stable")
        wanted = sample_ids[order]
        env = self._open(write=False)
        with env.begin(buffers=False) as txn:
            found = self._lookup_compiled(txn, wanted)
            mem, off, size = found if found is not None else self._lookup_getmulti(txn, wanted)
            back = np.empty_like(order)
            back[order] = np.arange(len(order))  # sorted position of each asked id
            width = int(size[0]) if len(size) else 0
            if len(size) and (size == width).all():  # fixed-size records (tokens): one copy into one array
                raw = np.empty((len(back), width), np.uint8)
                lmdb_kernel.gather_rows(mem, off, back, raw)
                labels = raw[:, :4].copy().view("<i4").reshape(-1)
                payloads = raw[:, 4:]
            else:
                labels = np.array([mem[o:o + 4].view("<i4")[0] for o in off[back]], dtype=np.int32)
                payloads = [mem[o + 4:o + n].tobytes() for o, n in zip(off[back], size[back])]
        return {fmt.payload_key: fmt.payloads_to_numpy(meta, payloads), LABEL: labels, SAMPLE_ID: sample_ids}

    def _lookup_compiled(self, txn, wanted: np.ndarray):
        """(mapped file, value offsets, value sizes) of the ascending ids ``wanted``, read from this
        transaction's snapshot of the records B-tree; None where ``lmdb_kernel`` cannot read this
        environment (a layout it does not know, or a page it does not expect: logged once)."""
        from tokray.storage import lmdb_kernel

        tree = self._records_tree(txn)
        if tree is None:
            return None
        root, depth = tree
        if depth == 0 and len(wanted):  # an empty table
            raise KeyError(f"sample id {int(wanted[0])} is not in {self.uri}")
        for remapped in (False, True):
            mapped = self._mapped(remap=remapped)
            if mapped is None:
                return None
            mem, psize = mapped
            off, size = np.empty(len(wanted), np.int64), np.empty(len(wanted), np.int64)
            status, at = lmdb_kernel.lookup(mem, psize, root, depth, wanted ^ _SIGN, off, size)
            if status == lmdb_kernel.OK:
                return mem, off, size
            if status == lmdb_kernel.MISSING:
                raise KeyError(f"sample id {int(wanted[at])} is not in {self.uri}")
        log.warning("LMDB %s: a B-tree page the compiled reader does not expect (sample id %d); reading it "
                    "with py-lmdb from now on", self.uri, int(wanted[at]))
        _LMDB_MAPS[(os.getpid(), self.uri.path)] = None
        return None

    def _records_tree(self, txn) -> tuple[int, int] | None:
        """(root page, depth) of the records table in ``txn``'s snapshot: its MDB_db record, which is
        the value of its name in LMDB's main table; None for flags the compiled reader does not handle."""
        rec = txn.get(b"records")
        if rec is None or len(rec) != _MDB_DB.size:
            return None
        _, flags, depth, _, _, _, _, root = _MDB_DB.unpack(rec)
        if flags != 0:  # dupsort, integer or reversed keys: not this store's table
            return None
        return (root, depth) if root != _NO_PAGE else (0, 0)

    def _mapped(self, remap: bool = False) -> tuple[np.ndarray, int] | None:
        """The process's read-only map of the env's data.mdb as uint8, and the page size (a second view
        of the pages LMDB maps; the page cache is shared). None where the kernel cannot read it: not
        LMDB data version 1 on a little-endian host, or the path now names another file than the one
        the env opened (a copy swapped in). ``remap``: map it again (it grew after a write here)."""
        import mmap

        key = (os.getpid(), self.uri.path)
        if key in _LMDB_MAPS and (not remap or _LMDB_MAPS[key] is None):
            return _LMDB_MAPS[key]
        _LMDB_MAPS[key] = None
        with open(os.path.join(self.uri.path, "data.mdb"), "rb") as f:
            st = os.fstat(f.fileno())
            if sys.byteorder != "little" or _LMDB_ENVS[key].file != (st.st_dev, st.st_ino):
                return None
            mem = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
        magic, version = struct.unpack_from("<II", mem, 16)
        psize = self._env.stat()["psize"]
        if magic == 0xBEEFC0DE and version == 1 and struct.unpack_from("<I", mem, 40)[0] == psize:
            _LMDB_MAPS[key] = (mem, psize)
        return _LMDB_MAPS[key]

    def _lookup_getmulti(self, txn, wanted: np.ndarray):
        """The same as ``_lookup_compiled``, through py-lmdb (values copied into one buffer)."""
        keys = wanted.astype(">i8").view("V8").tolist()  # 8-byte keys as bytes, in C
        found = txn.cursor(db=self._handles[1]).getmulti(keys)
        if len(found) != len(keys):
            have = {k for k, _ in found}
            raise KeyError(f"sample id {self._KEY.unpack(next(k for k in keys if k not in have))[0]} is not in {self.uri}")
        size = np.fromiter(map(len, (v for _, v in found)), np.int64, len(found))
        off = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
        return np.frombuffer(b"".join(v for _, v in found), np.uint8), off, size

    def overhead_bytes(self, shards):
        env = self._open(write=False)
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]  # pages in use: what the env costs
        return max(0, used - sum(s.bytes for s in shards))

    def measured_bytes(self, manifest):
        self.close()  # the file's size once every page is down
        return os.path.getsize(os.path.join(self.uri.path, "data.mdb"))

    def close(self):
        entry = _LMDB_ENVS.pop((os.getpid(), self.uri.path), None)
        _LMDB_MAPS.pop((os.getpid(), self.uri.path), None)
        if entry is not None:
            entry.env.close()
        self._env = self._handles = None

    def clear(self):
        # remove the env files: dropping the tables would leave the file at its old size
        self.close()
        for name in ("data.mdb", "lock.mdb"):
            try:
                os.remove(os.path.join(self.uri.path, name))
            except FileNotFoundError:
                pass

def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def check_not_truncated(data_file: str, uri: str) -> None:
    """Refuse a data.mdb shorter than its own meta pages say (mapping it would die of SIGBUS on first read).

    The two meta pages sit at offsets 0 and psize; the newer (larger txnid) gives the last page in use."""
    size = os.path.getsize(data_file)
    with open(data_file, "rb") as f:
        head = f.read(4096 * 2 + 160)
    need = 0
    if len(head) >= 160:
        magic, = struct.unpack_from("<I", head, 16)
        psize, = struct.unpack_from("<I", head, 40)  # the free DB's md_pad holds the page size
        if magic == 0xBEEFC0DE and psize >= 512:
            metas = [head[0:160]]
            with open(data_file, "rb") as f:
                f.seek(psize)
                metas.append(f.read(160))
            best = max((m for m in metas if len(m) == 160 and struct.unpack_from("<I", m, 16)[0] == 0xBEEFC0DE),
                       key=lambda m: struct.unpack_from("<Q", m, 144)[0])
            last_pg, = struct.unpack_from("<Q", best, 136)
            need = (last_pg + 1) * psize
    if len(head) < 160 or need == 0:
        raise ValueError(f"{uri}: data.mdb ({size} bytes) is not a readable LMDB environment; re-copy the dataset "
                         f"there with `python jobs/dataset.py copy SRC {uri} --overwrite`")
    if size < need:
        raise ValueError(f"{uri}: data.mdb is truncated ({size} bytes; its pages need {need}); re-copy the dataset "
                         f"there with `python jobs/dataset.py copy SRC {uri} --overwrite`")


class _OpenEnv(NamedTuple):
    env: object  # lmdb.Environment
    writable: bool
    handles: tuple  # (meta, records) table handles
    file: tuple[int, int] | None  # (st_dev, st_ino) of the data.mdb it opened


_LMDB_ENVS: dict[tuple[int, str], _OpenEnv] = {}  # (pid, path) -> the process's one handle
_LMDB_MAPS: dict[tuple[int, str], tuple | None] = {}  # (pid, path) -> (data.mdb mapped, page size); None: unreadable
_MDB_DB = struct.Struct("<IHHQQQQQ")  # LMDB's MDB_db: pad, flags, depth, branch/leaf/overflow pages, entries, root
_NO_PAGE = (1 << 64) - 1  # P_INVALID: the root of an empty table
_SIGN = np.int64(-(1 << 63))  # xor with an id: its big-endian key's byte order as int64 order (lmdb_kernel._key)
