"""The driver-to-worker contract, without starting Ray Train: prepare() returns one RunPlan carrying a
typed DataSpec (pixel sets without fake token fields), it pickles as Ray ships it, old checkpoint
summaries still read, and a non-finite loss crosses processes as its own exception type."""

import pickle

import numpy as np
import pytest
import torch

from tokray.data.spec import DataSpec
from tokray.recipes import get_recipe
from tokray.train.launch import prepare
from tokray.train.plan import NonFiniteLoss, RunPlan, find_non_finite_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_non_finite_loss_pickles_with_its_fields_and_message():
    e = NonFiniteLoss(step=7, value=float("nan"), task="mtm", lr=1e30)
    assert isinstance(e, FloatingPointError)  # tokray.cli's user errors: one `error:` line, exit code 2
    assert str(e) == "non-finite mtm loss (nan) at step 7; lower the lr (now 1.00e+30) or check the data"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is NonFiniteLoss and (back.step, back.task, back.lr) == (7, "mtm", 1e30)
    assert np.isnan(back.value) and str(back) == str(e)


def test_fit_finds_the_non_finite_loss_among_worker_failures_by_type():
    from ray.train import WorkerGroupError

    failures = {0: RuntimeError("another worker's failure"), 1: NonFiniteLoss(3, float("inf"), "classify", 1e-3)}
    err = pickle.loads(pickle.dumps(WorkerGroupError("worker 1 failed", failures)))  # as the driver receives it
    found = find_non_finite_loss(err)
    assert isinstance(found, NonFiniteLoss) and (found.step, found.value, found.task) == (3, float("inf"), "classify")
    assert str(found).startswith("non-finite classify loss (inf) at step 3; lower the lr")
    chained = RuntimeError("wrapped")
    chained.__cause__ = NonFiniteLoss(1, float("nan"), "mtm", 1.0)
    assert find_non_finite_loss(WorkerGroupError("x", {0: chained})).step == 1
    assert find_non_finite_loss(WorkerGroupError("x", {0: ValueError("non-finite, but only in words")})) is None


def test_data_spec_reads_the_untyped_summaries_of_older_checkpoints():
    classes = ["a", "b"]
    tokens = DataSpec.from_json({"grid": [8, 8], "codebook_size": 512, "tokenizer": "abc123", "class_names": classes})
    assert tokens == DataSpec(kind="tokens", grid=(8, 8), codebook_size=512, tokenizer="abc123", class_names=("a", "b"))
    pixels = DataSpec.from_json({"kind": "pixels", "grid": [16, 16], "codebook_size": 0, "tokenizer": "jpeg:16px-q75",
                                 "class_names": classes, "quality": 75})
    assert (pixels.kind, pixels.image_size, pixels.quality) == ("pixels", 16, 75)
    assert (pixels.grid, pixels.codebook_size, pixels.tokenizer) == ((0, 0), 0, "")
    assert DataSpec.from_json(pixels.to_json()) == pixels and DataSpec.from_json(tokens.to_json()) == tokens


def test_token_plan_carries_the_spec_and_codebook_and_pickles(tmp_path):
    plan = prepare(get_recipe("cifar_seit", out=str(tmp_path / "seit")), resume=False)
    assert isinstance(plan, RunPlan) and plan.config.out == str(tmp_path / "seit")
    spec = plan.data
    assert (spec.kind, spec.grid, spec.codebook_size, spec.num_classes) == ("tokens", (8, 8), 512, 10)
    assert plan.eval_data is not None and plan.eval_data.layout() == plan.data.layout()
    assert plan.num_samples == plan.data.num_samples > 0 and plan.resume_from is None
    assert plan.codebook is not None and plan.codebook.shape[0] == 512  # the frozen stem and the augmentation
    back = pickle.loads(pickle.dumps(plan))  # what Ray does with train_loop_config={"plan": plan}
    assert back == plan and torch.equal(back.codebook, plan.codebook)
    mtm = prepare(get_recipe("smoke", out=str(tmp_path / "mtm")), resume=False)
    assert mtm.eval_data is None and mtm.eval_uri == "" and mtm.codebook is None  # no augmentation, no stem


def test_pixel_plan_has_no_token_fields(tmp_path):
    from conftest import write_image_folder
    from tokray.data.pixels import write_pixel_dataset

    (tmp_path / "imgs").mkdir()
    uri = str(tmp_path / "px")
    write_pixel_dataset(write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=6), uri, size=16,
                        quality=75, split="all")
    cfg = get_recipe("cifar_pixels", data=uri, eval_data=uri, out=str(tmp_path / "run"), model_args={"depth": 1},
                     batch_size=4)
    plan = prepare(cfg, resume=False)
    spec = plan.data
    assert (spec.kind, spec.image_size, spec.quality, spec.input_key) == ("pixels", 16, 75, "pixels")
    assert (spec.grid, spec.codebook_size, spec.tokenizer) == ((0, 0), 0, "")  # nothing pretends to be tokens
    assert spec.class_names == ("cat", "dog") and plan.num_samples == 12 and plan.codebook is None
    assert plan.eval_data == spec and pickle.loads(pickle.dumps(plan)) == plan
    with pytest.raises(ValueError, match="needs token data"):
        prepare(get_recipe("smoke", data=uri, out=str(tmp_path / "mtm")), resume=False)
