"""jobs/bench_ingest.py through its CLI: the smoke benchmark (CI), and stream mode beyond memory: a Ray
whose object store is capped well below the dataset's decoded size finishes an epoch with flat worker RSS."""

from __future__ import annotations

import json

import pytest

from conftest import run_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _result(res) -> dict:
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])


def test_smoke_benchmark_prints_every_case():
    out = _result(run_job("jobs/bench_ingest.py", "--smoke-test", timeout=600))
    cases = {(c["store"], c["mode"], c["workers"], c["split"]) for c in out["cases"]}
    assert cases == {("local", m, 2, s) for m in ("materialize", "stream") for s in ("interleaved", "storage")}
    for c in out["cases"]:
        assert c["samples"] == 19 * 1024  # one epoch of whole global batches of 20,000 samples
        assert c["total_samples_per_s"] > 0 and c["first_batch_s"] > 0 and c["peak_rss_mib"] > 0


def test_stream_mode_beyond_the_object_store_keeps_worker_memory_flat():
    # 150k samples of 32x32 tokens: 300 MB decoded, 3x the 100 MB object store; windows of 16k samples (32 MB)
    samples, decoded_mib = 150_000, 150_000 * 32 * 32 * 2 / 2**20
    out = _result(run_job("jobs/bench_ingest.py", "--samples", str(samples), "--grid", "32", "32", "--shard-rows",
                          "4096", "--window", "16384", "--batch-size", "512", "--modes", "stream", "--workers", "2",
                          "--stores", "local", "--object-store-mb", "100", timeout=900))
    (case,) = out["cases"]
    assert case["samples"] == samples // 512 * 512  # the whole epoch
    # a rank that kept what it read would grow by its half of the set (150 MB); windows bound it (~60 MB here)
    assert case["rss_growth_mib"] < decoded_mib / 3, case
    assert case["object_store_peak_mib"] <= 100, case
