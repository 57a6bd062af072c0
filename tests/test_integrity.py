"""A flipped byte is caught by `verify` (naming the shard) and by every training read."""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, flip_byte, run_job, write_synth
from tokray.storage.dataset import open_dataset
from tokray.storage.stores import ShardChecksumError


def test_flipped_byte_local(tmp_path):
    uri = str(tmp_path / "ds")
    write_synth(uri, samples=1200, shard_rows=400)
    flip_byte(tmp_path / "ds" / "shard-00001.parquet", 100)

    out = run_job("jobs/dataset.py", "-q", "verify", uri)
    assert out.returncode == 1
    assert "shard-00001.parquet" in out.stdout and "shard-00000" not in out.stdout.split("FAILED")[0]
    assert json.loads(out.stdout.strip().splitlines()[-1])["ok"] is False

    ds = open_dataset(uri)
    ds.read_shard(0)  # intact shards still read
    with pytest.raises(ShardChecksumError, match="shard-00001.parquet.*dataset.py verify"):
        list(ds.iter_batches())


def test_flipped_byte_s3(tmp_path, s3_bucket):
    import boto3

    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=800, shard_rows=400)
    s3 = boto3.client("s3")
    obj = bytearray(s3.get_object(Bucket=s3_bucket, Key="ds/shard-00000.parquet")["Body"].read())
    obj[50] ^= 0x01
    s3.put_object(Bucket=s3_bucket, Key="ds/shard-00000.parquet", Body=bytes(obj))
    out = run_job("jobs/dataset.py", "-q", "verify", uri)
    assert out.returncode == 1 and "shard-00000.parquet" in out.stdout
    with pytest.raises(ShardChecksumError):
        list(open_dataset(uri).iter_batches())
    assert not any((tmp_path / "cache").glob("*.shard")) or all(  # the bad bytes never entered the cache
        p.name.split(".")[0] != open_dataset(uri).manifest.shards[0].sha256 for p in (tmp_path / "cache").glob("*.shard"))


def test_corrupt_lmdb_record(tmp_path):
    import lmdb

    write_synth(f"lmdb://{tmp_path}/env", samples=900, shard_rows=300)
    env = lmdb.open(str(tmp_path / "env"), max_dbs=2)
    rec = env.open_db(b"records")
    with env.begin(write=True, db=rec) as txn:
        key = (450).to_bytes(8, "big")
        value = bytearray(txn.get(key))
        value[10] ^= 0xFF
        txn.put(key, bytes(value))
    env.close()
    out = run_job("jobs/dataset.py", "-q", "verify", f"lmdb://{tmp_path}/env")
    assert out.returncode == 1 and "records-00001" in out.stdout
    with pytest.raises(ShardChecksumError, match="records-00001"):
        open_dataset(f"lmdb://{tmp_path}/env").get(450)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_killed_write_never_looks_complete_and_resumes(tmp_path, where, request):
    uri = str(tmp_path / "ds") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/ds"
    args = [sys.executable, "jobs/dataset.py", "-q", "synth", uri, "--samples", "400000", "--shard-rows", "2000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # (the context codec is fitted before the first shard: 90 s on a loaded box)
    while time.time() < deadline:  # kill once a few shards are down, well before the end
        progress = _progress_shards(uri)
        if progress >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert 3 <= _progress_shards(uri) < 200

    with pytest.raises(FileNotFoundError, match="interrupted write"):
        open_dataset(uri)
    info = run_job("jobs/dataset.py", "info", uri)
    assert info.returncode == 2 and "interrupted write" in info.stderr and "Traceback" not in info.stderr

    small = [a if a != "400000" else "30000" for a in args[1:]]  # the same shards, fewer of them
    rerun = run_job(*small)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert run_job("jobs/dataset.py", "-q", "verify", uri).returncode == 0
    ds = open_dataset(uri)
    assert len(ds) == 30000 and len(ds.manifest.shards) == 15
    if where == "local":  # shards past the shorter rerun's end were removed, not left as strays
        assert sorted(p.name for p in (tmp_path / "ds").glob("*.parquet")) == [s.path for s in ds.manifest.shards]


def _progress_shards(uri) -> int:
    from tokray.storage.stores import open_store

    data = open_store(uri).read_meta("_progress.json")
    return len(json.loads(data)["shards"]) if data else 0
