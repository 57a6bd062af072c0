"""The README's cluster path, for real: `ray start --head` on loopback with token auth
(RAY_AUTH_MODE=token, as Ray 2.60 clusters run), then `ray job submit` of the smoke pre-training,
fine-tuning from its checkpoint, and evaluation. The cluster lives in its own temp dir and process
group, so it neither joins nor stops any other Ray instance of the test session."""

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raycluster import RAY, Cluster, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("head"))
    dash = free_port()
    try:
        cluster.start_head(dashboard_port=dash, cpus=2)  # the smoke recipes' 2 Ray Train workers
        address = f"http://127.0.0.1:{dash}"
        _wait_for(address, timeout=120)
        yield {"address": address, "env": cluster.env}
    finally:
        cluster.close()


def _wait_for(address, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {timeout}s")


def _submit(ray_head, *entrypoint, env=None, timeout=600):
    cmd = [RAY, "job", "submit", "--address", ray_head["address"], "--runtime-env", "infra/runtime_env.yaml",
           "--", "python", *entrypoint]
    deadline = time.time() + 180
    while True:  # the head's job agent comes up some seconds after the dashboard on a loaded machine
        res = subprocess.run(cmd, cwd=ROOT, env=env or ray_head["env"], capture_output=True, text=True,
                             timeout=timeout)
        if "No available agent to submit job" not in res.stderr or time.time() > deadline:
            return res
        time.sleep(5)


def _succeeded(res) -> bool:
    return res.returncode == 0 and "succeeded" in (res.stdout + res.stderr).lower()


def _last_json(text: str) -> dict:
    """The job's result line (job logs may prefix it with a progress bar's control codes)."""
    for line in reversed(text.splitlines()):
        start = line.find('{"')
        if start >= 0:
            try:
                return json.loads(line[start:])
            except ValueError:
                continue
    raise AssertionError(f"no result line in:\n{text[-3000:]}")


def test_job_submit_pretrain_finetune_evaluate(ray_head, tmp_path):
    pre = _submit(ray_head, "jobs/pretrain.py", "--smoke-test", "--out", str(tmp_path / "mtm"))
    assert _succeeded(pre), pre.stdout[-3000:] + pre.stderr[-2000:]
    assert list((tmp_path / "mtm" / "ray").glob("*/checkpoint_*/state.pt")), "the job left no checkpoint"
    assert _last_json(pre.stdout)["step"] == 6

    ft = _submit(ray_head, "jobs/finetune.py", "--smoke-test", "--init", str(tmp_path / "mtm"),
                 "--out", str(tmp_path / "ft"))
    assert _succeeded(ft), ft.stdout[-3000:] + ft.stderr[-2000:]
    assert _last_json(ft.stdout)["val_samples"] == 5000

    ev = _submit(ray_head, "jobs/evaluate.py", "--smoke-test", "--checkpoint", str(tmp_path / "ft"))
    assert _succeeded(ev), ev.stdout[-3000:] + ev.stderr[-2000:]
    assert _last_json(ev.stdout)["samples"] == 512


def test_a_client_without_token_mode_is_refused(ray_head):
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([RAY, "job", "list", "--address", ray_head["address"]], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0, out.stdout[-2000:]
