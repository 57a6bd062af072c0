"""jobs/dataset.py on both record kinds: a pixel dataset is made, inspected, verified, copied (local, S3,
LMDB) and subset exactly like a token one; an interrupted write with other settings gives way to --overwrite."""

import json

import numpy as np
import pytest

from conftest import flip_byte, run_job, write_image_folder, write_synth
from tokray.storage.dataset import open_dataset

CLASSES = ("cat", "dog", "ship")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """36 PNGs of 24x24 laid out <root>/<class>/<file>."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"), CLASSES, per_class=12, size=24)


def _last_json(out) -> dict:
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pixel_set(images, tmp_path_factory):
    dst = tmp_path_factory.mktemp("px") / "px"
    res = _last_json(run_job("jobs/dataset.py", "-q", "pixels", images, str(dst), "--size", "8", "--quality", "50",
                             "--split", "all", "--shard-rows", "10"))
    assert (res["samples"], res["shards"], res["size"], res["quality"]) == (36, 4, 8, 50)
    return dst


def test_pixels_then_info_and_verify(pixel_set):
    info = _last_json(run_job("jobs/dataset.py", "info", str(pixel_set)))
    assert info["kind"] == "pixels" and info["num_samples"] == 36 and info["shards"] == 4
    assert (info["size"], info["quality"], info["num_classes"]) == (8, 50, 3)
    assert info["store_bytes"] == sum(p.stat().st_size for p in pixel_set.iterdir())
    out = run_job("jobs/dataset.py", "-q", "verify", str(pixel_set))
    assert out.returncode == 0 and "OK: 4/4 shards intact, 36 samples" in out.stdout


def test_pixel_copy_to_s3_and_lmdb_and_subset(pixel_set, tmp_path, s3_bucket):
    want = np.concatenate([b["pixels"] for b in open_dataset(pixel_set).iter_batches()])
    for dst in (f"s3://{s3_bucket}/px", f"lmdb://{tmp_path}/env"):
        _last_json(run_job("jobs/dataset.py", "-q", "copy", str(pixel_set), dst))
        out = run_job("jobs/dataset.py", "-q", "verify", dst)
        assert out.returncode == 0 and "OK: 4/4" in out.stdout, out.stdout + out.stderr
        assert _last_json(run_job("jobs/dataset.py", "info", dst))["kind"] == "pixels"
        got = np.concatenate([b["pixels"] for b in open_dataset(dst).iter_batches()])
        np.testing.assert_array_equal(got, want)  # the same JPEG bytes wherever they live
    pixels, label = open_dataset(f"lmdb://{tmp_path}/env").get(17)
    np.testing.assert_array_equal(pixels, want[17])
    assert label == 1  # sorted class folders: images 12..23 are "dog"

    source_bytes = open_dataset(pixel_set).manifest.store_bytes
    sub = _last_json(run_job("jobs/dataset.py", "subset", str(pixel_set), str(tmp_path / "half"), "--budget", "50%"))
    assert sub["store_bytes"] <= source_bytes // 2 and 0 < sub["num_samples"] < 36
    labels = open_dataset(tmp_path / "half").labels()
    assert np.ptp(np.bincount(labels, minlength=3)) <= 1  # stratified
    assert run_job("jobs/dataset.py", "-q", "verify", str(tmp_path / "half")).returncode == 0


def test_verify_names_a_flipped_pixel_shard(pixel_set, tmp_path):
    run_job("jobs/dataset.py", "-q", "copy", str(pixel_set), str(tmp_path / "px"))
    flip_byte(tmp_path / "px" / "shard-00002.parquet", 80)
    out = run_job("jobs/dataset.py", "-q", "verify", str(tmp_path / "px"))
    assert out.returncode == 1
    assert "BAD shard-00002.parquet: sha256 mismatch" in out.stdout and "FAILED: 3/4 shards intact" in out.stdout


def test_pixels_bad_settings_are_one_line(images, tmp_path):
    out = run_job("jobs/dataset.py", "-q", "pixels", images, str(tmp_path / "x"), "--size", "8", "--quality", "0")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: quality must be a JPEG quality in 1..100 (e.g. 75), got 0"]
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_interrupted_write_then_other_settings_then_overwrite(tmp_path):
    from tokray.data.synth import SynthTokens
    from tokray.storage.dataset import DatasetWriter

    dst = tmp_path / "ds"
    gen = SynthTokens(seed=0)
    with pytest.raises(KeyboardInterrupt), DatasetWriter(str(dst), gen.meta(500)) as writer:
        for i in range(2):
            writer.write_shard(i, *gen.chunk(500 * i, 500))
        raise KeyboardInterrupt  # interrupted: two shards, no manifest
    assert not (dst / "manifest.json").exists() and (dst / "_progress.json").exists()

    other = ("jobs/dataset.py", "-q", "synth", str(dst), "--samples", "3000", "--shard-rows", "500", "--seed", "1")
    out = run_job(*other)
    assert out.returncode == 2 and "interrupted write with other settings" in out.stderr and "--overwrite" in out.stderr
    res = _last_json(run_job(*other, "--overwrite"))  # --overwrite starts over, as the error says
    assert res["num_samples"] == 3000
    assert open_dataset(dst).meta.tokenizer == "synthetic:seed=1"
    assert run_job("jobs/dataset.py", "-q", "verify", str(dst)).returncode == 0

    write_synth(str(tmp_path / "full"), samples=600, shard_rows=300)
    assert run_job("jobs/dataset.py", "-q", "synth", str(tmp_path / "full"), "--samples", "900").returncode == 2
    res = _last_json(run_job("jobs/dataset.py", "-q", "synth", str(tmp_path / "full"), "--samples", "900",
                             "--overwrite"))
    assert res["num_samples"] == 900
