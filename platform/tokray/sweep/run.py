"""Ray Tune phases of a sweep: each phase is one Tuner over a list of trials, restored when its
experiment state exists (so an interrupted sweep continues, keeping every finished trial)."""

from __future__ import annotations

import dataclasses
import logging
import os

log = logging.getLogger(__name__)


def _indexed_trial(config: dict, trials: list[dict] | None = None, sweep: dict | None = None) -> None:
    from tokray.sweep.trial import run_trial

    run_trial({**trials[config["index"]], "sweep": sweep})


def _searched_trial(config: dict, trial: dict | None = None, sweep: dict | None = None) -> None:
    """One sample of a search: the base trial with the sampled settings, in a run dir of its own (Tune's trial
    id, which a restored experiment keeps, so an interrupted sample continues from its checkpoint)."""
    from ray import tune

    from tokray.sweep.trial import run_trial

    out = os.path.join(trial["out"], tune.get_context().get_trial_id())
    run_trial({**trial, "out": out, "sampled": {k: config[k] for k in trial["space_keys"]}, "sweep": sweep})


def _scheduler(sweep, trials: list[dict]):
    """ASHA on val top-1 (reported at epoch ends) in the protocol's unit of time (steps: the same for every
    budget), stopping trials that trail at 1/8, 1/4 and 1/2 of the run."""
    from ray.tune.schedulers import ASHAScheduler

    if sweep.protocol == "steps":
        attr, max_t = "step", max(t["steps"] for t in trials)
    else:
        attr, max_t = "epoch", max(1.0, sweep.epochs)
    return ASHAScheduler(time_attr=attr, metric="val_top1", mode="max", max_t=max_t, grace_period=max_t / 8,
                         reduction_factor=2)


def _tuner(name: str, trainable, sweep, param_space: dict, *, search_alg=None, num_samples: int = 1,
           scheduler=None):
    """A new Tuner for experiment ``name``, or the interrupted one restored (its finished trials kept)."""
    from ray import tune

    storage = os.path.join(os.path.abspath(sweep.out), "tune")
    path = os.path.join(storage, name)
    if tune.Tuner.can_restore(path):
        log.info("%s: restoring the Tune experiment at %s (finished trials are kept)", name, path)
        return tune.Tuner.restore(path, trainable, resume_errored=True)
    return tune.Tuner(trainable, param_space=param_space,
                      tune_config=tune.TuneConfig(max_concurrent_trials=sweep.concurrent, num_samples=num_samples,
                                                  search_alg=search_alg,
                                                  scheduler=scheduler),
                      run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1))


def _with_resources(trainable):
    """The trial holds no CPU (only a little memory; Ray refuses an empty bundle): its Ray Train worker does (1
    CPU, or 1/trials_per_gpu of a GPU), so `concurrent` trials fit `concurrent` CPUs."""
    from ray import tune

    return tune.with_resources(trainable, tune.PlacementGroupFactory([{"CPU": 0, "memory": 256 * 2**20}]))


def _row(trial: dict, result, name: str) -> dict:
    metrics = dict(result.metrics or {})
    if result.error is not None:
        log.warning("%s trial %s failed: %s", name, trial["out"], str(result.error).splitlines()[-1:])
        metrics["error"] = str(result.error).splitlines()[-1] if str(result.error) else "error"
    return {**trial, **metrics}


def run_phase(name: str, trials: list[dict], sweep, use_asha: bool = False) -> list[dict]:
    """Run (or continue) the trials of one phase; returns each trial's dict merged with its last result."""
    from ray import tune

    if not trials:
        return []
    _pin_plan(os.path.join(os.path.abspath(sweep.out), "tune"), name, trials, sweep)
    trainable = _with_resources(tune.with_parameters(_indexed_trial, trials=trials, sweep=dataclasses.asdict(sweep)))
    tuner = _tuner(name, trainable, sweep, {"index": tune.grid_search(list(range(len(trials))))},
                   scheduler=_scheduler(sweep, trials) if use_asha else None)
    grid = tuner.fit()
    _stop_if_interrupted(name, grid)
    return sorted((_row(trials[r.config["index"]], r, name) for r in grid), key=lambda r: r["out"])


def _stop_if_interrupted(name: str, grid) -> None:
    """Tune returns from fit() when interrupted (SIGINT) with trials neither terminated (finished, or stopped by
    ASHA) nor errored: the sweep stops there, not going on to the next phase (fine-tuning a half-trained MTM
    checkpoint) or writing a table that looks complete."""
    if len(grid) > grid.num_terminated + grid.num_errors:
        raise KeyboardInterrupt(f"{name}: {len(grid) - grid.num_terminated - grid.num_errors} trials unfinished")


def require_finished(rows: list[dict], what: str) -> None:
    """Every run of a phase others build on ran to its end (a failed or stopped MTM pre-training must not be
    fine-tuned)."""
    failed = [r for r in rows if not r.get("done")]
    if failed:
        why = f"failed ({failed[0]['error']})" if failed[0].get("error") else "did not finish"
        raise ValueError(f"{what} {failed[0]['out']} {why}; the trials that fine-tune it cannot run. Fix the cause "
                         f"and rerun the same command: finished runs are kept")


def run_search(trials: list[dict], sweep) -> list[dict]:
    """Each token trial (budget x recipe) searched over ``sweep.space``: one Tune experiment per base trial
    (``tune/search-<trial>``), ``sweep.num_samples`` samples (or the whole grid) with ``sweep.search``'s
    searcher, so the best setting is found per budget. Rows carry the sampled values under their keys."""
    from ray import tune

    from tokray.sweep.space import param_space, search_alg

    keys = [p.key for p in sweep.space]
    storage = os.path.join(os.path.abspath(sweep.out), "tune")
    rows = []
    for trial in trials:
        name = f"search-{os.path.basename(trial['out'])}"
        _pin_plan(storage, name, [trial], sweep)
        base = {**trial, "space_keys": keys}
        trainable = _with_resources(tune.with_parameters(_searched_trial, trial=base, sweep=dataclasses.asdict(sweep)))
        tuner = _tuner(name, trainable, sweep, param_space(sweep.space, sweep.search),
                       search_alg=search_alg(sweep.search, sweep.seed),
                       num_samples=1 if sweep.search == "grid" else sweep.num_samples,
                       scheduler=_scheduler(sweep, [trial]) if sweep.asha else None)
        grid = tuner.fit()
        _stop_if_interrupted(name, grid)
        rows += [_sample_row(trial, r, name, keys) for r in grid]
    return sorted(rows, key=lambda r: r["out"])


def _sample_row(trial: dict, result, name: str, keys: list[str]) -> dict:
    """One sample of a search: its own run dir (Tune's trial id) and the sampled values under their keys."""
    trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path)
    return {**_row({**trial, "out": os.path.join(trial["out"], trial_id)}, result, name),
            "space": {k: (result.config or {}).get(k) for k in keys}}  # None for a trial that died unstarted


def split_reference(trials: list[dict]) -> tuple[list[dict], list[dict]]:
    """The full-pixel reference apart from the other fine-tuning trials: it is its own Tune experiment
    (``tune/reference``), so a sweep can add it later (it is the same run under both protocols at 100%)
    without changing the pinned plan of its other trials."""
    return ([t for t in trials if t.get("method") == "pixels-full"],
            [t for t in trials if t.get("method") != "pixels-full"])


def finished_rows(reference: list[dict], trials: list[dict], sweep) -> list[dict]:
    """The fine-tuning trials that have finished so far (of a running or interrupted sweep), read from their
    Tune experiments without running anything: ``--report``."""
    from ray import tune

    storage = os.path.join(os.path.abspath(sweep.out), "tune")
    keys = [p.key for p in sweep.space]
    phases = [("reference", reference, _indexed_trial, {"trials": reference})] if reference else []
    if sweep.space:  # one experiment per token trial; pixel trials are one "finetune" phase
        tokens = [t for t in trials if t["kind"] == "tokens"]
        phases += [(f"search-{os.path.basename(t['out'])}", [t], _searched_trial, {"trial": {**t, "space_keys": keys}})
                   for t in tokens]
        rest = [t for t in trials if t["kind"] != "tokens"]
    else:
        rest = trials
    if rest:
        phases.append(("finetune", rest, _indexed_trial, {"trials": rest}))
    rows = []
    for name, listed, fn, kw in phases:
        path = os.path.join(storage, name)
        if not tune.Tuner.can_restore(path):
            continue
        trainable = _with_resources(tune.with_parameters(fn, sweep=dataclasses.asdict(sweep), **kw))
        for r in tune.Tuner.restore(path, trainable).get_results():
            if not (r.metrics or {}).get("done"):
                continue
            rows.append(_row(listed[r.config["index"]], r, name) if name in ("reference", "finetune")
                        else _sample_row(listed[0], r, name, keys))
    return sorted(rows, key=lambda r: r["out"])


def _pin_plan(storage: str, name: str, trials: list[dict], sweep) -> None:
    """Tune restores trials by index into this list (and searches by their space): a rerun with other settings
    must not reuse the state."""
    import json

    os.makedirs(storage, exist_ok=True)
    path = os.path.join(storage, f"{name}.plan.json")
    pinned = {"trials": trials}
    if sweep.overrides:
        pinned["overrides"] = [list(o) for o in sweep.overrides]
    if sweep.space:
        pinned.update(space=[dataclasses.asdict(p) for p in sweep.space], search=sweep.search,
                      num_samples=sweep.num_samples)
    plan = json.dumps(pinned if len(pinned) > 1 else trials, sort_keys=True, indent=1, default=str)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != plan:
                raise ValueError(f"the sweep under {os.path.dirname(storage)} was started with other settings "
                                 f"(budgets, recipes, protocol, epochs/steps, pixel sizes, space or data); rerun it "
                                 f"with the same flags to continue it, or give a new --out")
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(plan)
    os.replace(tmp, path)
