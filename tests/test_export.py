"""Export and predict: a smoke fine-tuned checkpoint becomes a self-contained model folder whose predictions on
raw JPEGs are those of evaluate (same tokenizer, same view, same weights), timm builds the token models and
loads the exported weights strictly, pixel baselines export too, and the folder is written atomically."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_job

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def ft_run(ray_session, tmp_path_factory):
    """One smoke fine-tune from scratch (token_vit_tiny width 32, 6 steps, EMA on), in-process on the test Ray."""
    from tokray.recipes import get_recipe
    from tokray.train.launch import fit, prepare

    out = tmp_path_factory.mktemp("export_ft")
    result = fit(prepare(get_recipe("smoke_ft", out=str(out)), resume=False))
    assert result.checkpoint is not None
    return out


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Raw 32x32 JPEGs laid out <class>/<file>, 3 per CIFAR class, varied enough to get varied predictions."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32
    for c, name in enumerate(CIFAR_CLASSES):
        (root / name).mkdir()
        for j in range(3):
            base = np.stack([np.sin((3 + c) * xx + j), np.cos((2 + j) * yy + c), xx * yy * c / 9], -1) * 110 + 128
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{j}.jpg", quality=90)
    return root


def _files(root):
    from tokray.data.images import ImageSource

    src = ImageSource(str(root))  # the order and labels evaluate uses
    return [os.path.join(str(root), m) for m in src.members], src.labels.astype(np.int64)


def _evaluate_probs(ckpt, images, ema=False):
    """Per-image class probabilities along evaluate's own path (load_classifier + image_batches)."""
    from tokray.assets import default_tokenizer
    from tokray.eval.classify import image_batches, load_classifier

    model, task, spec = load_classifier(ckpt, ema)
    probs = []
    for b in image_batches(str(images), "all", default_tokenizer(), spec, str(ckpt), 500, 0, torch.device("cpu")):
        with torch.no_grad():
            probs.append(torch.softmax(model(task.eval_view(b["ids"])).float(), -1))
    return torch.cat(probs)


def test_export_then_predict_gives_evaluates_top1_on_raw_jpegs(ft_run, jpegs, tmp_path):
    from tokray.eval.classify import evaluate_checkpoint
    from tokray.predict import export_model, predict, read_config

    res_export = export_model(ft_run, tmp_path / "m")
    names = sorted(os.listdir(tmp_path / "m"))
    assert names == ["config.json", "model.safetensors", "tokenizer.safetensors"]
    config = read_config(str(tmp_path / "m"))
    assert config["class_names"] == list(CIFAR_CLASSES) and config["input"]["kind"] == "tokens"
    assert config["model"] == "token_vit_tiny" and config["model_args"]["grid"] == [8, 8]
    assert config["tokenizer"]["file"] == "tokenizer.safetensors"
    assert config["tokenizer"]["fingerprint"].startswith("43cd")
    assert res_export["weights"] == "model" and res_export["step"] == 6
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".m.tmp")]  # nothing left of the temporary folder

    files, labels = _files(jpegs)
    preds = predict(str(tmp_path / "m"), files, top_k=3, device=torch.device("cpu"))
    assert [p["image"] for p in preds] == files and all(len(p["top"]) == 3 for p in preds)
    top1 = np.array([p["top"][0]["index"] for p in preds])
    ev = evaluate_checkpoint(str(ft_run), images=str(jpegs), split="all", device=torch.device("cpu"))
    assert ev["samples"] == len(files)
    assert ev["top1"] == pytest.approx(100.0 * (top1 == labels).mean())
    # image by image: the same classes and probabilities as evaluate's own tokenize -> crop -> model path
    ref = _evaluate_probs(ft_run, jpegs)
    assert top1.tolist() == ref.argmax(-1).tolist()
    assert torch.allclose(torch.tensor([p["top"][0]["prob"] for p in preds]), ref.max(-1).values, atol=1e-5)


def test_timm_create_model_builds_token_models_and_loads_the_export_strictly(ft_run, tmp_path):
    import timm
    from safetensors.torch import load_file

    import models.token_vit  # noqa: F401  (registers token_vit_* and pixel_vit_tiny with timm)
    from tokray.artifacts import factory_args
    from tokray.predict import export_model, load_model

    m = timm.create_model("token_vit_tiny", grid=(8, 8), vocab_size=512, num_classes=10)
    assert m(torch.randint(0, 512, (2, 8, 8))).shape == (2, 10)
    for name in ("token_vit_tiny", "token_vit_small", "token_vit_base", "pixel_vit_tiny"):  # ours, no clash
        assert timm.models.model_entrypoint(name).__module__.startswith("models.")
    export_model(ft_run, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    built = timm.create_model(config["model"], **factory_args(config)).eval()
    built.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")), strict=True)
    ids = torch.randint(0, 512, (4, 8, 8))
    ours = load_model(str(tmp_path / "m"), device=torch.device("cpu")).model
    with torch.no_grad():
        assert torch.equal(built(ids), ours(ids))


def test_export_and_predict_jobs_with_ema_weights_and_their_refusals(ft_run, jpegs, tmp_path):
    from tokray.data.tokenizer import save_tokenizer
    from models import create_model
    from tokray.eval.classify import evaluate_checkpoint
    from tokray.predict import load_model

    out = tmp_path / "ema"
    res = run_job("jobs/export.py", "--checkpoint", str(ft_run), "--out", str(out), "--ema")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["weights"] == "ema"
    files, labels = _files(jpegs)
    pred = run_job("jobs/predict.py", "--model", str(out), "--top-k", "2", *files)
    assert pred.returncode == 0, pred.stderr[-3000:]
    r = json.loads(pred.stdout.strip().splitlines()[-1])
    assert r["images"] == len(files) and len(r["predictions"][0]["top"]) == 2
    top1 = np.array([p["top"][0]["index"] for p in r["predictions"]])
    ema = evaluate_checkpoint(str(ft_run), images=str(jpegs), split="all", ema=True, device=torch.device("cpu"))
    assert ema["top1"] == pytest.approx(100.0 * (top1 == labels).mean())
    assert top1.tolist() == _evaluate_probs(ft_run, jpegs, ema=True).argmax(-1).tolist()

    # another tokenizer is refused by fingerprint; a file that is not an image is named
    torch.manual_seed(1)
    fp = save_tokenizer(create_model("vq_cifar_8x8"), "vq_cifar_8x8", {}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=f"tokenizer 43cd99c722a5.*is tokenizer {fp}"):
        load_model(str(out), tokenizer=str(tmp_path / "other.safetensors"))
    (tmp_path / "not.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not.jpg is not a readable image"):
        load_model(str(out)).predict([files[0], str(tmp_path / "not.jpg")])


def test_overwrite_replaces_the_folder(ft_run, tmp_path):
    from tokray.predict import export_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_model(ft_run, tmp_path / "m")
    export_model(ft_run, tmp_path / "m", overwrite=True)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "tokenizer.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_pixel_baseline_checkpoint_exports_and_predicts_like_evaluate(jpegs, tmp_path, one_torch_thread):
    """A pixel-baseline checkpoint (written here: pixel_vit_tiny on 16 px JPEGs at q50) exports without a
    tokenizer; predict stores each image the way its training data was, as evaluate does."""
    from tokray.config import TrainConfig
    from tokray.data.spec import DataSpec
    from tokray.eval.classify import evaluate_checkpoint
    from tokray.predict import export_model, predict
    from tokray.train.tasks import make_task

    cfg = TrainConfig(recipe="pixels_test", task="classify", model="pixel_vit_tiny", num_workers=1,
                      model_args={"embed_dim": 32, "depth": 1, "num_heads": 2})
    spec = DataSpec(kind="pixels", class_names=CIFAR_CLASSES, image_size=16, quality=50)
    torch.manual_seed(0)
    model = make_task(cfg, spec).build()
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": model.state_dict(), "config": cfg.to_json(), "data": spec.to_json(), "step": 0},
               tmp_path / "ckpt" / "state.pt")
    res = export_model(tmp_path / "ckpt", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert res["input"] == "pixels" and config["tokenizer"] is None
    assert config["input"] == {"kind": "pixels", "image_size": 16, "quality": 50, "encoding": "jpeg"}
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    files, labels = _files(jpegs)
    top1 = np.array([p["top"][0]["index"] for p in predict(str(tmp_path / "m"), files, device=torch.device("cpu"))])
    ev = evaluate_checkpoint(str(tmp_path / "ckpt"), images=str(jpegs), split="all", device=torch.device("cpu"))
    assert ev["top1"] == pytest.approx(100.0 * (top1 == labels).mean())


def test_a_model_trained_on_pruned_tokens_exports_the_tokenizer_and_its_prune_map(jpegs, tmp_path, one_torch_thread,
                                                                                   monkeypatch):
    """Tokens pruned from the embedded tokenizer's ids (a checkpoint written here): the export copies the base
    tokenizer and keeps the prune map, and predict encodes to the kept codes, as the pruned view does."""
    from tokray.assets import default_tokenizer, default_tokens
    from tokray.config import TrainConfig
    from tokray.data.images import decode_image
    from tokray.data.prune import prune_dataset
    from tokray.data.spec import DataSpec
    from tokray.data.tokenizer import load_tokenizer, to_unit
    from tokray.predict import export_model, load_model
    from tokray.storage.dataset import open_dataset
    from tokray.train.tasks import make_task

    pruned = str(tmp_path / "pruned")
    prune_dataset(default_tokens("val"), pruned, tokenizer=default_tokenizer())
    spec = DataSpec.from_manifest(open_dataset(pruned).manifest)
    cfg = TrainConfig(recipe="pruned_test", task="classify", model="token_vit_tiny", data=pruned, num_workers=1,
                      model_args={"embed_dim": 32, "depth": 1, "num_heads": 2})
    torch.manual_seed(0)
    model = make_task(cfg, spec, augment=False).build().eval()
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": model.state_dict(), "config": cfg.to_json(), "data": spec.to_json(), "step": 0},
               tmp_path / "ckpt" / "state.pt")
    export_model(tmp_path / "ckpt", tmp_path / "m")
    tok = json.loads((tmp_path / "m" / "config.json").read_text())["tokenizer"]
    assert tok["file"] == "tokenizer.safetensors" and tok["fingerprint"] == spec.tokenizer
    assert tok["prune"]["base_tokenizer"].startswith("43cd") and len(tok["prune"]["keep"]) == spec.codebook_size
    exported = load_model(str(tmp_path / "m"), device=torch.device("cpu"))
    assert exported.tokenizer.fingerprint == spec.tokenizer
    files, _ = _files(jpegs)
    view, _ = load_tokenizer(default_tokenizer(), for_dataset=pruned)
    pixels = np.stack([decode_image(Path(f).read_bytes(), 32) for f in files])
    with torch.no_grad():
        want = torch.softmax(model(view.encode(to_unit(pixels))), -1)
    got = exported.predict(files, top_k=1)
    assert [p["top"][0]["index"] for p in got] == want.argmax(-1).tolist()

    # no tokenizer found at export: the fingerprint and the data's prune map are recorded, predict --tokenizer BASE
    monkeypatch.setattr("tokray.assets.default_tokenizer", lambda: str(tmp_path / "missing.safetensors"))
    export_model(tmp_path / "ckpt", tmp_path / "bare")
    rec = json.loads((tmp_path / "bare" / "config.json").read_text())["tokenizer"]
    assert rec["file"] is None and rec["prune"] == tok["prune"]
    assert not (tmp_path / "bare" / "tokenizer.safetensors").exists()
    with pytest.raises(ValueError, match=re.escape(f"exported without its tokenizer (fingerprint {spec.tokenizer})")):
        load_model(str(tmp_path / "bare"))
    again = load_model(str(tmp_path / "bare"), tokenizer=str(tmp_path / "m" / "tokenizer.safetensors"),
                       device=torch.device("cpu"))
    assert [p["top"][0]["index"] for p in again.predict(files, top_k=1)] == want.argmax(-1).tolist()
