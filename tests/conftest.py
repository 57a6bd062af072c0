"""Shared fixtures: a real S3 endpoint (moto server) and one small Ray instance per session."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server():
    from s3server import LocalS3Server

    server = LocalS3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    name = f"tok-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own shard cache directory."""
    monkeypatch.setenv("TOKRAY_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def ray_session(s3_server):  # workers inherit the AWS_* variables of the S3 endpoint
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "platform")])}})
    yield ray
    ray.shutdown()


def run_job(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python jobs/<args>`` from the repo root, as a user would."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def write_synth(uri, samples=3000, shard_rows=500, seed=0, grid=(8, 8), codebook=512, classes=10):
    """A synthetic dataset written in-process; returns its generator (ground truth)."""
    from tokray.data.synth import SynthTokens
    from tokray.storage.dataset import DatasetWriter

    gen = SynthTokens(grid=grid, codebook_size=codebook, num_classes=classes, seed=seed)
    with DatasetWriter(uri, gen.meta(shard_rows)) as writer:
        for batch in gen.batches(samples, chunk=700):
            writer.write(*batch)
    return gen


@pytest.fixture(scope="session")
def smoke_mtm_run(tmp_path_factory):
    """A smoke MTM pre-training run stopped at step 3 (tests resume it and fine-tune from it)."""
    out = tmp_path_factory.mktemp("smoke_mtm")
    res = run_job("jobs/pretrain.py", "--smoke-test", "--max-steps", "3", "--trace-batches", "--out", str(out),
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a CPU shared with other jobs OpenMP threads wait
    for each other (10x slower here); the previous setting is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def flip_byte(path, offset: int) -> None:
    """Corrupt a stored file in place: one byte inverted."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def write_image_folder(root, classes=("cat", "dog", "ship"), per_class: int = 10, size: int = 40) -> str:
    """Smooth-with-texture PNGs laid out <root>/<class>/<file> (an image source for the jobs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, name in enumerate(classes):
        (root / name).mkdir()
        for j in range(per_class):
            base = np.stack([np.sin(6 * xx + j), np.cos(4 * yy + c), xx * yy], -1) * 100 + 128
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{j:03d}.png")
    return str(root)
