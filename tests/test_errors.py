"""Bad input ends with one clear line naming the value and what to do, and writes nothing."""

import json
import socket

import pytest

from conftest import run_job, write_synth


def _fails_cleanly(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_missing_dataset(tmp_path):
    out = run_job("jobs/dataset.py", "copy", str(tmp_path / "nope"), str(tmp_path / "dst"))
    _fails_cleanly(out, str(tmp_path / "nope"), "no manifest.json", "dataset.py synth")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("uri,needle", [("hdfs://host/x", "unknown scheme 'hdfs'"),
                                        ("s3://", "not a valid S3 bucket"),
                                        ("s3://Bad_Bucket/x", "'Bad_Bucket'"),
                                        ("lmdb://relative/env", "lmdb:///abs/path")])
def test_malformed_uri(uri, needle, tmp_path):
    _fails_cleanly(run_job("jobs/dataset.py", "info", uri), uri, needle)
    out = run_job("jobs/dataset.py", "synth", uri, "--samples", "10")
    _fails_cleanly(out, uri)


def test_unknown_format_version(tmp_path):
    uri = str(tmp_path / "ds")
    write_synth(uri, samples=100, shard_rows=50)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    _fails_cleanly(run_job("jobs/dataset.py", "verify", uri), uri, "format_version 99", "format_version 1")


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_s3_endpoint(tmp_path, s3_server):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    src = str(tmp_path / "src")
    write_synth(src, samples=100, shard_rows=50)
    out = run_job("jobs/dataset.py", "copy", src, "s3://tok-bucket/x", env={"AWS_ENDPOINT_URL": endpoint})
    _fails_cleanly(out, "s3://tok-bucket/x", endpoint, "AWS_ENDPOINT_URL")


def test_misconfigured_s3_endpoint(tmp_path, s3_server):
    out = run_job("jobs/dataset.py", "info", "s3://tok-bucket/x", env={"AWS_ENDPOINT_URL": "not a url"})
    _fails_cleanly(out, "s3://tok-bucket/x", "not a url")


def test_missing_bucket_writes_nothing(tmp_path, s3_server):
    import boto3

    out = run_job("jobs/dataset.py", "synth", "s3://no-such-bucket/ds", "--samples", "100")
    _fails_cleanly(out, "no-such-bucket", "does not exist", "aws s3 mb")
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names


def test_existing_dataset_is_not_overwritten(tmp_path):
    uri = str(tmp_path / "ds")
    write_synth(uri, samples=100, shard_rows=50)
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    _fails_cleanly(run_job("jobs/dataset.py", "synth", uri, "--samples", "60"), uri, "--overwrite")
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before


def test_every_subcommand_has_help():
    for sub in ("info", "verify", "copy", "subset", "synth"):
        out = run_job("jobs/dataset.py", sub, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout
