"""Fine-tuning and evaluation jobs on a local Ray: strict encoder loading, per-epoch top-1, TensorBoard,
checks that fail before training starts, a non-finite loss named with its step, and evaluation on
tokens and on raw images tokenized on the fly."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import run_job, write_synth
from models import create_model

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _result(out):
    return json.loads(out.stdout.strip().splitlines()[-1])


def _user_error(out, *needles):
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for n in needles:
        assert n in out.stderr, (n, out.stderr[-2000:])


@pytest.fixture(scope="module")
def mtm_run(smoke_mtm_run):
    return smoke_mtm_run


@pytest.fixture(scope="module")
def ft_run(mtm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    res = run_job("jobs/finetune.py", "--smoke-test", "--init", str(mtm_run), "--out", str(out), "--set", "val_every=4",
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_finetune_loads_the_encoder_strictly_and_reports_top1(ft_run, mtm_run):
    out, res = ft_run
    log = res.stdout + res.stderr
    # the dropped MTM keys are named, and only the head is new
    assert "checkpoint keys dropped (21)" in log and "decoder_embed.weight" in log and "mask_token" in log
    assert "model keys newly initialized: head.bias, head.weight" in log
    r = _result(res)
    assert r["steps"] == 6 and r["init"] == str(mtm_run)
    assert r["val_samples"] == 5000 and 0.0 <= r["val_top1"] <= 100.0 and r["val_top1_ema"] is not None
    assert log.count(": val top-1 ") == 2  # val_every=4 of 6 steps, inside the first epoch: at step 4 and the end
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert json.loads((out / "config.json").read_text())["init"] == str(mtm_run)


def test_evaluate_on_tokens_and_on_raw_images(ft_run, tmp_path):
    out, _ = ft_run
    tok = run_job("jobs/evaluate.py", "--checkpoint", str(out), "--max-samples", "300")
    assert tok.returncode == 0, tok.stderr[-3000:]
    r = _result(tok)
    assert r["samples"] == 300 and r["input"] == "tokens" and 0 <= r["top1"] <= 100

    from PIL import Image

    rng = np.random.default_rng(0)
    for c in CIFAR_CLASSES:  # a folder source laid out <class>/<file>, two images each
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    img = run_job("jobs/evaluate.py", "--checkpoint", str(out), "--images", str(tmp_path / "imgs"), "--split", "all",
                  "--ema")
    assert img.returncode == 0, img.stderr[-3000:]
    r = _result(img)
    assert r["samples"] == 20 and r["input"] == "images" and r["weights"] == "ema"


def test_evaluate_refuses_another_tokenizer_and_an_mtm_checkpoint(ft_run, mtm_run, tmp_path):
    from tokray.data.tokenizer import save_tokenizer

    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    fp = save_tokenizer(create_model("vq_cifar_8x8"), "vq_cifar_8x8", {}, str(other))
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "cat" / "0.png")
    out = run_job("jobs/evaluate.py", "--checkpoint", str(ft_run[0]), "--images", str(tmp_path / "imgs"),
                  "--tokenizer", str(other))
    _user_error(out, fp, "43cd99c722a5")
    mtm = run_job("jobs/evaluate.py", "--checkpoint", str(mtm_run))
    _user_error(mtm, "mtm checkpoint", "jobs/finetune.py --init")


def test_data_that_does_not_fit_the_checkpoint_fails_before_training(mtm_run, tmp_path):
    write_synth(str(tmp_path / "small"), samples=200, grid=(4, 4), codebook=64)
    out = run_job("jobs/finetune.py", "--smoke-test", "--init", str(mtm_run), "--data", str(tmp_path / "small"),
                  "--eval-data", str(tmp_path / "small"))
    _user_error(out, "4x4 grid of 64 codes", "8x8 grid of 512 codes", str(tmp_path / "small"), str(mtm_run))


def test_checkpoint_of_another_model_fails_before_training(mtm_run):
    # cifar_ft builds width 128 / depth 4; the smoke MTM encoder is width 32 / depth 1
    out = run_job("jobs/finetune.py", "--init", str(mtm_run), "--out", str(mtm_run / "wrong"))
    _user_error(out, f"checkpoint {mtm_run} (mtm_tiny: width 32, depth 1, 512 codes) does not fit token_vit_tiny "
                     "(width 128, depth 4, 512 codes)")
    assert not (mtm_run / "wrong" / "ray").exists()


def test_unknown_model_lists_the_choices():
    out = run_job("jobs/finetune.py", "--smoke-test", "--model", "vit_huge")
    _user_error(out, "unknown model 'vit_huge'", "token_vit_tiny", "token_vit_base")


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    out = run_job("jobs/pretrain.py", "--smoke-test", "--lr", "1e30", "--out", str(tmp_path), timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]  # (Ray's worker logs carry tracebacks; the job's own line does not)
    assert re.search(r"^error: non-finite mtm loss \((nan|inf|-inf)\) at step \d+; lower the lr", out.stderr, re.M)


def test_load_encoder_names_both_models_on_a_shape_mismatch():
    from tokray.train.checkpoint import load_encoder

    mtm = create_model("mtm_tiny", grid=(8, 8), vocab_size=512, embed_dim=32, depth=1, num_heads=2)
    clf = create_model("token_vit_tiny", grid=(8, 8), vocab_size=512, num_classes=10, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"CKPT \(model: width 32, depth 1, 512 codes\) does not fit CLF \(width 64, "
                                         r"depth 1, 512 codes\): .* is \[.*32\] in the checkpoint and \[.*64\] in the model"):
        load_encoder(clf, {"model": mtm.state_dict()}, "CLF", "CKPT")
    ok = create_model("token_vit_tiny", grid=(8, 8), vocab_size=512, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    report = load_encoder(ok, {"model": mtm.state_dict()}, "CLF", "CKPT")
    assert report["initialized"] == ["head.bias", "head.weight"]
    assert "decoder_pred.weight" in report["dropped"] and not any(k.startswith("encoder.") for k in report["dropped"])
    assert torch.equal(ok.blocks[0].attn.qkv.weight, mtm.encoder.blocks[0].attn.qkv.weight)


def test_layer_decay_scales_lr_from_the_head_down():
    from tokray.config import TrainConfig
    from tokray.data.spec import DataSpec
    from tokray.train.tasks import ClassifyTask

    cfg = TrainConfig(recipe="t", task="classify", model="token_vit_tiny", layer_decay=0.5, num_workers=1)
    task = ClassifyTask(cfg, DataSpec(kind="tokens", grid=(8, 8), codebook_size=512, class_names=CIFAR_CLASSES))
    model = task.build()
    groups = task.param_groups(model)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[3].mlp.fc1.weight)] == 0.5  # last of 4 blocks: one step below the head
    assert scale[id(model.patch_embed.embed.weight)] == 0.5 ** 5
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.blocks[0].norm1.weight) in no_decay


def test_validation_counts_every_sample_once_whatever_order_each_rank_reads():
    """Ranks read the validation stream in different batch orders (Ray Data does not promise one); the
    split is by sample id, so two ranks together score each of 5,000 samples exactly once."""
    from tokray.train.tasks import rank_top1

    class FirstLogitIsLabel(torch.nn.Module):  # predicts class ids[:, 0] -> right iff ids[:, 0] == label
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 10).float()

    n, b = 5000, 16
    sid = torch.arange(n)
    label = sid % 10
    ids = torch.where(sid % 3 == 0, label, (label + 1) % 10)[:, None]  # a third right
    batches = [{"ids": ids[i:i + b], "label": label[i:i + b], "sample_id": sid[i:i + b]} for i in range(0, n, b)]
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(batches)) for _ in range(2)]
    counts = [rank_top1(FirstLogitIsLabel(), [batches[j] for j in o], "cpu", rank=r, world=2)
              for r, o in enumerate(orders)]
    assert sum(s for _, s in counts) == n and counts[0][1] == counts[1][1] == n // 2
    assert sum(c for c, _ in counts) == int((sid % 3 == 0).sum())
