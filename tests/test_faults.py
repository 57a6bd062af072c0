"""Fault injection on the storage core: nothing lost, nothing silently wrong, nothing hangs.

Each test is one case an operator hit: a copy onto itself, a corrupt source over an intact
destination, two writers at once, a warm cache over a damaged S3 object, a resume from another
source, an edited manifest, a dead endpoint, a truncated LMDB file, a full disk or cache volume.
"""

import errno
import json
import pickle
import socket
import threading
import time

import boto3
import pytest

from conftest import flip_byte, run_job, write_synth
from tokray.storage.dataset import DatasetWriter, copy_dataset, open_dataset
from tokray.storage.stores import ShardChecksumError, StoreWriteError, WriterLockedError


def _ok(uri, *extra) -> bool:
    out = run_job("jobs/dataset.py", "-q", "verify", str(uri), *extra)
    return out.returncode == 0 and "OK:" in out.stdout


def _one_error_line(out) -> str:
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_copy_onto_itself_is_refused_and_loses_nothing(kind, tmp_path, request):
    uri = str(tmp_path / "ds") if kind == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/ds"
    write_synth(uri, samples=900, shard_rows=300)
    for dst in (uri, uri + "/"):
        for cmd in (("copy", uri, dst, "--overwrite"), ("subset", uri, dst, "--budget", "50%", "--overwrite")):
            assert "same dataset" in _one_error_line(run_job("jobs/dataset.py", "-q", *cmd))
    assert _ok(uri) and len(open_dataset(uri)) == 900


def test_corrupt_source_never_replaces_an_intact_destination(tmp_path):
    write_synth(str(tmp_path / "bad"), samples=900, shard_rows=300, seed=1)
    flip_byte(tmp_path / "bad" / "shard-00002.parquet", 100)
    write_synth(str(tmp_path / "dst"), samples=600, shard_rows=300)
    before = open_dataset(tmp_path / "dst").manifest
    out = run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "bad"), str(tmp_path / "dst"), "--overwrite")
    assert "shard-00002.parquet" in _one_error_line(out) and "corrupt" in out.stderr
    assert open_dataset(tmp_path / "dst").manifest == before and _ok(tmp_path / "dst")

    write_synth(str(tmp_path / "good"), samples=1200, shard_rows=300, seed=2)  # a good source replaces it
    assert run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "good"), str(tmp_path / "dst"),
                   "--overwrite").returncode == 0
    assert len(open_dataset(tmp_path / "dst")) == 1200 and _ok(tmp_path / "dst")
    leftovers = [p.name for p in (tmp_path / "dst").rglob("*") if p.is_file()]
    m = open_dataset(tmp_path / "dst").manifest  # its shards and side files (the context model), nothing older
    assert sorted(leftovers) == sorted(["manifest.json"] + [s.path.split("/")[-1] for s in m.shards] + list(m.files))


@pytest.mark.parametrize("kind", ["local", "s3", "lmdb"])
def test_a_second_writer_fails_at_once(kind, tmp_path, request):
    dst = {"local": str(tmp_path / "dst"), "lmdb": f"lmdb://{tmp_path}/env"}.get(kind) or \
        f"s3://{request.getfixturevalue('s3_bucket')}/dst"
    write_synth(str(tmp_path / "a"), samples=600, shard_rows=300, seed=1)
    from tokray.data.synth import SynthTokens

    with pytest.raises(KeyboardInterrupt), DatasetWriter(dst, SynthTokens(seed=5).meta(300)):
        t0 = time.monotonic()  # the first writer, still writing
        out = run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "a"), dst)
        assert "another writer" in _one_error_line(out) and time.monotonic() - t0 < 60
        raise KeyboardInterrupt
    assert run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "a"), dst, "--overwrite").returncode == 0
    assert _ok(dst)


def test_verify_reads_s3_itself_not_the_warm_cache(tmp_path, s3_bucket):
    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=1200, shard_rows=200)
    assert sum(1 for _ in open_dataset(uri).iter_batches()) > 0  # the cache is warm now
    s3 = boto3.client("s3")
    key = lambda i: f"ds/shard-0000{i}.parquet"  # noqa: E731
    s3.delete_object(Bucket=s3_bucket, Key=key(1))
    body = bytearray(s3.get_object(Bucket=s3_bucket, Key=key(3))["Body"].read())
    body[100] ^= 0xFF  # same size, other bytes (and ETag)
    s3.put_object(Bucket=s3_bucket, Key=key(3), Body=bytes(body))
    out = run_job("jobs/dataset.py", "-q", "verify", uri)
    assert out.returncode == 1 and "FAILED: 4/6" in out.stdout
    assert "BAD shard-00001.parquet: missing" in out.stdout and "BAD shard-00003.parquet: sha256" in out.stdout
    ds = open_dataset(uri)  # training reads: the cache does not answer for the changed objects either
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        ds.read_shard(1)
    with pytest.raises(ShardChecksumError, match="shard-00003"):
        ds.read_shard(3)
    ds.read_shard(2)  # intact shards still read (from the cache)


def test_resume_from_another_source_is_refused(tmp_path):
    write_synth(str(tmp_path / "a"), samples=900, shard_rows=300, seed=1)
    write_synth(str(tmp_path / "b"), samples=900, shard_rows=300, seed=2)  # same settings, other records
    src = open_dataset(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt), DatasetWriter(str(tmp_path / "dst"), src.meta,
                                                         source="manifest:" + "0" * 16) as writer:
        writer.write_shard_table(0, src.read_shard(0))
        raise KeyboardInterrupt
    out = run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "b"), str(tmp_path / "dst"))
    assert "another source" in _one_error_line(out) and "--overwrite" in out.stderr

    # a real interrupted copy of a, resumed from a: allowed; from b: refused
    (tmp_path / "dst2").mkdir()
    from tokray.storage.dataset import manifest_digest
    with pytest.raises(KeyboardInterrupt), DatasetWriter(str(tmp_path / "dst2"), src.meta,
                                                         source=manifest_digest(src)) as writer:
        writer.write_shard_table(0, src.read_shard(0))
        raise KeyboardInterrupt
    assert "another source" in _one_error_line(
        run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "b"), str(tmp_path / "dst2")))
    assert run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "a"), str(tmp_path / "dst2")).returncode == 0


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(grid=[4, 4]), "grid needs 16"),
    (lambda m: m.update(codebook_size=100), "outside the codebook"),
    (lambda m: m["shards"][2].update(first_sample_id=m["shards"][2]["first_sample_id"] + 7,
                                     last_sample_id=m["shards"][2]["last_sample_id"] + 7), "manifest says"),
])
def test_an_edited_manifest_fails_verify_and_reads(edit, needle, tmp_path):
    uri = tmp_path / "ds"
    write_synth(str(uri), samples=900, shard_rows=300)
    _edit_manifest(uri, edit)
    out = run_job("jobs/dataset.py", "-q", "verify", str(uri))
    assert out.returncode == 1 and needle in out.stdout, out.stdout + out.stderr
    with pytest.raises(ValueError, match=needle):
        list(open_dataset(uri).iter_batches())


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["shards"].append(dict(m["shards"][0])), "more than once"),
    (lambda m: m["shards"][0].update(path="../elsewhere/shard-00000.parquet"), "leaves the dataset"),
    (lambda m: m["shards"][1].update(first_sample_id=0), "overlap"),
])
def test_an_inconsistent_manifest_is_refused_on_open(edit, needle, tmp_path):
    uri = tmp_path / "ds"
    write_synth(str(uri), samples=900, shard_rows=300)

    def edit_and_fix_count(m):
        edit(m)
        m["num_samples"] = sum(s["rows"] for s in m["shards"])

    _edit_manifest(uri, edit_and_fix_count)
    assert needle in _one_error_line(run_job("jobs/dataset.py", "info", str(uri)))


def test_a_manifest_that_is_a_json_list_is_one_line(tmp_path):
    write_synth(str(tmp_path / "ds"), samples=300, shard_rows=300)
    (tmp_path / "ds" / "manifest.json").write_text("[1, 2]")
    assert "not an object" in _one_error_line(run_job("jobs/dataset.py", "info", str(tmp_path / "ds")))


@pytest.fixture
def dead_endpoint():
    """An endpoint that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    thread.join()
    for c in held:
        c.close()
    srv.close()


def test_a_dead_endpoint_fails_within_a_minute_naming_it(dead_endpoint, tmp_path):
    env = {"AWS_ENDPOINT_URL": dead_endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "TOKRAY_S3_READ_TIMEOUT": "2", "TOKRAY_S3_CONNECT_TIMEOUT": "2"}
    t0 = time.monotonic()
    out = run_job("jobs/dataset.py", "info", "s3://bucket/ds", env=env, timeout=120)
    assert dead_endpoint in _one_error_line(out) and time.monotonic() - t0 < 60


def test_truncated_lmdb_is_one_line_not_sigbus(tmp_path):
    write_synth(str(tmp_path / "src"), samples=1200, shard_rows=400)
    copy_dataset(str(tmp_path / "src"), f"lmdb://{tmp_path}/env")
    data = tmp_path / "env" / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    for cmd in ("verify", "info"):
        assert "truncated" in _one_error_line(run_job("jobs/dataset.py", "-q", cmd, f"lmdb://{tmp_path}/env"))


def test_a_full_disk_is_one_line_and_leaves_no_temp_files(tmp_path, monkeypatch):
    import os

    write_synth(str(tmp_path / "src"), samples=900, shard_rows=300)
    real_fsync, calls = os.fsync, []

    def full_after_two(fd):
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_two)
    with pytest.raises(StoreWriteError, match="no space left on the device"):
        copy_dataset(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert not [p for p in (tmp_path / "dst").iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(os, "fsync", real_fsync)
    copy_dataset(str(tmp_path / "src"), str(tmp_path / "dst"))  # room again: the rerun resumes and completes
    assert _ok(tmp_path / "dst")


def test_a_failing_cache_volume_degrades_to_the_store(s3_bucket, monkeypatch, caplog):
    from tokray.storage.cache import ShardCache

    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=600, shard_rows=200)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardCache, "_insert", full)
    monkeypatch.setattr(ShardCache, "_read", full)
    ds = open_dataset(uri)
    assert sum(len(b["ids"]) for b in ds.iter_batches()) == 600  # read from S3, not "BAD shard"
    assert ds.verify() == [] and "without the cache" in caplog.text


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    write_synth(str(tmp_path / "src"), samples=600, shard_rows=300)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / ".shard-00000.parquet.tmp-deadbeef").write_bytes(b"x" * 100)  # what SIGKILL leaves
    copy_dataset(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert not list((tmp_path / "dst").glob("*.tmp-*"))


@pytest.mark.parametrize("value", ["abc", "0.5", "-1"])
def test_bad_cache_setting_names_the_variable(value, tmp_path):
    write_synth(str(tmp_path / "src"), samples=300, shard_rows=300)
    out = run_job("jobs/dataset.py", "-q", "copy", str(tmp_path / "src"), "s3://bucket/x",
                  env={"TOKRAY_CACHE_BYTES": value})
    assert "TOKRAY_CACHE_BYTES" in _one_error_line(out)


@pytest.mark.parametrize("args, needle", [(("synth", "{dst}", "--samples", "0"), "--samples"),
                                          (("subset", "{src}", "{dst}", "--budget", "0KB"), "at least 1 byte"),
                                          (("subset", "{src}", "{dst}", "--budget", "0%"), "percent")])
def test_empty_requests_are_refused_before_anything_is_written(args, needle, tmp_path):
    write_synth(str(tmp_path / "src"), samples=300, shard_rows=300)
    cmd = [a.format(src=tmp_path / "src", dst=tmp_path / "dst") for a in args]
    assert needle in _one_error_line(run_job("jobs/dataset.py", "-q", *cmd))
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())


def test_errors_cross_process_boundaries_intact():
    for e in (ShardChecksumError("s3://b/ds", "shard-00001.parquet", "a" * 64, "b" * 64),
              StoreWriteError("cannot write x"), WriterLockedError("another writer")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)


class CuttingProxy:
    """A TCP proxy in front of the S3 endpoint that cuts the first ``cuts`` responses after ``after`` bytes."""

    def __init__(self, upstream_port: int, cuts: int, after: int):
        self.upstream, self.cuts, self.after = upstream_port, cuts, after
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(32)
        self.port = self.srv.getsockname()[1]
        self.cut = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.srv.settimeout(0.2)
        while not self.stop.is_set():
            try:
                client, _ = self.srv.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        up = socket.create_connection(("127.0.0.1", self.upstream))
        cut_this = self.cut < self.cuts
        self.cut += cut_this

        def pump(src, dst, limit):
            sent = 0
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if limit is not None and sent + len(data) > limit:
                        dst.sendall(data[: limit - sent])
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(client, up, None), daemon=True).start()
        pump(up, client, self.after if cut_this else None)

    def close(self):
        self.stop.set()
        self.srv.close()


@pytest.mark.parametrize("after", [100, 700, 20000], ids=["in the headers", "in a small body", "in a shard"])
def test_a_connection_cut_mid_read_is_retried(after, s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/ds"
    write_synth(uri, samples=1200, shard_rows=400)
    proxy = CuttingProxy(s3_server.port, cuts=2, after=after)  # the first two responses end early
    try:
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "TOKRAY_CACHE_BYTES": "0"}
        out = run_job("jobs/dataset.py", "-q", "verify", uri, env=env, timeout=120)
    finally:
        proxy.close()
    assert proxy.cut == 2 and out.returncode == 0 and "OK: 3/3" in out.stdout, out.stdout + out.stderr[-1500:]
