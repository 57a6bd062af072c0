"""Training ingest (tokray.data.order, tokray.data.ingest): one global sample order for any worker count.

Unit checks of the order, then smoke pre-training in the session's Ray (the trainer API in-process, as
`jobs/pretrain.py --smoke-test --trace-batches` runs it) with 1, 2 and 4 workers, streamed and materialized,
from a local store and from S3: every run's per-step union of sample ids is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import write_synth
from tokray.data.ingest import needed_shards, resolve_mode, rows_in_rank_slices
from tokray.data.order import SampleOrder

SAMPLES, SHARD_ROWS, BATCH = 640, 80, 32  # 8 shards; the smoke recipe's batch: 20 steps an epoch
WINDOW = 160  # 2 shards a window: 4 windows an epoch


def _order(shard_rows=(SHARD_ROWS,) * 8, seed=0, window=WINDOW, batch=BATCH, split="interleaved") -> SampleOrder:
    return SampleOrder.for_dataset(shard_rows, seed, window, batch, split)


def _global_rows(order: SampleOrder, epoch: int, rank: int, world: int, start: int = 0) -> list[int]:
    """Rank's rows as global row numbers (shard first row + row), in its training order."""
    firsts = np.concatenate([[0], np.cumsum(order.shard_rows)[:-1]])
    out = []
    for w in order.windows(epoch, start):
        flat = np.concatenate([firsts[s] + np.arange(order.shard_rows[s]) for s in w.shards])
        out += flat[order.rank_rows(epoch, w, rank, world, start)].tolist()
    return out


def _steps(rows: list[int], per_step: int) -> list[frozenset]:
    return [frozenset(rows[i:i + per_step]) for i in range(0, len(rows), per_step)]


@pytest.mark.parametrize("split", ["interleaved", "storage"])
def test_the_per_step_union_is_the_same_for_any_worker_count(split):
    order = _order(shard_rows=(80, 80, 70, 80, 80, 80, 80, 75), split=split)  # uneven shards; the remainder is dropped
    one = _steps(_global_rows(order, 3, 0, 1), BATCH)
    assert len(one) == order.steps_per_epoch == sum(order.shard_rows) // BATCH
    for world in (2, 4, 8):
        parts = [_steps(_global_rows(order, 3, r, world), BATCH // world) for r in range(world)]
        assert all(len(p) == len(one) for p in parts)
        assert [frozenset().union(*(p[s] for p in parts)) for s in range(len(one))] == one, world


def test_each_epoch_is_a_new_permutation_and_the_order_repeats_for_the_seed():
    order = _order()
    e0, e1 = _global_rows(order, 0, 0, 1), _global_rows(order, 1, 0, 1)
    assert sorted(e0) == sorted(e1) == list(range(SAMPLES)) and e0 != e1
    assert _global_rows(_order(), 0, 0, 1) == e0 and _global_rows(_order(seed=1), 0, 0, 1) != e0
    # a window mixes its shards: the first global batch holds rows of both
    first = set(e0[:BATCH])
    shards = {r // SHARD_ROWS for r in first}
    assert len(shards) == 2, shards


@pytest.mark.parametrize("split", ["interleaved", "storage"])
def test_a_position_skips_whole_windows_then_rows(split):
    order = _order(split=split)
    start = 6 * BATCH  # 192: window 0 (positions 0..159) is done, window 1 half done
    windows = order.windows(2, start)
    assert [w.index for w in windows] == [1, 2, 3]
    full = _global_rows(order, 2, 0, 1)
    assert _global_rows(order, 2, 0, 1, start) == full[start:]  # one worker: the order itself, either split
    for world in (2, 4):
        rest = [_global_rows(order, 2, r, world, start) for r in range(world)]
        assert sorted(sum(rest, [])) == sorted(full[start:])


@pytest.mark.parametrize("world", [2, 4, 8])
def test_a_rank_reads_about_its_share_of_a_windows_shards(world):
    """32 shards of 8,192 in one window, global batch 1,024: a rank's rows lie in ~32/W shards, plus the few
    that its batches' boundary with the next rank crosses."""
    order = SampleOrder.for_dataset((8192,) * 32, 0, 32 * 8192, 1024, split="storage")
    (w,) = order.windows(0)
    sizes = []
    for rank in range(world):
        shards, _ = needed_shards(tuple(order.shard_rows[s] for s in w.shards), order.rank_rows(0, w, rank, world))
        sizes.append(len(shards))
    assert max(sizes) <= 32 // world + 4, sizes  # W=2: 18 each, not 32


@pytest.mark.parametrize("split", ["interleaved", "storage"])
def test_reading_only_the_needed_shards_gives_the_same_rows(split):
    order = _order(shard_rows=(80, 80, 70, 80, 80, 80, 80, 75), window=4 * 80, split=split)
    firsts = np.concatenate([[0], np.cumsum(order.shard_rows)[:-1]])
    for w in order.windows(1):
        flat = np.concatenate([firsts[s] + np.arange(order.shard_rows[s]) for s in w.shards])
        reads = 0
        for rank in range(4):
            rows = order.rank_rows(1, w, rank, 4)
            shards, renumbered = needed_shards(tuple(order.shard_rows[s] for s in w.shards), rows)
            kept = np.concatenate([firsts[w.shards[k]] + np.arange(order.shard_rows[w.shards[k]]) for k in shards])
            assert kept[renumbered].tolist() == flat[rows].tolist()
            reads += len(shards)
        if split == "storage":  # the ranks together read fewer shards than 4 whole windows
            assert reads < 4 * len(w.shards)


def test_one_stream_over_epochs_reads_what_the_epochs_read_one_by_one():
    """A stream from a mid-epoch position through later epochs plans the same read tasks, in order, as the
    epochs planned one at a time: the remaining windows of the first, then every window of the rest."""
    from tokray.data.ingest import STREAM_WINDOWS, Ingest, _WindowSource

    order = _order()
    ingest = Ingest("stream", "unused://", None, order)
    start = 7 * BATCH  # inside window 1 of epoch 2
    one = _WindowSource(ingest, 2, start, 1, 2, 4).parts
    by_epoch = [p for e in (2, 3, 4) for p in _WindowSource(ingest, e, start if e == 2 else 0, 1, 2, e).parts]
    assert one == by_epoch and [(e, w.index, s) for e, w, s in one[:4]] == [(2, 1, start), (2, 2, start),
                                                                            (2, 3, start), (3, 0, 0)]
    assert ingest.stream_end(2, 9) == 9  # 4 windows an epoch: the whole run in one stream
    assert ingest.stream_end(2, 10**6) == 2 + STREAM_WINDOWS // 4 - 1


@pytest.mark.parametrize("lo,hi,batch,per_rank,rank", [(0, 640, 32, 8, 3), (13, 301, 32, 16, 1), (5, 5, 8, 4, 0),
                                                       (100, 611, 64, 64, 0), (31, 97, 32, 8, 0)])
def test_rank_row_counts_match_the_rows(lo, hi, batch, per_rank, rank):
    pos = np.arange(lo, hi)
    assert rows_in_rank_slices(lo, hi, batch, per_rank, rank) == int(((pos % batch) // per_rank == rank).sum())


def test_auto_materializes_what_fits_the_object_store_share():
    assert resolve_mode("auto", 10 << 20, 100 << 20, 0.25) == "materialize"
    assert resolve_mode("auto", 30 << 20, 100 << 20, 0.25) == "stream"
    assert resolve_mode("stream", 1, 100 << 20, 0.25) == "stream"
    with pytest.raises(ValueError, match="choose one of auto, stream, materialize"):
        resolve_mode("lazy", 1, 1, 0.25)


# --- through Ray Train --------------------------------------------------------------------------------

def smoke_run(data: str, out: Path, workers: int, ingest: str, max_steps: int = 22, resume: bool = False, **extra):
    """`jobs/pretrain.py --smoke-test --trace-batches --num-workers W --ingest MODE` in this process."""
    from tokray.recipes import get_recipe
    from tokray.train.launch import fit, prepare

    cfg = get_recipe("smoke", out=str(out), data=data, num_workers=workers, cpus_per_worker=2 / workers,
                     ingest=ingest, shuffle_window=WINDOW, max_steps=max_steps, trace_batches=True, **extra)
    return fit(prepare(cfg, resume=resume))


def traced_steps(out: Path, below: int | None = None) -> dict[int, list[int]]:
    """step -> the sample ids all ranks trained on at it (from <out>/trace/rank*.jsonl)."""
    steps = defaultdict(list)
    for p in sorted((out / "trace").glob("rank*.jsonl")):
        for line in p.read_text().splitlines():
            d = json.loads(line)
            if below is None or d["step"] < below:
                steps[d["step"]] += d["sample_ids"]
    return dict(steps)


@pytest.fixture(scope="module")
def local_tokens(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("ingest") / "synth")
    write_synth(uri, samples=SAMPLES, shard_rows=SHARD_ROWS)
    return uri


@pytest.fixture(scope="module")
def reference(ray_session, local_tokens, tmp_path_factory) -> dict[int, frozenset]:
    out = tmp_path_factory.mktemp("ref")
    smoke_run(local_tokens, out, 1, "stream")
    steps = traced_steps(out)
    assert sorted(steps) == list(range(22))
    epoch0 = [i for s in range(20) for i in steps[s]]
    assert sorted(epoch0) == list(range(SAMPLES))  # every sample once in the epoch
    return {s: frozenset(ids) for s, ids in steps.items()}


@pytest.mark.ray
@pytest.mark.parametrize("workers,ingest,split", [(2, "stream", "interleaved"), (4, "stream", "interleaved"),
                                                  (1, "materialize", "interleaved"), (2, "materialize", "interleaved"),
                                                  (4, "materialize", "interleaved"), (2, "stream", "storage"),
                                                  (4, "stream", "storage"), (2, "materialize", "storage")])
def test_elastic_determinism_local(reference, local_tokens, tmp_path, workers, ingest, split):
    smoke_run(local_tokens, tmp_path, workers, ingest, rank_split=split)
    steps = traced_steps(tmp_path)
    assert {s: frozenset(ids) for s, ids in steps.items()} == reference
    assert all(len(ids) == BATCH for ids in steps.values())  # no sample twice in a step
    per_window = defaultdict(list)
    for d in reads_of(tmp_path, world=workers):
        per_window[(d["epoch"], d["window"])].append(len(d["shards"]))
    if split == "interleaved" or workers == 1:  # every rank reads each of its windows' 2 shards
        assert all(n == 2 for ns in per_window.values() for n in ns), per_window
    elif workers == 4:  # 8 of a batch's 32 samples a rank: the first and last ranks' lie in one shard
        assert sum(n == 1 for ns in per_window.values() for n in ns) >= len(per_window), per_window


@pytest.mark.ray
@pytest.mark.parametrize("workers,ingest", [(4, "stream"), (2, "materialize")])
def test_elastic_determinism_s3(reference, local_tokens, s3_bucket, tmp_path, workers, ingest):
    from tokray.storage.dataset import copy_dataset

    uri = f"s3://{s3_bucket}/ingest-{workers}-{ingest}"
    copy_dataset(local_tokens, uri)
    smoke_run(uri, tmp_path, workers, ingest)
    assert {s: frozenset(ids) for s, ids in traced_steps(tmp_path).items()} == reference


# --- exact resume -------------------------------------------------------------------------------------

def expected_steps(epochs: int) -> dict[int, frozenset]:
    """The uninterrupted run's per-step sample sets, from the order alone (synth sample id = global row)."""
    order = _order()
    out = {}
    for e in range(epochs):
        rows = _global_rows(order, e, 0, 1)
        out.update({e * order.steps_per_epoch + s: frozenset(rows[s * BATCH:(s + 1) * BATCH])
                    for s in range(order.steps_per_epoch)})
    return out


def kill_a_worker_at(out: Path, step: int, rank: int = 1, timeout: float = 300) -> threading.Thread:
    """SIGKILL rank's worker process once any rank has traced ``step`` (the pid is in its trace lines)."""
    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in (out / "trace").glob(f"rank{rank}-from0-*.jsonl"):
                lines = [json.loads(ln) for ln in p.read_text().splitlines() if ln.endswith("}")]
                if lines and lines[-1]["step"] >= step:
                    os.kill(lines[-1]["pid"], signal.SIGKILL)
                    return
            time.sleep(0.05)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def reads_of(out: Path, world: int) -> list[dict]:
    return [d for p in sorted((out / "trace" / "reads").glob("rank*.jsonl"))
            for d in map(json.loads, p.read_text().splitlines()) if d["world"] == world]


@pytest.mark.ray
def test_a_killed_run_resumed_on_fewer_workers_trains_every_sample_once(ray_session, local_tokens, tmp_path):
    import ray.train

    from tokray.train.checkpoint import latest_checkpoint, load_state

    total = 40  # two epochs of 20 steps
    killer = kill_a_worker_at(tmp_path, step=10)
    with pytest.raises(ray.train.WorkerGroupError):
        smoke_run(local_tokens, tmp_path, 2, "stream", max_steps=total, ckpt_every=3)
    killer.join(1)
    state, _, _ = load_state(latest_checkpoint(str(tmp_path)))
    resumed_at, position = state["step"], state["data_position"]
    assert 0 < resumed_at < 20 and position == {"epoch": 0, "samples": resumed_at * BATCH}

    smoke_run(local_tokens, tmp_path, 1, "stream", max_steps=total, ckpt_every=3, resume=True)
    first = {s: ids for s, ids in traced_steps(tmp_path, below=resumed_at).items()}
    later = {}
    for p in (tmp_path / "trace").glob(f"rank0-from{resumed_at}-*.jsonl"):
        for d in map(json.loads, p.read_text().splitlines()):
            later.setdefault(d["step"], []).extend(d["sample_ids"])
    assert set(first) == set(range(resumed_at)) and set(later) == set(range(resumed_at, total))
    steps = {**first, **later}
    assert {s: frozenset(ids) for s, ids in steps.items()} == expected_steps(2)
    epoch0 = Counter(i for s in range(20) for i in steps[s])
    assert epoch0 == Counter(range(SAMPLES))  # every sample of the epoch exactly once

    # the resumed run started its epoch at the checkpoint's position and never read the windows before it
    reads = reads_of(tmp_path, world=1)
    e0 = [r for r in reads if r["epoch"] == 0]
    assert e0 and all(r["start"] == resumed_at * BATCH for r in e0)
    skipped = {w.index for w in _order().windows(0) if w.end <= resumed_at * BATCH}
    assert skipped and not skipped & {r["window"] for r in e0}
    assert sorted(r["window"] for r in reads if r["epoch"] == 1) == [0, 1, 2, 3]


@pytest.mark.ray
def test_resume_continues_from_a_checkpoint_ray_never_registered(ray_session, local_tokens, tmp_path):
    """Rank 0 persists a checkpoint before the report that registers it, so a worker lost in between
    leaves the newest checkpoint on disk unknown to Ray's checkpoint manager, which hands a new fit of
    the run an older one. --resume continues from the newest (no step trained twice)."""
    from tokray.train.checkpoint import latest_checkpoint

    run, other = tmp_path / "run", tmp_path / "other"
    smoke_run(local_tokens, run, 1, "stream", max_steps=6, ckpt_every=3)  # Ray registers steps 3 and 6
    smoke_run(local_tokens, other, 1, "stream", max_steps=9, ckpt_every=3)  # the same run on to step 9
    nine = latest_checkpoint(str(other))
    shutil.copytree(nine, run / "ray" / "smoke" / os.path.basename(nine))  # on disk, never reported to Ray
    smoke_run(local_tokens, run, 1, "stream", max_steps=12, ckpt_every=3, resume=True)
    starts = sorted(int(p.name.split("-from")[1].split("-")[0]) for p in (run / "trace").glob("rank0-*"))
    assert starts == [0, 9], starts
    steps = traced_steps(run)
    assert sorted(steps) == [0, 1, 2, 3, 4, 5, 9, 10, 11]
    expected = expected_steps(1)
    assert all(frozenset(ids) == expected[s] for s, ids in steps.items())


@pytest.mark.ray
def test_a_worker_failure_restarts_from_the_checkpoint_position(ray_session, local_tokens, tmp_path):
    """FailureConfig: Ray Train restarts the worker group from its latest checkpoint; the restarted
    workers start the stream at the stored position, so every step trains on its planned samples."""
    total = 24
    killer = kill_a_worker_at(tmp_path, step=10)
    smoke_run(local_tokens, tmp_path, 2, "materialize", max_steps=total, ckpt_every=3, max_failures=1)
    killer.join(1)
    starts = sorted({int(p.name.split("-from")[1].split("-")[0]) for p in (tmp_path / "trace").glob("rank0-*")})
    # one restart, from a checkpoint (which one depends on how many steps ran before the SIGKILL landed)
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < total and starts[1] % 3 == 0, starts
    steps = {}
    for start in starts:  # a later start's lines replace what the failed attempt traced after its checkpoint
        for p in (tmp_path / "trace").glob(f"rank*-from{start}-*.jsonl"):
            for d in map(json.loads, p.read_text().splitlines()):
                steps.setdefault((start, d["step"]), []).extend(d["sample_ids"])
    merged = {}
    for (start, step), ids in sorted(steps.items()):
        if step >= start:
            merged[step] = frozenset(ids)
    want = expected_steps(2)
    assert merged == {s: want[s] for s in range(total)}
