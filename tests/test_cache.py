"""Cache tier: bounded, verified, shared by processes; a second pass reads no shard from S3."""

import multiprocessing as mp
import os

import numpy as np

from conftest import write_synth
from tokray.storage.cache import ShardCache
from tokray.storage.dataset import open_dataset


def _shard_gets(server, since):
    return [p for m, p in server.requests(since) if m == "GET" and p.endswith(".parquet")]


def test_second_pass_reads_nothing_from_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKRAY_CACHE_BYTES", str(10 * 2**20))
    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=3000, shard_rows=500)

    since = s3_server.log_offset()
    first = np.concatenate([b["ids"] for b in open_dataset(uri).iter_batches()])
    assert len(_shard_gets(s3_server, since)) == 6  # every shard once

    since = s3_server.log_offset()
    ds = open_dataset(uri)
    second = np.concatenate([b["ids"] for b in ds.iter_batches()])
    assert _shard_gets(s3_server, since) == []
    assert ds.store.cache.hits == 6 + 2  # the shards, the manifest and the context model
    np.testing.assert_array_equal(first, second)


def test_byte_limit_never_exceeded(s3_server, s3_bucket, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=4000, shard_rows=500)
    sizes = [s.bytes for s in open_dataset(uri).manifest.shards]
    limit = int(2.5 * max(sizes))  # room for two shards, never three
    monkeypatch.setenv("TOKRAY_CACHE_BYTES", str(limit))
    ds = open_dataset(uri)
    cache = ds.store.cache
    for _ in range(2):
        for i in range(len(sizes)):
            ds.read_shard(i)
            assert cache.used_bytes() <= limit
    assert len(list((tmp_path / "cache").glob("*.shard"))) == 2
    # LRU: the two most recently read shards are the ones kept
    kept = {p.name.split(".")[0].split("-")[0] for p in (tmp_path / "cache").glob("*.shard")}  # <sha256>-<ETag>.shard
    assert kept == {s.sha256 for s in ds.manifest.shards[-2:]}


def _reader(uri, limit, out):
    os.environ["TOKRAY_CACHE_BYTES"] = str(limit)
    ds = open_dataset(uri)
    total = 0
    for _ in range(3):
        for b in ds.iter_batches():
            total += int(b["ids"].astype(np.int64).sum())
    out.put(total)


def test_processes_share_the_cache_safely(s3_server, s3_bucket, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=4000, shard_rows=500)
    monkeypatch.setenv("TOKRAY_CACHE_BYTES", "0")  # the reference read bypasses the cache
    ds = open_dataset(uri)
    expected = 3 * sum(int(b["ids"].astype(np.int64).sum()) for b in ds.iter_batches())
    limit = int(3.5 * max(s.bytes for s in ds.manifest.shards))  # forces evictions while others read
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(uri, limit, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results == [expected] * 3
    assert ShardCache(str(tmp_path / "cache"), limit).used_bytes() <= limit


def test_a_cached_dataset_opens_and_reads_with_one_list(s3_server, s3_bucket, tmp_path, monkeypatch):
    """Its manifest (by ETag) and context model (by digest) come from the cache too: one LIST validates all."""
    monkeypatch.setenv("TOKRAY_CACHE_BYTES", str(10 * 2**20))
    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=3000, shard_rows=500)
    assert open_dataset(uri).codec == "context"
    first = np.concatenate([b["ids"] for b in open_dataset(uri).iter_batches()])

    since = s3_server.log_offset()
    second = np.concatenate([b["ids"] for b in open_dataset(uri).iter_batches()])
    assert len(s3_server.requests(since)) == 1 and "list-type=2" in s3_server.requests(since)[0][1]
    np.testing.assert_array_equal(first, second)

    # a rewritten dataset (new manifest ETag) is read anew, not answered from the old entries
    write_synth(f"s3://{s3_bucket}/other", samples=1000, shard_rows=500, seed=1)
    from tokray.storage.dataset import copy_dataset

    copy_dataset(f"s3://{s3_bucket}/other", uri, overwrite=True)
    assert len(open_dataset(uri)) == 1000
