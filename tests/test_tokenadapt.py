"""TokenAdapt: the f/g model, its weight files (fingerprints), training (resumable) and the two jobs."""

import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from safetensors import safe_open

import models
from conftest import run_job
from tokray.augment.geometry import warp
from tokray.assets import default_tokenadapt
from tokray.augment.tokenadapt import load_tokenadapt, save_tokenadapt
from tokray.fit.tokenadapt import TokenAdaptConfig, train

TINY = {"dim": 16, "depth": 1, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory):
    """40 smooth 32x32 JPEGs in two classes (no shared dataset needed)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("imgs") / "tiny.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tf:
        for c, cls in enumerate(["cats", "ships"]):
            for i in range(20):
                yy, xx = np.mgrid[0:32, 0:32]
                img = np.stack([(xx * (3 + c) + i * 11) % 256, (yy * (4 + i % 3)) % 256, (xx + yy) * 4 % 256], -1)
                img = (img + rng.integers(0, 16, img.shape)).clip(0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"top/{cls}/{i:03d}.jpg")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    return str(path)


def test_cifar_variant_shapes_and_size():
    ta = models.create_model("tokenadapt_cifar")
    emb = torch.randn(2, 32, 8, 8)
    feat = ta.f(emb)
    assert feat.shape == (2, 32, 16, 16)
    assert ta.g(feat).shape == (2, 512, 8, 8) and ta(emb).shape == (2, 512, 8, 8)
    assert sum(p.numel() for p in ta.parameters()) < 600_000  # ~1 MB in float16


def test_imagenet_variant_has_the_released_widths():
    ta = models.create_model("tokenadapt_imagenet")
    n_f = sum(p.numel() for p in ta.f.parameters())
    n_g = sum(p.numel() for p in ta.g.parameters())
    assert abs(n_f - 1.84e6) < 0.01e6 and abs(n_g - 1.97e6) < 0.01e6  # digest section 5.2
    emb = torch.randn(1, 32, 32, 32)
    feat = ta.f(emb)
    assert feat.shape == (1, 32, 64, 64)
    theta = torch.eye(3)[None]
    view = warp(feat, theta, ta.feature_size((28, 28)))  # RRC output 56 in f-space
    assert view.shape == (1, 32, 56, 56) and ta.g(view).shape == (1, 391, 28, 28)


def test_weights_roundtrip_and_refuse_another_tokenizer(tmp_path):
    torch.manual_seed(0)
    ta = models.create_model("tokenadapt_cifar", vocab_size=64, **TINY)
    path = str(tmp_path / "ta.safetensors")
    fp = save_tokenadapt(ta, "tokenadapt_cifar", {"vocab_size": 64, **TINY}, path, "aaaaaaaaaaaaaaaa", {"note": 1})
    loaded, info = load_tokenadapt(path, "aaaaaaaaaaaaaaaa")
    assert info["fingerprint"] == fp and info["extra"] == {"note": 1} and info["tokenizer"] == "aaaaaaaaaaaaaaaa"
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    emb = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(loaded(emb), ta(emb), atol=2e-2, rtol=2e-2)  # float16 storage
    with safe_open(path, "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    with pytest.raises(ValueError) as e:
        load_tokenadapt(path, "bbbbbbbbbbbbbbbb")
    assert "aaaaaaaaaaaaaaaa" in str(e.value) and "bbbbbbbbbbbbbbbb" in str(e.value)
    with pytest.raises(FileNotFoundError, match="train_tokenadapt"):
        load_tokenadapt(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors["g.head.bias"] = tensors["g.head.bias"] + 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="damaged"):
        load_tokenadapt(str(tmp_path / "bad.safetensors"))


def test_shipped_weights_are_small_and_made_for_the_shipped_tokenizer():
    from tokray.assets import default_tokenizer
    from tokray.data.tokenizer import load_tokenizer

    path = default_tokenadapt()
    assert os.path.getsize(path) < 2_000_000
    tok, info = load_tokenizer(default_tokenizer())
    ta, ta_info = load_tokenadapt(path, info["fingerprint"])
    assert ta_info["tokenizer"] == info["fingerprint"]
    assert (ta.vocab_size, ta.token_dim) == tuple(tok.quantizer.codebook.shape)


def test_training_runs_and_resumes(image_tar, tmp_path, caplog):
    cfg = TokenAdaptConfig(images=image_tar, out_dir=str(tmp_path / "run"), model_args=TINY, steps=3,
                           batch_size=8, warmup=1, eval_every=2, ckpt_every=1, eval_images=4, val_per_class=2)
    first = train(cfg, progress=False)
    assert first["steps"] == 3 and [c["step"] for c in first["curve"]] == [2, 3]
    assert set(first["agreement"]) == {"identity", "flip", "crop", "affine"}
    assert first["agreement"]["identity"]["naive"] == 1.0  # the naive identity is the tokens themselves
    assert first["val_images"] == 4  # 2 per class
    with caplog.at_level(logging.INFO, logger="tokray.fit.tokenadapt"):
        second = train(TokenAdaptConfig(**{**cfg.__dict__, "steps": 5}), progress=False)
    assert "resumed from" in caplog.text and "at step 3" in caplog.text
    assert second["steps"] == 5 and [c["step"] for c in second["curve"]] == [2, 3, 4, 5]
    ta, info = load_tokenadapt(second["path"], second["tokenizer"])
    assert info["extra"]["steps"] == 5 and info["extra"]["agreement"] == second["agreement"]


def _job_main(path, argv, monkeypatch):
    """Run a job's main() in-process (cheaper than a subprocess) with these arguments."""
    import runpy

    job = runpy.run_path(path, run_name="job_under_test")
    monkeypatch.setattr("sys.argv", [path, *argv])
    return job["main"]()


def test_jobs_help_and_a_tokenadapt_for_another_tokenizer(image_tar, tmp_path, monkeypatch, capsys):
    for job in ("jobs/train_tokenadapt.py", "jobs/evaluate_augment.py"):
        with pytest.raises(SystemExit) as e:
            _job_main(job, ["--help"], monkeypatch)
        assert e.value.code == 0 and "--smoke-test" in capsys.readouterr().out
    ta = models.create_model("tokenadapt_cifar", **TINY)
    other = str(tmp_path / "other.safetensors")
    save_tokenadapt(ta, "tokenadapt_cifar", TINY, other, "0123456789abcdef")
    with pytest.raises(ValueError) as e:  # run_main turns it into one `error:` line, exit code 2
        _job_main("jobs/evaluate_augment.py", ["--smoke-test", "--images", image_tar, "--tokenadapt", other],
                  monkeypatch)
    assert "0123456789abcdef" in str(e.value) and "43cd99c722a56531" in str(e.value)


def test_jobs_smoke(image_tar, tmp_path):
    one = {"OMP_NUM_THREADS": "1"}  # as the one_torch_thread fixture, for the subprocess
    out = run_job("jobs/train_tokenadapt.py", "--smoke-test", "--images", image_tar, "--out", str(tmp_path / "ta"),
                  env=one)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["steps"] == 4 and os.path.exists(res["path"])
    assert "tokenadapt" in out.stderr  # the progress bar
    out = run_job("jobs/evaluate_augment.py", "--smoke-test", "--images", image_tar, "--out", str(tmp_path / "ev"),
                  "--split", "all", "--tokenadapt", res["path"], env=one)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for view in ("flip", "crop", "affine"):
        assert 0.0 <= res[view]["naive"] <= 1.0 and 0.0 <= res[view]["tokenadapt"] <= 1.0
        assert {"naive_psnr_db", "tokenadapt_psnr_db", "tokenizer_psnr_db"} <= set(res[view])
    assert res["images"] == 40
    for png in res["pngs"]:
        assert os.path.getsize(png) > 1000
