"""jobs/pretrain.py on a local Ray: the smoke recipe trains, checkpoints, and resumes its step count."""

import json

from conftest import run_job


def _result(out):
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_smoke_run_checkpoints_and_resumes(smoke_mtm_run):
    out = smoke_mtm_run
    assert list((out / "ray").glob("*/checkpoint_*/state.pt")) and (out / "config.json").exists()
    assert json.loads((out / "config.json").read_text())["recipe"] == "smoke"

    second = run_job("jobs/pretrain.py", "--smoke-test", "--max-steps", "6", "--resume", "--out", str(out), timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "restored from checkpoint at step 3" in second.stdout + second.stderr
    assert _result(second)["step"] == 6


def test_unknown_recipe_lists_the_choices():
    out = run_job("jobs/pretrain.py", "--recipe", "imagenet_huge")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cifar_mtm" in out.stderr and "smoke" in out.stderr


def test_training_batches_mix_the_classes(smoke_mtm_run):
    """The stored order is sorted by class; every batch must still hold many classes (global shuffle)."""
    import numpy as np

    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset

    labels = np.concatenate([b["label"] for b in open_dataset(default_tokens("train")).iter_batches(8192)])
    ids = np.concatenate([b["sample_id"] for b in open_dataset(default_tokens("train")).iter_batches(8192)])
    label_of = dict(zip(ids.tolist(), labels.tolist()))
    traces = sorted((smoke_mtm_run / "trace").glob("rank*-from0-*.jsonl"))
    assert len(traces) == 2, traces
    for trace in traces:
        for line in trace.read_text().splitlines():
            batch = json.loads(line)["sample_ids"]
            assert len({label_of[i] for i in batch}) >= 5, batch
