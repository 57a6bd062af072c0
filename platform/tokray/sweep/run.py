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


def run_phase(name: str, trials: list[dict], sweep, use_asha: bool = False) -> list[dict]:
    """Run (or continue) the trials of one phase; returns each trial's dict merged with its last result."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if not trials:
        return []
    storage = os.path.join(os.path.abspath(sweep.out), "tune")
    path = os.path.join(storage, name)
    # the trial holds no CPU (only a little memory; Ray refuses an empty bundle): its Ray Train worker does
    # (1 CPU), so `concurrent` trials fit `concurrent` CPUs
    trainable = tune.with_resources(tune.with_parameters(_indexed_trial, trials=trials, sweep=dataclasses.asdict(sweep)),
                                    tune.PlacementGroupFactory([{"CPU": 0, "memory": 256 * 2**20}]))
    _pin_plan(storage, name, trials, sweep.overrides)
    if tune.Tuner.can_restore(path):
        log.info("%s: restoring the Tune experiment at %s (finished trials are kept)", name, path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        scheduler = None
        if use_asha:  # stops trials whose per-epoch val top-1 trails at 1, 2, 4... epochs
            scheduler = ASHAScheduler(time_attr="epoch", metric="val_top1", mode="max", max_t=max(1.0, sweep.epochs),
                                      grace_period=1.0, reduction_factor=2)
        tuner = tune.Tuner(trainable, param_space={"index": tune.grid_search(list(range(len(trials))))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=sweep.concurrent, scheduler=scheduler),
                           run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1))
    grid = tuner.fit()
    rows = []
    for result in grid:
        trial = trials[result.config["index"]]
        metrics = dict(result.metrics or {})
        if result.error is not None:
            log.warning("%s trial %s failed: %s", name, trial["out"], str(result.error).splitlines()[-1:])
            metrics["error"] = str(result.error).splitlines()[-1] if str(result.error) else "error"
        rows.append({**trial, **metrics})
    return sorted(rows, key=lambda r: r["out"])


def _pin_plan(storage: str, name: str, trials: list[dict], overrides: tuple = ()) -> None:
    """Tune restores trials by index into this list: a rerun with other settings must not reuse the state."""
    import json

    os.makedirs(storage, exist_ok=True)
    path = os.path.join(storage, f"{name}.plan.json")
    pinned = {"trials": trials, "overrides": [list(o) for o in overrides]} if overrides else trials
    plan = json.dumps(pinned, sort_keys=True, indent=1, default=str)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() != plan:
                raise ValueError(f"the sweep under {os.path.dirname(storage)} was started with other settings "
                                 f"(budgets, recipes, epochs, pixel sizes or data); rerun it with the same flags to "
                                 f"continue it, or give a new --out")
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(plan)
    os.replace(tmp, path)
