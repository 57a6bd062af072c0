"""The whole config from the command line: --set KEY=VALUE and --config FILE.yaml reach every TrainConfig and
AugmentConfig field, values are typed, unknown keys are refused in one line listing the valid ones, and
finetune's EMA flag is --ema-decay (evaluate's --ema stays the switch it is)."""

import argparse
import dataclasses
import json

import pytest

from conftest import run_job


def _config(*argv, task="classify", recipe="cifar_ft"):
    from tokray.train.launch import add_train_args, config_from_args

    p = argparse.ArgumentParser()
    add_train_args(p, task=task, default_recipe=recipe)
    return config_from_args(p.parse_args(list(argv)), task=task, smoke_recipe="smoke_ft")


def test_set_reaches_nested_augment_fields_and_types_values():
    cfg = _config("--set", "augment.coloradapt_prob=0.5", "--set", "lr=1e-3", "--set", "augment.rrc_scale=[0.35, 1.0]",
                  "--set", "augment.tokenadapt_path=/weights/ta.safetensors", "--set", "model_args.embed_dim=64",
                  "--set", "betas=0.9,0.99", "--set", "amp=false", "--set", "max_steps=7")
    assert cfg.augment.coloradapt_prob == 0.5 and cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.augment.rrc_scale == (0.35, 1.0) and cfg.augment.tokenadapt_path == "/weights/ta.safetensors"
    assert cfg.model_args == {"drop_path_rate": 0.1, "embed_dim": 64}  # merged into the recipe's
    assert cfg.betas == (0.9, 0.99) and cfg.amp is False and cfg.max_steps == 7
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: the run's one config
        cfg.lr = 1.0


def test_config_file_nested_then_flags_then_set(tmp_path):
    f = tmp_path / "over.yaml"
    f.write_text("lr: 3.0e-4\nepochs: 2\naugment:\n  noise_prob: 0.5\n  rrc_prob: 1.0\nmodel_args:\n  depth: 2\n")
    cfg = _config("--config", str(f), "--epochs", "4", "--set", "augment.rrc_prob=0.25")
    assert (cfg.lr, cfg.epochs) == (3e-4, 4.0)  # the named flag beats the file
    assert cfg.augment.noise_prob == 0.5 and cfg.augment.rrc_prob == 0.25  # --set beats both
    assert cfg.model_args["depth"] == 2 and cfg.model_args["drop_path_rate"] == 0.1
    # a saved config.json is a valid --config: the same run settings again (on its recipe)
    saved = tmp_path / "config.json"
    saved.write_text(cfg.to_json())
    assert _config("--config", str(saved)) == cfg


@pytest.mark.parametrize("argv, message", [
    (["--set", "augment.colorada_prob=0.5"], "unknown config field 'augment.colorada_prob' (did you mean "
                                             "'augment.coloradapt_prob'?) in --set augment.colorada_prob=0.5; valid "
                                             "augment fields: coloradapt_fraction, coloradapt_prob,"),
    (["--set", "lrr=1e-3"], "unknown config field 'lrr' (did you mean 'lr'?) in --set lrr=1e-3; valid fields: recipe,"),
    (["--set", "max_steps=2.5"], "config field 'max_steps' must be an integer, got 2.5"),
    (["--set", "augment.tokenadapt=1"], "config field 'augment.tokenadapt' must be true or false, got 1"),
    (["--set", "augment.rrc_scale=[0.3]"], "config field 'augment.rrc_scale' must be a list of 2 values"),
    (["--set", "lr"], "--set expects KEY=VALUE"),
    (["--set", "augment.noise_prob=0.8", "--set", "augment.coloradapt_prob=0.5"],
     "augment.noise_prob + coloradapt_prob must be <= 1"),  # the final combination is validated, once
])
def test_bad_overrides_are_refused_naming_the_field(argv, message):
    with pytest.raises(ValueError) as e:
        _config(*argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- lr: 1\n")
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    (tmp_path / "unknown.yaml").write_text("augment:\n  colorada_prob: 0.5\n")
    with pytest.raises(ValueError, match="must hold a mapping of config fields"):
        _config("--config", str(tmp_path / "list.yaml"))
    with pytest.raises(ValueError, match="is not valid YAML"):
        _config("--config", str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match=f"'augment.colorada_prob' .* in --config {tmp_path / 'unknown.yaml'}"):
        _config("--config", str(tmp_path / "unknown.yaml"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        _config("--config", str(tmp_path / "missing.yaml"))


def test_jobs_refuse_a_bad_key_in_one_line_and_finetune_takes_ema_decay():
    out = run_job("jobs/finetune.py", "--smoke-test", "--set", "augment.colorada_prob=0.5")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: unknown config field 'augment.colorada_prob'")
    assert "valid augment fields: " in errors[0] and "coloradapt_prob" in errors[0]
    ema = run_job("jobs/finetune.py", "--smoke-test", "--ema-decay", "1.5")
    assert ema.returncode == 2 and "error: ema_decay must be in [0, 1), got 1.5" in ema.stderr, ema.stderr[-2000:]


def test_smoke_recipe_takes_overrides_too():
    cfg = _config("--smoke-test", "--set", "ema_decay=0.5", "--set", "augment.flip_prob=0.5")
    assert cfg.recipe == "smoke_ft" and cfg.ema_decay == 0.5
    assert json.loads(cfg.to_json())["augment"]["flip_prob"] == 0.5
