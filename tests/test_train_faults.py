"""Training jobs under bad input: refused before anything runs, one line each; a corrupt shard named."""

import math
import os
import re

import pytest

from conftest import flip_byte, run_job, write_synth
from tokray.recipes import get_recipe
from tokray.train.launch import prepare
from tokray.seeds import derive_seed


def _fake_checkpoint(out):
    ckpt = out / "ray" / "smoke" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"not read by the refusal")
    return ckpt


def test_an_out_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    _fake_checkpoint(tmp_path / "run")
    cfg = get_recipe("smoke", out=str(tmp_path / "run"))
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite to start again"):
        prepare(cfg, resume=False)
    with pytest.raises(ValueError, match="pass one of them"):
        prepare(cfg, resume=True, overwrite=True)
    plan = prepare(cfg, resume=False, overwrite=True)  # start again: the old run's state is gone
    assert not (tmp_path / "run" / "ray").exists() and plan.resume_from is None


@pytest.mark.parametrize("field, value, needle", [
    ("epochs", math.nan, "finite"), ("epochs", math.inf, "finite"), ("lr", math.nan, "lr"),
    ("out", "s3://bucket/runs/x", "local paths"), ("max_steps", -1, "max_steps")])
def test_bad_numbers_and_places_are_refused_by_the_config(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        get_recipe("smoke", **{field: value})


def test_mtm_with_a_classifier_model_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not fit task 'mtm'.*mtm_tiny"):
        prepare(get_recipe("smoke", model="token_vit_tiny", out=str(tmp_path / "r")), resume=False)


def test_a_dataset_smaller_than_a_batch_is_refused(tmp_path):
    write_synth(str(tmp_path / "tiny"), samples=20, shard_rows=20)
    with pytest.raises(ValueError, match="fewer than one batch"):
        prepare(get_recipe("smoke", data=str(tmp_path / "tiny"), out=str(tmp_path / "r")), resume=False)


def test_a_foreign_init_file_is_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError) as err:
        prepare(get_recipe("smoke_ft", init=str(tmp_path / "junk.pt"), out=str(tmp_path / "r")), resume=False)
    assert "not a tokray checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_an_unwritable_out_is_refused(tmp_path):
    (tmp_path / "file").write_text("a file where the run directory should be")
    with pytest.raises(ValueError, match="cannot be written"):
        prepare(get_recipe("smoke", out=str(tmp_path / "file" / "run")), resume=False)


def test_seeds_never_collide_across_epochs_and_ranks():
    seeds = {derive_seed(0, "shuffle", epoch, rank) for epoch in range(50) for rank in range(64)}
    assert len(seeds) == 50 * 64  # 10 * epoch + rank collided at 10 workers
    assert derive_seed(0, "shuffle", 0, 1) != derive_seed(0, "masks", 0, 1) != derive_seed(1, "shuffle", 0, 1)


def _edit_codebook_size(path):
    import json

    m = json.loads((path / "manifest.json").read_text())
    m["codebook_size"] = 100  # the ids go up to 511
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, needles", [
    (lambda p: flip_byte(p / "shard-00002.parquet", 100), [r"shard 'shard-00002\.parquet'", r"jobs/dataset\.py verify"]),
    # whichever check meets the edit first: a decoded shard's ids, or the context model's codebook size
    (_edit_codebook_size, ["outside the codebook|512 codes but the dataset has 100", "re-create or re-copy"]),
], ids=["corrupt shard", "edited codebook_size"])
def test_damaged_data_stops_training_with_one_line_naming_it(damage, needles, tmp_path):
    write_synth(str(tmp_path / "ds"), samples=1200, shard_rows=300)
    damage(tmp_path / "ds")
    out = run_job("jobs/pretrain.py", "--smoke-test", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "run"),
                  timeout=600)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert all(re.search(n, errors[0]) for n in needles), errors[0]
