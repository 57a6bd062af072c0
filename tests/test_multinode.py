"""Multi-node on one machine: a real 2-node Ray cluster on loopback (`ray start --head` plus a second
raylet from `ray start --address`, 1 CPU each, token auth), smoke pre-training with one Ray Train
worker per node on the streaming split.

(a) one epoch, traced: per step the two ranks' sample ids are disjoint and equal in size, and over
    the epoch every sample id is seen exactly once.
(b) the non-head node is SIGKILLed after a checkpoint; a replacement node joins (what an autoscaler
    does) and Ray Train restarts the worker group from the last checkpoint: the step count continues
    from it and the run finishes.

Every node lives in its own temp dir and process group, so nothing here joins or stops another Ray
instance of this machine (never `ray stop`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import write_synth

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SAMPLES = 640  # 20 steps of the smoke recipe's global batch of 32: one epoch, no remainder
BATCH = 32
PER_EPOCH = SAMPLES // BATCH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, the process group `proc` leads (raylet, agents, workers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Cluster:
    """A head node and worker nodes, each `ray start --block` in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = tempfile.mkdtemp(prefix="rm", dir="/tmp")  # short: socket paths must fit 107 bytes
        home = root / "home"  # the token lives in ~/.ray/auth_token: keep the user's untouched
        home.mkdir()
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                    "TOKRAY_CACHE_DIR": str(root / "cache"),
                    # a SIGKILLed node is declared dead in seconds rather than the default ~30 s
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []
        self._logs = []
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True,
                       timeout=60)

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        self._logs.append(log)
        proc = subprocess.Popen([RAY, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                                 "--disable-usage-stats", *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def start_head(self) -> subprocess.Popen:
        head = self._start("head", "--head", f"--port={self.port}", "--include-dashboard=false",
                           f"--temp-dir={self.temp_dir}")
        self.wait_nodes(1)
        return head

    def add_worker(self, name: str) -> subprocess.Popen:
        count = len(self.alive_nodes())
        proc = self._start(name, f"--address={self.address}")
        self.wait_nodes(count + 1)
        return proc

    def alive_nodes(self) -> list[str]:
        """Node ids of the live nodes, from `ray list nodes`-free `ray status` (GCS only)."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False);"
                "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode:
            return []
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wait_nodes(self, n: int, timeout: float = 120) -> list[str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.nodes:
                if p.poll() is not None and p is not getattr(self, "_killed", None):
                    pass
            alive = self.alive_nodes()
            if len(alive) == n:
                return alive
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {n} live nodes in {timeout}s: {self.alive_nodes()}")

    def job(self, out: Path, data: str, *flags: str) -> subprocess.Popen:
        """`python jobs/pretrain.py --smoke-test` as a driver of this cluster (RAY_ADDRESS)."""
        return subprocess.Popen(
            [sys.executable, "jobs/pretrain.py", "--smoke-test", "--data", data, "--out", str(out), "--trace-batches",
             *flags], cwd=ROOT, env={**self.env, "RAY_ADDRESS": self.address}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def close(self) -> None:
        for proc in reversed(self.nodes):  # workers first, the head (GCS) last
            _kill_group(proc)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        t0 = time.time()
        c.start_head()
        print(f"head up: {time.time() - t0:.1f}s")
        c.add_worker("worker1")
        print(f"worker up: {time.time() - t0:.1f}s")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("tokens") / "synth")
    write_synth(uri, samples=SAMPLES, shard_rows=160)
    return uri


def _finish(job: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(job, grace=5)
        out, _ = job.communicate()
        raise AssertionError(f"the job did not finish in {timeout}s:\n{out[-4000:]}")
    return out


def _last_json(text: str) -> dict:
    return json.loads(next(ln for ln in reversed(text.splitlines()) if ln.startswith("{") and ln.endswith("}")))


def _traces(out: Path) -> dict[str, list[dict]]:
    """trace file name -> its lines (one per micro-batch)."""
    return {p.name: [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
            for p in sorted((out / "trace").glob("rank*.jsonl"))}


_NAME = re.compile(r"rank(\d+)-from(\d+)-([0-9a-f]{8})\.jsonl")


def test_one_worker_per_node_disjoint_equal_batches_cover_the_epoch(cluster, tokens, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    job = cluster.job(out, tokens, "--epochs", "1", "--max-steps", "1000")
    text = _finish(job, timeout=240)
    (Path("/tmp/mn_epoch.log")).write_text(text)
    print(f"epoch run: {time.time() - t0:.1f}s")
    assert job.returncode == 0, text[-4000:]
    assert _last_json(text)["step"] == PER_EPOCH, text[-2000:]

    traces = _traces(out)
    names = {name: _NAME.fullmatch(name).groups() for name in traces}
    assert sorted(r for r, _, _ in names.values()) == ["0", "1"], names  # one start per rank, no restart
    assert all(frm == "0" for _, frm, _ in names.values()), names
    nodes = {node for _, _, node in names.values()}
    assert len(nodes) == 2, f"both workers ran on one node: {names}"
    assert nodes <= {n[:8] for n in cluster.alive_nodes()}, (nodes, cluster.alive_nodes())

    by_step = defaultdict(dict)
    for lines in traces.values():
        for ln in lines:
            assert ln["world"] == 2 and ln["epoch"] == 0, ln
            assert ln["rank"] not in by_step[ln["step"]], f"rank {ln['rank']} traced step {ln['step']} twice"
            by_step[ln["step"]][ln["rank"]] = ln["sample_ids"]
    assert sorted(by_step) == list(range(PER_EPOCH))
    seen = []
    for step, ranks in sorted(by_step.items()):
        assert sorted(ranks) == [0, 1], f"step {step}: ranks {sorted(ranks)}"
        a, b = ranks[0], ranks[1]
        assert len(a) == len(b) == BATCH // 2, f"step {step}: batch sizes {len(a)}, {len(b)}"
        assert not set(a) & set(b), f"step {step}: both ranks got samples {sorted(set(a) & set(b))}"
        seen += a + b
    assert sorted(seen) == list(range(SAMPLES)), "the epoch did not cover every sample exactly once"
