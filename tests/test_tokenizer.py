"""The tokenizer: codebook mechanics, save/load with fingerprints, and tar -> tokens via Ray Data."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from conftest import run_job
from models import create_model
from models.tokenizer import CosineQuantizer
from tokray.artifacts import fingerprint, load_artifact, save_artifact
from tokray.data.tokenizer import load_tokenizer, require_same_tokenizer, save_tokenizer
from tokray.fit.tokenizer import TokenizerConfig, train
from tokray.storage.dataset import open_dataset

TINY = {"widths": (16, 32), "codebook_size": 32}


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory):
    """24 JPEGs in two classes under any top folder, plus one corrupt file."""
    from PIL import Image

    path = tmp_path_factory.mktemp("imgs") / "tiny.tar"
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for c, cls in enumerate(["cats", "ships"]):
            for i in range(12):
                yy, xx = np.mgrid[0:32, 0:32]
                img = np.stack([(xx * (4 + c) + i * 9) % 256, (yy * 5) % 256, np.full((32, 32), 120 * c)], -1)
                img = (img + rng.integers(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                add(f"anything/{cls}/{i:03d}.jpg", buf.getvalue())
        add("anything/ships/broken.jpg", b"\xff\xd8 this is not a jpeg at all")
    return str(path)


@pytest.fixture(scope="module")
def tiny_tokenizer(image_tar, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    cfg = TokenizerConfig(images=image_tar, out_dir=str(out), model_args=TINY, steps=4, batch_size=8,
                          eval_every=2, ckpt_every=2, val_per_class=2)
    res = train(cfg, progress=False)
    return res


def test_tiny_tokenizer_trains_and_reports(tiny_tokenizer):
    assert tiny_tokenizer["codes_used"] >= 1 and np.isfinite(tiny_tokenizer["psnr_db"])
    model, info = load_tokenizer(tiny_tokenizer["path"])
    assert info["fingerprint"] == tiny_tokenizer["fingerprint"]
    assert model.codebook_size == tiny_tokenizer["codebook_size"] if "codebook_size" in tiny_tokenizer else True
    assert len(info["extra"]["curve"]) == 2  # evaluated at steps 2 and 4


def test_tar_to_tokens_through_ray_skips_the_corrupt_jpeg(image_tar, tiny_tokenizer, tmp_path):
    dst = str(tmp_path / "tokens")
    out = run_job("jobs/tokenize_images.py", "--images", image_tar, "--dst", dst, "--tokenizer", tiny_tokenizer["path"],
                  "--shard-rows", "10", "--batch-size", "8", "--smoke-test")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["skipped_count"] == 1 and res["skipped"] == ["anything/ships/broken.jpg"]
    assert "broken.jpg" in out.stderr  # named in the log
    assert res["num_samples"] == 24 and res["path"] == "ray"
    assert run_job("jobs/dataset.py", "-q", "verify", dst).returncode == 0
    ds = open_dataset(dst)
    assert ds.meta.tokenizer == tiny_tokenizer["fingerprint"] and ds.meta.class_names == ("cats", "ships")
    batch = next(ds.iter_batches(100))
    # the same ids as the tokenizer gives in-process
    model, _ = load_tokenizer(tiny_tokenizer["path"])
    from tokray.data.images import ImageSource, decode_image
    from tokray.data.tokenizer import to_unit

    src = ImageSource(image_tar)
    first = int(batch["sample_id"][0])
    x = to_unit(decode_image(src.read(first), 32)[None])
    np.testing.assert_array_equal(model.encode(x)[0].numpy(), batch["ids"][0])
    assert batch["label"][0] == src.labels[first]


def test_other_tokenizer_is_refused_naming_both(tiny_tokenizer):
    from tokray.storage.formats.tokens import TokenMeta

    meta = TokenMeta((8, 8), 32, ("a",), "0123456789abcdef", 10)
    with pytest.raises(ValueError) as e:
        require_same_tokenizer(meta, tiny_tokenizer["fingerprint"], "tokens")
    assert "0123456789abcdef" in str(e.value) and tiny_tokenizer["fingerprint"] in str(e.value)


def test_fingerprint_is_stable_and_guards_the_weights(tmp_path):
    torch.manual_seed(0)
    model = create_model("vq_cifar_8x8", **TINY)
    a = save_tokenizer(model, "vq_cifar_8x8", TINY, str(tmp_path / "a.safetensors"))
    b = save_tokenizer(model, "vq_cifar_8x8", TINY, str(tmp_path / "b.safetensors"))
    assert a == b
    with torch.no_grad():
        model.decoder[0].weight[0, 0, 0, 0] += 1
    assert save_tokenizer(model, "vq_cifar_8x8", TINY, str(tmp_path / "c.safetensors")) != a
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        load_tokenizer(str(tmp_path / "missing.safetensors"))


def test_artifacts_of_any_dtype_roundtrip_and_fingerprint(tmp_path):
    """bf16 has no numpy dtype: the fingerprint hashes raw bytes, so every dtype saves, loads and verifies."""
    torch.manual_seed(0)
    tensors = {"w": torch.randn(4, 3).to(torch.bfloat16), "h": torch.randn(5).half(), "f": torch.randn(2, 2),
               "mask": torch.tensor([True, False]), "n": torch.arange(3)}
    config = {"model": "anything", "model_args": {"grid": [8, 8]}}
    path = str(tmp_path / "a.safetensors")
    fp = save_artifact(path, tensors, config, {"note": 1}, fields={"tokenizer": "abc"})
    assert fp == fingerprint(tensors, config) and len(fp) == 16
    loaded, info = load_artifact(path, "thing", "make one")
    assert info.fingerprint == fp and info.extra == {"note": 1} and info.fields == {"tokenizer": "abc"}
    assert info.config == config and (os.stat(path).st_mode & 0o777) == 0o644
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    changed = {**tensors, "w": tensors["w"].clone()}
    changed["w"][0, 0] += 1
    assert fingerprint(changed, config) != fp
    # a bf16 tokenizer file loads into the float32 model and verifies
    model = create_model("vq_cifar_8x8", **TINY).to(torch.bfloat16)
    tok = str(tmp_path / "tok.safetensors")
    tok_fp = save_tokenizer(model, "vq_cifar_8x8", TINY, tok)
    assert load_tokenizer(tok)[1]["fingerprint"] == tok_fp


def test_foreign_or_damaged_artifacts_are_refused(tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_tokenizer(str(garbage))
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a tokray tokenizer"):
        load_tokenizer(foreign)
    model = create_model("vq_cifar_8x8", **TINY)
    path = tmp_path / "tok.safetensors"
    save_tokenizer(model, "vq_cifar_8x8", TINY, str(path))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last tensor's bytes
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        load_tokenizer(str(damaged))


def test_dead_codes_are_restarted_on_live_encodings():
    torch.manual_seed(0)
    q = CosineQuantizer(16, 4)
    q.train()
    z = torch.randn(2, 4, 4, 4).abs()  # every encoding in the positive orthant
    q(z)  # initializes from data
    q.ema_count[:8] = 0.0  # codes 0..7 dead, and pointing away from every encoding
    q.codebook[:8] = -0.5
    q.ema_sum[:8] = -0.5
    q(z)
    zn = torch.nn.functional.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    for code in q.codebook[:8]:  # each restarted code is one of the batch's encodings
        assert torch.isclose(zn, code).all(dim=1).any()
    assert (q.ema_count[:8] > 0).all()


def test_pruning_keeps_only_used_codes_and_remaps():
    torch.manual_seed(0)
    model = create_model("vq_cifar_8x8", **TINY).eval()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    ids = model.encode(x)
    counts = torch.bincount(ids.flatten(), minlength=model.codebook_size)
    recon = model.decode(ids)
    remap = model.prune_to_used(counts)
    assert model.codebook_size == int((counts > 0).sum())
    new_ids = model.encode(x)
    torch.testing.assert_close(new_ids, remap[ids])
    torch.testing.assert_close(model.decode(new_ids), recon)


def test_training_resumes_from_its_checkpoint(image_tar, tmp_path, caplog):
    import logging

    cfg = TokenizerConfig(images=image_tar, out_dir=str(tmp_path), model_args=TINY, steps=4, batch_size=8,
                          eval_every=2, ckpt_every=2, val_per_class=2)
    first = train(cfg, progress=False)
    import dataclasses

    with caplog.at_level(logging.INFO, logger="tokray.fit.tokenizer"):
        second = train(dataclasses.replace(cfg, steps=6), progress=False)
    assert "resumed" in caplog.text and "at step 4" in caplog.text
    assert [c["step"] for c in second["curve"]] == [2, 4, 6]
    assert second["curve"][:2] == first["curve"]


def test_evaluate_tokenizer_reports_and_draws(image_tar, tiny_tokenizer, tmp_path):
    out = run_job("jobs/evaluate_tokenizer.py", "--images", image_tar, "--tokenizer", tiny_tokenizer["path"],
                  "--split", "all", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("psnr_db", "codes_used", "bits_per_token", "token_bytes_per_image", "jpeg_bytes_per_image"):
        assert key in res
    assert res["images"] == 24 and res["skipped"] == 1
    assert 0 < res["bits_per_token"] <= np.log2(res["codebook_size"]) + 1e-9
    from PIL import Image

    with Image.open(tmp_path / "reconstructions.png") as im:
        assert im.size[0] > 0 and im.size[1] > 0


def test_tokens_from_another_tokenizer_are_refused(image_tar, tiny_tokenizer, tmp_path):
    from tokray.assets import default_tokens

    out = run_job("jobs/evaluate_tokenizer.py", "--images", image_tar, "--tokenizer", tiny_tokenizer["path"],
                  "--tokens", default_tokens("val"), "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    shipped = open_dataset(default_tokens("val")).meta.tokenizer
    assert shipped in out.stderr and tiny_tokenizer["fingerprint"] in out.stderr


def test_images_from_an_s3_prefix(image_tar, s3_bucket):
    import boto3

    from tokray.data.images import ImageSource

    local = ImageSource(image_tar)
    s3 = boto3.client("s3")
    for i, name in enumerate(local.members):
        s3.put_object(Bucket=s3_bucket, Key=f"raw/{name}", Body=local.read(i))
    remote = ImageSource(f"s3://{s3_bucket}/raw")
    assert remote.class_names == local.class_names and len(remote) == len(local)
    np.testing.assert_array_equal(remote.labels, local.labels)
    assert remote.read(5) == local.read(5)
