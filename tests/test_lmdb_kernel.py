"""The compiled LMDB reader (storage/lmdb_kernel.py, behind LMDBStore.get_many) against LMDB's own
reader: the same values for every kind of page, the same misses, and damaged pages reported, never
read past."""

import json
import os
import struct
import subprocess
import sys

import lmdb
import numpy as np
import pytest

from conftest import write_synth
from tokray.storage import lmdb_kernel, lmdbstore
from tokray.storage.dataset import open_dataset

SIGN = np.int64(-(1 << 63))


def _write_env(path, ids, values):
    """A raw environment laid out like LMDBStore's: a 'records' table keyed by big-endian int64."""
    env = lmdb.open(str(path), max_dbs=2, map_size=1 << 28)
    rec = env.open_db(b"records")
    with env.begin(write=True) as txn:
        for sid, v in zip(ids, values):
            txn.put(struct.pack(">q", int(sid)), v, db=rec)
    env.close()


def _tree(path):
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=2)
    with env.begin() as txn:
        _, _, depth, _, _, overflow, _, root = struct.unpack("<IHHQQQQQ", txn.get(b"records"))
    psize = env.stat()["psize"]
    env.close()
    return np.fromfile(os.path.join(path, "data.mdb"), np.uint8), psize, root, depth, overflow


def _lookup(tree, ids):
    mem, psize, root, depth, _ = tree
    off, size = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
    status, at = lmdb_kernel.lookup(mem, psize, root, depth, np.asarray(ids, np.int64) ^ SIGN, off, size)
    return status, at, off, size


@pytest.fixture(scope="module")
def mixed_env(tmp_path_factory):
    """20k records with gaps between ids, 1 B to 500 B values inline and every 97th 3-20 KB (overflow pages)."""
    rng = np.random.default_rng(1)
    ids = np.unique(np.concatenate([[0, 1 << 62], rng.integers(2, 1 << 40, 20_000)]))
    sizes = rng.integers(1, 500, len(ids))
    sizes[::97] = rng.integers(3000, 20_000, len(sizes[::97]))
    values = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    path = tmp_path_factory.mktemp("lmdb") / "env"
    _write_env(path, ids, values)
    return path, ids, values


def test_the_compiled_reader_finds_what_lmdb_finds_on_every_kind_of_page(mixed_env):
    path, ids, values = mixed_env
    tree = _tree(path)
    assert tree[3] >= 3 and tree[4] > 0  # branch levels and overflow pages are both exercised
    status, _, off, size = _lookup(tree, ids)
    assert status == lmdb_kernel.OK
    mem = tree[0]
    assert all(mem[o:o + n].tobytes() == v for o, n, v in zip(off, size, values))

    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=2)
    with env.begin(db=env.open_db(b"records")) as txn:  # LMDB's own reader on a sorted random sample
        pick = np.sort(np.random.default_rng(2).choice(ids, 3000))
        theirs = [v for _, v in txn.cursor().getmulti(pick.astype(">i8").view("V8").tolist())]
    status, _, off, size = _lookup(tree, pick)
    assert status == lmdb_kernel.OK and [mem[o:o + n].tobytes() for o, n in zip(off, size)] == theirs


def test_an_id_that_is_not_there_is_named_by_its_position(mixed_env):
    path, ids, _ = mixed_env
    tree = _tree(path)
    gap = next(int(a) + 1 for a, b in zip(ids, ids[1:]) if b > a + 1)
    for absent in (gap, int(ids[-1]) + 1, (1 << 62) - 1):
        asked = np.sort(np.array([ids[5], ids[10], absent, ids[-1]], np.int64))
        status, at, _, _ = _lookup(tree, asked)
        assert status == lmdb_kernel.MISSING and asked[at] == absent


def test_damaged_pages_are_reported_and_never_read_past(mixed_env, tmp_path):
    """A header field, or a field of every node, of a page a lookup walks overwritten, 600 times; the reader runs as plain Python (NUMBA_DISABLE_JIT), where an index outside the file
    raises, so a missing bounds check fails this test."""
    path, ids, _ = mixed_env
    script = f"""
import json, numpy as np, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_lmdb_kernel import _tree, _lookup
from tokray.storage import lmdb_kernel
tree = list(_tree({str(path)!r}))
clean, psize = tree[0], tree[1]
ids = np.sort(np.load({str(tmp_path / "ids.npy")!r}))
pages = clean[:len(clean) // psize * psize].reshape(-1, psize)
flags, lower = pages[:, 10:12].copy().view("<u2")[:, 0], pages[:, 12:14].copy().view("<u2")[:, 0]
status, _, off, _ = _lookup(tree, ids)
walked = np.union1d(np.flatnonzero(flags == 1), off // psize)  # branch pages and the ids' leaves
walked = walked[(lower[walked] % 2 == 0) & (lower[walked] <= psize)]  # (not a look-alike inside a value)
rng = np.random.default_rng(3)
seen = dict()
for trial in range(600):
    mem = clean.copy()
    page = int(rng.choice(walked)) * psize
    nodes = page + clean[page + 16:page + int(clean[page + 12:page + 14].view("<u2")[0])].view("<u2").astype(int)
    field = trial % 6  # one field overwritten in the page's header or in every node of the page
    if field == 0:
        at = page + np.array([10, 11])  # flags
    elif field == 1:
        at = page + np.array([12, 13])  # lower: the number of nodes
    elif field == 2:
        at = page + 16 + np.arange(2 * len(nodes))  # the node offsets
    else:  # each node's lo/hi (a branch's child page, a leaf's value size), flags, key size
        at = np.concatenate([nodes + k for k in ((0, 1, 2, 3), (4, 5), (6, 7))[field - 3]])
    at = at[at < len(mem)]
    mem[at] = rng.integers(0, 256, len(at), dtype=np.uint8)
    if trial % 2:  # the file ends with this page: reading past it raises
        mem = mem[:page + psize]
    tree[0] = mem
    status, bad, off, size = _lookup(tree, ids)
    assert status in (lmdb_kernel.OK, lmdb_kernel.MISSING, lmdb_kernel.CORRUPT), status
    if status == lmdb_kernel.OK:
        assert (off >= 0).all() and (off + size <= len(mem)).all()
    seen[int(status)] = seen.get(int(status), 0) + 1
print(json.dumps(seen))
"""
    np.save(tmp_path / "ids.npy", np.random.default_rng(4).choice(ids, 40, replace=False))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NUMBA_DISABLE_JIT": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout)
    assert seen.get(str(lmdb_kernel.CORRUPT), 0) > 400, seen  # the damage is seen, not read through


def test_get_many_reads_the_same_through_py_lmdb_where_the_layout_is_unknown(tmp_path, monkeypatch):
    gen = write_synth(f"lmdb://{tmp_path}/env", samples=1500, shard_rows=400)
    ids, labels, _ = gen.chunk(0, 1500)
    asked = np.random.default_rng(5).permutation(1500)[:700]
    lmdbstore.LMDBStore.close(open_dataset(f"lmdb://{tmp_path}/env").store)  # read as a reader does
    compiled = open_dataset(f"lmdb://{tmp_path}/env").get_many(asked)
    assert lmdbstore._LMDB_MAPS[(os.getpid(), str(tmp_path / "env"))] is not None  # the kernel read it
    monkeypatch.setattr(lmdbstore.LMDBStore, "_records_tree", lambda self, txn: None)
    fallback = open_dataset(f"lmdb://{tmp_path}/env").get_many(asked)
    for batch in (compiled, fallback):
        np.testing.assert_array_equal(batch["ids"], ids[asked])
        np.testing.assert_array_equal(batch["label"], labels[asked])
        with pytest.raises(KeyError, match="1500"):
            open_dataset(f"lmdb://{tmp_path}/env").get_many(np.array([3, 1500]))


def test_an_environment_swapped_in_under_an_open_reader_is_not_mixed_with_it(tmp_path):
    """A reader that opened the env before another process swapped a new copy in (rename) keeps
    reading the file it opened: the kernel's own map must not pick up the new file at that path."""
    old = write_synth(f"lmdb://{tmp_path}/env", samples=1200, shard_rows=400, seed=0)
    write_synth(f"lmdb://{tmp_path}/new", samples=1200, shard_rows=400, seed=1)  # same layout, other tokens
    ds = open_dataset(f"lmdb://{tmp_path}/env")
    ds.store.close()
    ds.get(0)  # the env is open (one id, no map yet)
    os.rename(tmp_path / "env", tmp_path / "env.old")
    os.rename(tmp_path / "new", tmp_path / "env")
    asked = np.arange(0, 1200, 7)
    np.testing.assert_array_equal(ds.get_many(asked)["ids"], old.chunk(0, 1200)[0][asked])
