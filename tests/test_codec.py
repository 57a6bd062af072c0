"""Context-coded token shards (format_version 2) in the storage core: exact round trips (random, edge and
real shipped ids, a one-sample shard), digests, format-1 datasets still read, copy --codec both ways,
budgets on the coded bytes, and a resumed write coding on with its stored model."""

import dataclasses
import json
import pickle

import numpy as np
import pytest

from conftest import flip_byte, run_job, write_synth
from tokray.storage.budget import Budget, make_subset
from tokray.storage.dataset import DatasetWriter, copy_dataset, open_dataset
from tokray.storage.formats import tokens
from tokray.storage.formats.tokens import FORMAT, MODEL_FILE, TokenMeta
from tokray.storage.stores import ShardChecksumError


def _meta(codec="context", grid=(8, 8), k=512, shard_rows=500):
    return TokenMeta(grid=grid, codebook_size=k, class_names=("a", "b", "c"), tokenizer="test", shard_rows=shard_rows,
                     codec=codec)


def _all(uri):
    batches = list(open_dataset(uri).iter_batches(batch_size=777))
    return {k: np.concatenate([b[k] for b in batches]) for k in ("ids", "label", "sample_id")}


def _write(uri, ids, labels, sids, meta):
    with DatasetWriter(uri, meta) as w:
        w.write(ids, labels, sids)
    return open_dataset(uri)


def _assert_same(a, b):
    for k in ("ids", "label", "sample_id"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_random_and_edge_ids_round_trip_with_a_one_sample_shard(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 1001, 512  # shards of 500, 500 and 1
    ids = rng.integers(0, k, (n, 8, 8)).astype(np.uint16)
    ids[:40] = 0
    ids[40:80] = k - 1
    ids[80:120] = rng.choice(np.array([0, k - 1], np.uint16), (40, 8, 8))
    ids[-1] = k - 1  # the one-sample shard, at the top edge
    labels = rng.integers(0, 3, n).astype(np.int32)
    sids = np.sort(rng.choice(10**6, n, replace=False)).astype(np.int64) + 2**40  # sparse, large
    ds = _write(str(tmp_path / "ds"), ids, labels, sids, _meta())
    assert ds.manifest.to_json()["format_version"] == 2 and ds.codec == "context"
    assert [s.rows for s in ds.manifest.shards] == [500, 500, 1]
    got = _all(str(tmp_path / "ds"))
    _assert_same(got, {"ids": ids, "label": labels, "sample_id": sids})
    assert got["ids"].dtype == np.uint16 and ds.verify() == []
    np.testing.assert_array_equal(ds.labels(), labels)  # labels alone: the ids are not decoded
    on_disk = sum(p.stat().st_size for p in (tmp_path / "ds").iterdir())
    assert ds.manifest.store_bytes == on_disk and MODEL_FILE in ds.manifest.files  # the model is counted


def test_label_and_sample_id_columns_any_order(tmp_path):
    """Sample ids in any order and labels of any int32 value come back exactly (deltas, not the bitmap)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 64, (300, 4, 4)).astype(np.uint16)
    # a shard's first id after its last: any order within it
    shuffled = np.concatenate([[299], rng.permutation(np.arange(1, 299)), [0]]).astype(np.int64)
    for sids in (shuffled, np.arange(300, dtype=np.int64)[::-1] * 7 - 2**62, np.arange(300, dtype=np.int64) * 3):
        labels = rng.integers(-2**31, 2**31 - 1, 300).astype(np.int32)
        uri = str(tmp_path / f"ds{sids[0]}")
        ds = _write(uri, ids, labels, sids, _meta(grid=(4, 4), k=64, shard_rows=300))
        _assert_same(_all(uri), {"ids": ids, "label": labels, "sample_id": sids})
        data = ds.store.read_shard_bytes(ds.manifest.shards[0])
        for bad in (data[:10], data[:20], b"XXXX" + data[4:]):
            with pytest.raises(ValueError):
                ds.format.decode_shard(bad)
        with pytest.raises(ValueError, match="no column"):
            ds.format.decode_shard(data, ["pixels"])


def test_real_shipped_ids_round_trip_both_codecs(tmp_path):
    from tokray.assets import default_tokens

    shipped = default_tokens("val")
    want = _all(shipped)
    copy_dataset(shipped, str(tmp_path / "p"), codec="parquet")
    copy_dataset(str(tmp_path / "p"), str(tmp_path / "c"), codec="context")
    for uri in (tmp_path / "p", tmp_path / "c"):
        _assert_same(_all(str(uri)), want)
    p, c = open_dataset(str(tmp_path / "p")), open_dataset(str(tmp_path / "c"))
    assert (p.codec, c.codec) == ("parquet", "context")
    assert c.manifest.store_bytes < 0.93 * p.manifest.store_bytes  # below what Parquet's order-0 coding stores
    cs, ps = c.codec_stats(), p.codec_stats()
    assert cs.order0_bits == pytest.approx(ps.order0_bits) and cs.stored_bits < cs.order0_bits < ps.stored_bits


def test_shipped_train_set_is_context_coded_within_7_percent_of_jpeg():
    from tokray.assets import default_tokens

    ds = open_dataset(default_tokens("train"))
    m = ds.manifest
    assert ds.codec == "context" and m.to_json()["format_version"] == 2
    assert m.store_bytes <= 0.070 * m.meta.extra["jpeg_bytes"]  # labels, sample ids, model and manifest included


def test_a_corrupt_coded_shard_or_model_is_caught_by_its_digest(tmp_path):
    write_synth(str(tmp_path / "ds"), samples=1500, shard_rows=500)
    flip_byte(tmp_path / "ds" / "shard-00001.parquet", 100)
    ds = open_dataset(str(tmp_path / "ds"))
    with pytest.raises(ShardChecksumError, match="shard-00001.parquet"):
        ds.read_shard(1)
    ds.read_shard(0)
    assert [p.split(":")[0] for p in ds.verify()] == ["shard-00001.parquet"]
    flip_byte(tmp_path / "ds" / MODEL_FILE, 30)
    with pytest.raises(ShardChecksumError, match=MODEL_FILE):
        open_dataset(str(tmp_path / "ds")).read_shard(0)


def test_a_format_1_dataset_still_reads(tmp_path):
    """``codec parquet`` writes exactly the format-1 manifest of every dataset before format 2."""
    gen = write_synth(str(tmp_path / "src"), samples=1200, shard_rows=500)
    m = copy_dataset(str(tmp_path / "src"), str(tmp_path / "old"), codec="parquet")
    raw = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert raw["format_version"] == 1 and "codec" not in raw and raw["files"] == {} and m.meta.codec == "parquet"
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["manifest.json"] + [
        f"shard-0000{i}.parquet" for i in range(3)]
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "old" / "shard-00000.parquet").num_rows == 500  # plain Parquet, as before
    ids, labels, sids = gen.chunk(0, 1200)
    _assert_same(_all(str(tmp_path / "old")), {"ids": ids, "label": labels, "sample_id": sids})
    raw["codec"] = "context"  # an edited manifest: the version says parquet, the codec says otherwise
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version 1 does not match"):
        open_dataset(str(tmp_path / "old"))


def test_copy_cli_converts_both_ways(tmp_path):
    gen = write_synth(str(tmp_path / "src"), samples=1400, shard_rows=500)
    want = dict(zip(("ids", "label", "sample_id"), gen.chunk(0, 1400)))

    def copy(src, dst, *codec):
        out = run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / src), str(tmp_path / dst), *codec)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    p, c = copy("src", "p", "--codec", "parquet"), copy("p", "c")  # default: context
    assert (p["codec"], c["codec"]) == ("parquet", "context") and c["store_bytes"] < p["store_bytes"]
    for d in ("p", "c"):
        _assert_same(_all(str(tmp_path / d)), want)
    # the same ids give the same model and shards: a round trip is byte-identical
    for name in ["shard-00000.parquet", MODEL_FILE]:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    info = run_job("jobs/dataset.py", "info", str(tmp_path / "c"))
    res = json.loads(info.stdout.strip().splitlines()[-1])
    st = res["codec_stats"]
    assert res["codec"] == "context" and res["format_version"] == 2 and "stored_bits_per_token" in info.stdout
    assert st["stored_bits"] < st["order0_bits"] and st["decode_samples_per_s"] > 0 and st["measured_samples"] == 1400
    bad = run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "src"), str(tmp_path / "x"), "--codec", "gzip")
    assert bad.returncode == 2 and "--codec" in bad.stderr and not (tmp_path / "x").exists()


def test_lmdb_keeps_records_and_drops_the_model(tmp_path):
    gen = write_synth(str(tmp_path / "src"), samples=900, shard_rows=400)
    copy_dataset(str(tmp_path / "src"), f"lmdb://{tmp_path}/env")
    ds = open_dataset(f"lmdb://{tmp_path}/env")
    assert ds.codec == "lmdb" and ds.meta.codec == "parquet" and ds.manifest.files == {}
    ids, labels, _ = gen.chunk(0, 900)
    got, label = ds.get(411)
    np.testing.assert_array_equal(got, ids[411])
    assert label == labels[411]
    copy_dataset(f"lmdb://{tmp_path}/env", str(tmp_path / "back"))  # and back to coded shards
    assert open_dataset(str(tmp_path / "back")).codec == "context"


def test_budgets_count_the_coded_bytes(tmp_path):
    write_synth(str(tmp_path / "src"), samples=4000, shard_rows=1000)
    limit = 60_000
    ctx = make_subset(str(tmp_path / "src"), str(tmp_path / "c"), Budget.parse(f"{limit}B"), seed=0)
    par = make_subset(str(tmp_path / "src"), str(tmp_path / "p"), Budget.parse(f"{limit}B"), seed=0, codec="parquet")
    for m, d in ((ctx, "c"), (par, "p")):
        assert m.store_bytes == sum(f.stat().st_size for f in (tmp_path / d).iterdir()) <= limit
        assert m.store_bytes > 0.95 * limit
    assert ctx.meta.codec == "context" and MODEL_FILE in ctx.files  # its own model, counted
    assert ctx.files[MODEL_FILE]["sha256"] != open_dataset(str(tmp_path / "src")).manifest.files[MODEL_FILE]["sha256"]
    assert ctx.num_samples > 1.05 * par.num_samples  # the same bytes hold more samples


def test_an_interrupted_write_codes_on_with_its_stored_model(tmp_path, monkeypatch):
    monkeypatch.setattr(tokens, "FIT_TOKENS", 64 * 600)  # fit on the first 600 rows: 2 of 5 shards
    from tokray.data.synth import SynthTokens

    gen = SynthTokens()
    meta = gen.meta(300)
    with pytest.raises(KeyboardInterrupt):
        with DatasetWriter(str(tmp_path / "ds"), meta) as w:
            for i in range(3):
                w.write_shard(i, *gen.chunk(300 * i, 300))
            raise KeyboardInterrupt
    progress = json.loads((tmp_path / "ds" / "_progress.json").read_text())
    assert MODEL_FILE in progress["files"] and len(progress["shards"]) == 3
    model = (tmp_path / "ds" / MODEL_FILE).read_bytes()
    with DatasetWriter(str(tmp_path / "ds"), meta) as w:
        assert w.shard_done(2) and not w.shard_done(3)
        for i in range(3, 5):
            w.write_shard(i, *gen.chunk(300 * i, 300))
    assert (tmp_path / "ds" / MODEL_FILE).read_bytes() == model
    ids, labels, sids = gen.chunk(0, 1500)
    _assert_same(_all(str(tmp_path / "ds")), {"ids": ids, "label": labels, "sample_id": sids})
    with DatasetWriter(str(tmp_path / "fresh"), meta) as w:  # the same bytes as an uninterrupted write
        w.write(ids, labels, sids)
    for name in [MODEL_FILE] + [f"shard-0000{i}.parquet" for i in range(5)]:
        assert (tmp_path / "fresh" / name).read_bytes() == (tmp_path / "ds" / name).read_bytes()


def test_the_bound_format_pickles_as_its_model(tmp_path):
    write_synth(str(tmp_path / "ds"), samples=600, shard_rows=300)
    ds = open_dataset(str(tmp_path / "ds"))
    fmt = pickle.loads(pickle.dumps(ds.format))  # what a Ray read task would get
    assert len(pickle.dumps(ds.format)) < ds.manifest.files[MODEL_FILE]["bytes"] + 1000
    data = ds.store.read_shard_bytes(ds.manifest.shards[1])
    assert fmt.decode_shard(data).equals(ds.read_shard(1))
    assert FORMAT.bind(dataclasses.replace(ds.meta, codec="parquet"), None) is FORMAT  # nothing to bind
