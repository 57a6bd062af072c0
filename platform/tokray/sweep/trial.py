"""One sweep trial as a Ray Tune function trainable: a Ray Train run inside it (Ray 2.60: a Tuner takes
no Trainer; ``TuneReportCallback`` forwards ``ray.train.report``s to Tune), then robustness.

A trial resumes from the latest checkpoint in its run dir, so ``Tuner.restore`` after an
interruption loses at most ``ckpt_every`` steps of each unfinished trial.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def run_trial(params: dict) -> None:
    from ray import tune

    import argparse
    import dataclasses

    from tokray.overrides import apply_overrides
    from tokray.recipes import get_recipe
    from tokray.runtime import setup_logging
    from tokray.sweep.plan import SweepConfig, run_overrides
    from tokray.sweep.space import sampled_overrides
    from tokray.train.launch import fit, prepare, tracking_from_args

    setup_logging()
    sweep = SweepConfig(**params["sweep"])
    recipe = get_recipe(params["recipe"])
    if sweep.overrides and params.get("kind") == "tokens":  # the swept recipes, not MTM or the pixel baselines
        recipe = apply_overrides(recipe, [tuple(o) for o in sweep.overrides])
    if params.get("sampled"):  # a search's sample (tokray.sweep.space), checked against the recipe up front
        recipe = apply_overrides(recipe, sampled_overrides(params["sampled"], sweep.space))
    plan = prepare(dataclasses.replace(recipe, **run_overrides(sweep, params)), resume=True)
    cfg = plan.config
    metrics = _finished_metrics(plan)
    if metrics is not None:
        log.info("%s already finished; reporting its result", cfg.out)
    else:
        tracking = tracking_from_args(argparse.Namespace(mlflow=sweep.mlflow)) if sweep.mlflow else None
        result = fit(plan, callbacks=[_tune_reports(cfg.task)], tracking=tracking)
        metrics = dict(result.metrics or {})
    final = {k: metrics.get(k) for k in ("step", "epoch", "loss", "val_top1", "samples_per_s")}
    if cfg.task == "classify" and sweep.images:
        final.update(corrupted_top1(cfg.out, sweep))
    tune.report({**final, "done": True})


def _tune_reports(task: str):
    """Ray Train's reports forwarded to Tune; for fine-tuning only those that carry ``val_top1``: ASHA and the
    searchers decide on it (Optuna reads it from every result) and Tune refuses a result without the metric its
    scheduler expects, while the step logs in between carry only loss and speed."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if "val_top1" in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReports() if task == "classify" else TuneReportCallback()


def _finished_metrics(plan) -> dict | None:
    """The last metrics of a run whose latest checkpoint is its final step (a restored sweep); else None."""
    import json
    import os

    from tokray.train.checkpoint import load_state

    latest = plan.resume_from  # prepare(resume=True): the run dir's latest checkpoint
    if not latest or load_state(latest)[0]["step"] < plan.steps[1]:
        return None
    with open(os.path.join(latest, "metrics.json")) as f:
        return json.load(f)


def corrupted_top1(run_dir: str, sweep) -> dict:
    """Top-1 on the raw validation images under each corruption, tokenized on the fly."""
    import torch

    from tokray.eval.corrupt import CORRUPTIONS, corrupt
    from tokray.eval.classify import evaluate_checkpoint

    out = {}
    for kind in CORRUPTIONS:
        gen = torch.Generator().manual_seed(sweep.seed)
        res = evaluate_checkpoint(run_dir, images=sweep.images, split="val", limit=sweep.eval_limit,
                                  transform=lambda px, kind=kind: corrupt(px, kind, sweep.corruption_severity, gen))
        out[f"top1_{kind}"] = res["top1"]
    return out
