"""Round trip through every store: ids, labels and sample ids come back equal."""

import numpy as np
import pytest

from conftest import write_synth
from tokray.storage.dataset import copy_dataset, open_dataset


def _all(ds):
    batches = list(ds.iter_batches(batch_size=333))
    return {k: np.concatenate([b[k] for b in batches]) for k in ("ids", "label", "sample_id")}


def _expect(gen, n):
    ids, labels, sids = gen.chunk(0, n)
    return {"ids": ids, "label": labels, "sample_id": sids}


@pytest.mark.parametrize("kind", ["local", "file", "lmdb", "s3"])
def test_roundtrip(kind, tmp_path, request):
    uri = {"local": str(tmp_path / "ds"), "file": f"file://{tmp_path}/ds", "lmdb": f"lmdb://{tmp_path}/env",
           "s3": None}[kind]
    if kind == "s3":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/some/prefix"
    gen = write_synth(uri, samples=2100, shard_rows=500)
    ds = open_dataset(uri)
    assert len(ds) == 2100 and len(ds.manifest.shards) == 5
    assert ds.meta.grid == (8, 8) and ds.meta.codebook_size == 512
    got, want = _all(ds), _expect(gen, 2100)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["ids"].dtype == np.uint16 and got["ids"].shape == (2100, 8, 8)
    assert ds.verify() == []


def test_lmdb_random_access_and_copy_between_stores(tmp_path, s3_bucket):
    gen = write_synth(str(tmp_path / "src"), samples=1500, shard_rows=400)
    copy_dataset(str(tmp_path / "src"), f"s3://{s3_bucket}/copy")
    copy_dataset(f"s3://{s3_bucket}/copy", f"lmdb://{tmp_path}/env")
    ds = open_dataset(f"lmdb://{tmp_path}/env")
    ids, labels, _ = gen.chunk(0, 1500)
    for sid in (0, 399, 400, 1234, 1499):
        got_ids, got_label = ds.get(sid)
        np.testing.assert_array_equal(got_ids, ids[sid])
        assert got_label == labels[sid]
    with pytest.raises(KeyError):
        ds.get(1500)
    with pytest.raises(ValueError, match="LMDB"):
        open_dataset(str(tmp_path / "src")).get(3)
    asked = np.array([1499, 0, 400, 399, 1234, 0, 777])  # unsorted, across shards, one id twice
    batch = ds.get_many(asked)
    np.testing.assert_array_equal(batch["sample_id"], asked)
    np.testing.assert_array_equal(batch["ids"], ids[asked])
    np.testing.assert_array_equal(batch["label"], labels[asked])
    for outside in (1500, -1):
        with pytest.raises(KeyError, match=str(outside)):
            ds.get_many(np.array([3, outside, 5]))


def test_storage_cost_is_near_the_entropy_bound(tmp_path):
    """Parquet's dictionary bit-packing + zstd: within 6% of the order-0 entropy of the ids."""
    gen = write_synth(str(tmp_path / "ds"), samples=8000, shard_rows=4000)
    ids = gen.chunk(0, 8000)[0]
    p = np.bincount(ids.ravel()) / ids.size
    p = p[p > 0]
    entropy_bytes = -(p * np.log2(p)).sum() * 64 / 8 * 8000
    m = open_dataset(str(tmp_path / "ds")).manifest
    assert m.store_bytes == sum(f.stat().st_size for f in (tmp_path / "ds").iterdir())  # bytes on disk
    assert m.store_bytes < 1.06 * entropy_bytes, (m.store_bytes, entropy_bytes)


def test_side_files_travel_with_the_dataset(tmp_path, s3_bucket):
    """A side file (e.g. a codebook) is digested, counted in store bytes, copied and subset along."""
    from tokray.data.synth import SynthTokens
    from tokray.storage.budget import Budget, make_subset
    from tokray.storage.dataset import DatasetWriter

    gen = SynthTokens()
    blob = bytes(range(256)) * 40
    with DatasetWriter(str(tmp_path / "src"), gen.meta(500)) as w:
        w.add_file("codebook.bin", blob)
        for b in gen.batches(1500):
            w.write(*b)
    m = open_dataset(str(tmp_path / "src")).manifest
    assert m.store_bytes == sum(f.stat().st_size for f in (tmp_path / "src").iterdir())
    for dst in (f"s3://{s3_bucket}/c", f"lmdb://{tmp_path}/env"):
        copy_dataset(str(tmp_path / "src"), dst)
        assert open_dataset(dst).read_file("codebook.bin") == blob
    make_subset(str(tmp_path / "src"), str(tmp_path / "sub"), Budget.parse("50%"))
    assert open_dataset(str(tmp_path / "sub")).read_file("codebook.bin") == blob
    (tmp_path / "src" / "codebook.bin").write_bytes(blob[:-1] + b"x")
    with pytest.raises(ValueError, match="codebook.bin"):
        open_dataset(str(tmp_path / "src")).read_file("codebook.bin")
