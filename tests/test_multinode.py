"""Multi-node on one machine: a real 2-node Ray cluster (`ray start --head` plus a second raylet from
`ray start --address`, 1 CPU each, token auth), smoke pre-training (`jobs/pretrain.py --smoke-test
--trace-batches` as the cluster's driver) with one Ray Train worker per node on the streaming split.

(a) one epoch, traced: per step the two ranks' sample ids are disjoint and equal in size, and over
    the epoch every sample id is seen exactly once.
(b) the non-head node is SIGKILLed (its whole process tree) once the Train controller has registered
    a checkpoint; a replacement node joins (what an autoscaler does) and Ray Train restarts the
    worker group from the last checkpoint: the step count continues from it and the run finishes.

Every node lives in its own temp dir and process group, so nothing here joins or stops another Ray
instance of this machine (never `ray stop`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import write_synth
from raycluster import Cluster, stop_process_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, BATCH = 640, 32  # the smoke recipe's global batch: one epoch = 20 steps, no remainder
PER_EPOCH = SAMPLES // BATCH
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TRACE = re.compile(r"rank(\d+)-from(\d+)-([0-9a-f]{8})\.jsonl")


def _job(cluster, out: Path, data: str, *flags: str) -> "Job":
    return Job([sys.executable, "jobs/pretrain.py", "--smoke-test", "--data", data, "--out", str(out),
                "--trace-batches", *flags], env=cluster.env)


class Job:
    """`python jobs/pretrain.py` as a driver of the cluster (RAY_ADDRESS); its output read as it comes."""

    def __init__(self, cmd: list[str], env: dict):
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(f"[{time.time() - self.t0:6.1f}s] {ANSI.sub('', line.rstrip())}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout: float, log: Path) -> str:
        """Wait for the job to end; its output (time-stamped) is also kept in `log`."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_tree(self.proc, grace=5)
            self._reader.join(10)
            log.write_text(self.text)
            raise AssertionError(f"the job did not finish in {timeout}s:\n{self.text[-6000:]}") from None
        self._reader.join(30)
        log.write_text(self.text)
        return self.text

    def result(self) -> dict:
        """The job's last JSON line."""
        for line in reversed(self.lines):
            body = line.split("] ", 1)[1].strip()
            if body.startswith("{") and body.endswith("}"):
                return json.loads(body)
        raise AssertionError(f"no result line:\n{self.text[-4000:]}")

    def kill(self) -> None:
        stop_process_tree(self.proc, grace=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        t0 = time.time()
        c.start_head()
        c.add_worker("worker1")
        print(f"\n2-node cluster up in {time.time() - t0:.1f}s")
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("tokens") / "synth")
    write_synth(uri, samples=SAMPLES, shard_rows=160)
    return uri


def _traces(out: Path) -> dict[tuple[int, int, str], list[dict]]:
    """(rank, from step, node id prefix) -> the file's lines (one per micro-batch)."""
    found = {}
    for p in sorted((out / "trace").glob("*.jsonl")):
        m = TRACE.fullmatch(p.name)
        assert m, f"unexpected trace file {p.name}"
        found[int(m[1]), int(m[2]), m[3]] = [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
    return found


def _by_step(lines: list[dict]) -> dict[int, dict[int, list[int]]]:
    """step -> rank -> sample ids; a rank tracing a step twice within one attempt fails."""
    steps = defaultdict(dict)
    for ln in lines:
        assert ln["world"] == 2, ln
        assert ln["rank"] not in steps[ln["step"]], f"rank {ln['rank']} traced step {ln['step']} twice"
        steps[ln["step"]][ln["rank"]] = ln["sample_ids"]
    return dict(steps)


def _check_split(steps: dict[int, dict[int, list[int]]]) -> None:
    for step, ranks in sorted(steps.items()):
        assert sorted(ranks) == [0, 1], f"step {step}: traced by ranks {sorted(ranks)}"
        a, b = ranks[0], ranks[1]
        assert len(a) == len(b) == BATCH // 2, f"step {step}: batch sizes {len(a)}, {len(b)}"
        assert not set(a) & set(b), f"step {step}: both ranks got samples {sorted(set(a) & set(b))}"


@pytest.mark.timeout(900)  # includes starting the cluster
def test_one_worker_per_node_disjoint_equal_batches_cover_the_epoch(cluster, tokens, tmp_path):
    out = tmp_path / "run"
    job = _job(cluster, out, tokens, "--epochs", "1", "--max-steps", "1000")
    text = job.wait(timeout=600, log=tmp_path / "job.log")
    print(f"one-epoch run: {time.time() - job.t0:.1f}s")
    assert job.proc.returncode == 0, text[-6000:]
    assert job.result()["step"] == PER_EPOCH, text[-3000:]

    traces = _traces(out)
    starts = sorted((rank, frm) for rank, frm, _ in traces)
    assert starts == [(0, 0), (1, 0)], f"expected one start of each rank, from step 0: {list(traces)}"
    nodes = {node for _, _, node in traces}
    assert nodes == {cluster.node_ids["head"], cluster.node_ids["worker1"]}, (list(traces), cluster.node_ids)

    steps = _by_step([ln for lines in traces.values() for ln in lines])
    assert sorted(steps) == list(range(PER_EPOCH)), sorted(steps)
    assert {ln["epoch"] for lines in traces.values() for ln in lines} == {0}
    _check_split(steps)
    seen = [i for ranks in steps.values() for ids in ranks.values() for i in ids]
    assert sorted(seen) == list(range(SAMPLES)), "the epoch did not cover every sample exactly once"


def _registered_step(out: Path) -> int:
    """The step of the latest checkpoint the Train controller has registered (its snapshot file), else 0."""
    for p in (out / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(p.read_text()).get("latest_checkpoint_result") or {}
        except ValueError:  # being rewritten
            continue
        return int((latest.get("metrics") or {}).get("step", 0))
    return 0


@pytest.mark.timeout(900)
def test_killing_the_worker_node_restores_from_the_last_checkpoint(cluster, tokens, tmp_path):
    total = 2 * PER_EPOCH  # long enough that the run is still going when its first checkpoint is registered
    out = tmp_path / "run"
    job = _job(cluster, out, tokens, "--epochs", "2", "--max-steps", str(total), "--ckpt-every", "3",
                      "--max-failures", "1")
    try:
        deadline = time.time() + 480
        while (registered := _registered_step(out)) < 3:
            assert job.proc.poll() is None, f"the job ended before its first checkpoint:\n{job.text[-6000:]}"
            assert time.time() < deadline, f"no checkpoint registered in 480s:\n{job.text[-6000:]}"
            time.sleep(0.1)
        killed_at = time.time() - job.t0
        cluster.kill("worker1")
        assert job.proc.poll() is None, f"the run ended before the node was killed:\n{job.text[-4000:]}"
        # the replacement an autoscaler would start; its second CPU leaves room, beside the restarted workers'
        # placement group, to re-create data blocks that lived only in the dead node's object store
        cluster.add_worker("worker2", cpus=2)
        text = job.wait(timeout=600, log=tmp_path / "job.log")
    finally:
        job.kill()
    print(f"killed worker1 {killed_at:.1f}s into the run (checkpoint at step {registered} registered); "
          f"run: {time.time() - job.t0:.1f}s")
    assert job.proc.returncode == 0, text[-6000:]
    assert job.result()["step"] == total, text[-3000:]

    restored = {int(m) for m in re.findall(r"restored from checkpoint at step (\d+)", text)}  # lines may repeat
    assert len(restored) == 1, f"expected a restore from one checkpoint, got {restored}:\n{text[-6000:]}"
    k = restored.pop()
    assert k >= registered and k % 3 == 0 and k < total, (k, registered)

    traces = _traces(out)
    starts = sorted((rank, frm) for rank, frm, _ in traces)
    assert starts == [(0, 0), (0, k), (1, 0), (1, k)], f"expected each rank to start at 0, then at {k}: {starts}"
    head, dead, spare = (cluster.node_ids[n] for n in ("head", "worker1", "worker2"))
    assert {node for _, frm, node in traces if frm == 0} == {head, dead}, (list(traces), cluster.node_ids)
    assert {node for _, frm, node in traces if frm == k} <= {head, spare}, (list(traces), cluster.node_ids)

    first = _by_step([ln for (_, frm, _), lines in traces.items() if frm == 0 for ln in lines])
    second = _by_step([ln for (_, frm, _), lines in traces.items() if frm == k for ln in lines])
    assert set(range(k)) <= set(first), sorted(first)  # the first attempt ran every step up to its checkpoint
    _check_split({step: first[step] for step in range(k)})
    assert sorted(second) == list(range(k, total)), f"the restored run did not continue at {k}: {sorted(second)}"
    _check_split(second)
    for (rank, frm, _), lines in traces.items():
        if frm == k:  # each restored rank steps K, K+1, ..., in order, across the epoch boundary
            assert [ln["step"] for ln in lines] == list(range(k, total)), f"rank {rank}"
            assert [ln["epoch"] for ln in lines] == [s // PER_EPOCH for s in range(k, total)], f"rank {rank}"
