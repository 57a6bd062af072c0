"""Tracking through Ray's MLflow integration: a smoke fine-tune with --mlflow (a local MLflow file store) logs
the frozen config as params and what ray.train.report reports as metrics, beside TensorBoard."""

import argparse
import json

import pytest


@pytest.fixture(scope="module")
def tracked_run(ray_session, tmp_path_factory):
    """A smoke fine-tune with --set overrides and --mlflow file://... (MLflow 3 keeps file stores behind
    MLFLOW_ALLOW_FILE_STORE; the driver's setting reaches the worker)."""
    from tokray.train.launch import add_train_args, config_from_args, fit, prepare, tracking_from_args

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    root = tmp_path_factory.mktemp("tracking")
    p = argparse.ArgumentParser()
    add_train_args(p, task="classify", default_recipe="cifar_ft")
    args = p.parse_args(["--smoke-test", "--out", str(root / "run"), "--set", "lr=2e-3",
                         "--set", "augment.flip_prob=0.5", "--mlflow", f"file://{root / 'mlruns'}"])
    tracking = tracking_from_args(args)
    result = fit(prepare(config_from_args(args, task="classify", smoke_recipe="smoke_ft"), resume=False),
                 tracking=tracking)
    yield root, tracking, result
    mp.undo()


def test_mlflow_run_has_the_config_as_params_and_the_reported_metrics(tracked_run):
    from mlflow.tracking import MlflowClient

    root, tracking, result = tracked_run
    assert tracking.mlflow_uri == f"file://{root / 'mlruns'}" and tracking.mlflow_experiment == "tokray"
    client = MlflowClient(tracking_uri=tracking.mlflow_uri)
    exp = client.get_experiment_by_name("tokray")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["tokray.recipe"] == "smoke_ft" and run.data.tags["tokray.out"] == str(root / "run")
    params = run.data.params
    saved = json.loads((root / "run" / "config.json").read_text())  # the frozen config, as saved
    assert params["recipe"] == "smoke_ft" and float(params["lr"]) == saved["lr"] == 2e-3
    assert params["augment.flip_prob"] == "0.5" == str(saved["augment"]["flip_prob"])
    assert params["model_args.embed_dim"] == "32" and params["ema_decay"] == "0.9"
    final = result.metrics
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss][-1] == final["step"] == 6 and loss[-1].value == pytest.approx(final["loss"])
    assert run.data.metrics["val_top1"] == pytest.approx(final["val_top1"])
    assert run.data.metrics["val_top1_ema"] == pytest.approx(final["val_top1_ema"])
    assert "lr" in run.data.metrics and "samples_per_s" in run.data.metrics
    assert list((root / "run" / "tb").glob("events.out.tfevents.*"))  # TensorBoard as before


def test_ray_data_progress_bars_are_off_for_training(tracked_run):
    import ray.data

    assert ray.data.DataContext.get_current().enable_progress_bars is False


def test_tracking_flags(monkeypatch, tmp_path):
    from tokray.train.launch import add_train_args, tracking_from_args

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    add_train_args(p, task="mtm", default_recipe="cifar_mtm")
    assert tracking_from_args(p.parse_args([])) is None
    # a path is MLflow's file store (an absolute file:// URI), refused on the driver, in one line, unless allowed
    with pytest.raises(ValueError, match=r"--mlflow file:///.*/mlruns: cannot open the tracking store .*"
                                         r"MLFLOW_ALLOW_FILE_STORE=true"):
        tracking_from_args(p.parse_args(["--mlflow", "mlruns"]))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    t = tracking_from_args(p.parse_args(["--mlflow", "mlruns"]))
    assert t.mlflow_uri == f"file://{tmp_path / 'mlruns'}" and t.mlflow_allow_file_store and not t.wandb
