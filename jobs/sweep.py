"""Storage budget x recipe sweep on Ray Tune, with pixel baselines at matched bytes: the storage-vs-accuracy table.

  python jobs/sweep.py --images ../shared/datasets/cifar10-train.tar          # the default CIFAR sweep (hours on CPU)
  python jobs/sweep.py --images ../shared/datasets/cifar10-train.tar          # again after an interruption: continues
  python jobs/sweep.py --budgets 100% 10% --recipes cifar_seit cifar_seitpp --epochs 5 --asha
  python jobs/sweep.py --smoke-test                                          # a two-trial sweep in seconds

Phases: (1) one class-stratified token subset per budget (bytes on the store never above the budget);
(2) one MTM pre-training per budget and MTM recipe, shared by every trial that fine-tunes it; (3)
the fine-tuning trials (and pixel baselines: the same training images as downsampled JPEGs whose
store bytes fit the budget, a pixel ViT of the same width, depth and sequence length), each a Ray
Train run inside a Tune trial, then top-1 on the validation split, clean and under Gaussian noise
and blur (raw images corrupted with kornia, then tokenized on the fly). Each phase is a Tune
experiment under <out>/tune/ and is restored with Tuner.restore when rerun. Writes results.md,
results.csv and results.png into <out> (or --results-dir); prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import logging
import os

from tokray.cli import parse_args, print_result, print_table, run_main

log = logging.getLogger("tokray.jobs.sweep")

SMOKE = {"budgets": ("2%", "1%"), "recipes": ("cifar_seit",), "pixel_sizes": (), "epochs": 1.0, "mtm_epochs": 1.0,
         "max_steps": 3, "model_args": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "eval_limit": 100}


def main() -> int:
    from tokray.recipes import describe_recipes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/sweep", help="sweep directory (data, MTM runs, trials, Tune state, results)")
    p.add_argument("--data", help="token training set (default: the embedded CIFAR-10 tokens)")
    p.add_argument("--eval-data", help="token validation set (default: the embedded validation split)")
    p.add_argument("--images", help="the raw images behind the tokens: pixel baselines and robustness (corrupted val)")
    p.add_argument("--budgets", nargs="+", help="storage budgets: 100%% 30%% 10%% (default), or bytes (2MB) or Nsamples")
    p.add_argument("--recipes", nargs="+", help=f"fine-tuning recipes (default the four CIFAR ones):\n{describe_recipes('classify')}")
    p.add_argument("--pixel-sizes", nargs="*", type=int, help="pixel baseline sides (default 32 16 8; none: no baselines)")
    p.add_argument("--epochs", type=float, help="fine-tuning epochs per trial (default 3)")
    p.add_argument("--mtm-epochs", type=float, help="MTM pre-training epochs per budget (default 3)")
    p.add_argument("--concurrent", type=int, help="trials at once, one CPU (or GPU worker) each (default 2)")
    p.add_argument("--asha", action="store_true", help="ASHA early stopping on per-epoch val top-1")
    p.add_argument("--severity", type=int, help="corruption severity 1-5 (default 3)")
    p.add_argument("--results-dir", help="where results.md/.csv/.png go (default: --out)")
    p.add_argument("--smoke-test", action="store_true", help="a two-trial sweep with a tiny model: seconds")
    from tokray.train.launch import add_override_args, add_tracking_args

    add_override_args(p)  # the same --config / --set / --mlflow as pretrain.py and finetune.py, for every trial
    add_tracking_args(p)
    args = parse_args(p)

    import dataclasses

    from tokray.runtime import init_ray
    from tokray.sweep.plan import SweepConfig, materialize_subsets, mtm_runs, token_trials
    from tokray.sweep.report import write_results
    from tokray.sweep.run import run_phase

    fields = {"out": args.out, "data": args.data, "eval_data": args.eval_data, "images": args.images,
              "budgets": tuple(args.budgets) if args.budgets else None,
              "recipes": tuple(args.recipes) if args.recipes else None,
              "pixel_sizes": tuple(args.pixel_sizes) if args.pixel_sizes is not None else None,
              "epochs": args.epochs, "mtm_epochs": args.mtm_epochs, "concurrent": args.concurrent, "asha": args.asha,
              "corruption_severity": args.severity}
    smoke = {**SMOKE, **({"budgets": ("2%",), "pixel_sizes": (16, 8)} if args.images else {})}  # 2 trials either way
    base = SweepConfig(**smoke) if args.smoke_test else SweepConfig()
    cfg = dataclasses.replace(base, **{k: v for k, v in fields.items() if v is not None})
    cfg = _with_trial_overrides(cfg, args)
    init_ray()
    subsets = materialize_subsets(cfg)
    run_phase("mtm", mtm_runs(cfg, subsets), cfg)
    trials = token_trials(cfg, subsets)
    if cfg.images and cfg.pixel_sizes:
        from tokray.sweep.pixels import pixel_trials

        trials += pixel_trials(cfg, subsets)
    rows = run_phase("finetune", trials, cfg, use_asha=cfg.asha)
    res = write_results(rows, args.results_dir or os.path.abspath(cfg.out),
                        title=f"CIFAR-10 tokens vs pixels, {cfg.epochs:g} fine-tuning epochs")
    print_table(res["rows"], ["budget", "store_bytes", "pct_jpeg", "method", "top1", "top1_gaussian_noise",
                              "top1_gaussian_blur"])
    return print_result({"results_md": res["md"], "results_csv": res["csv"], "plot": res["png"], "trials": len(rows),
                         "failed": sum(1 for r in rows if r.get("error")),
                         "rows": [{k: r[k] for k in ("budget", "store_bytes", "method", "top1")} for r in res["rows"]]})


def _with_trial_overrides(cfg, args):
    """--config / --set (checked against every swept recipe now, so a bad key fails before any trial) and
    --mlflow, handed to the trials through the SweepConfig."""
    import dataclasses

    from tokray.overrides import apply_overrides, load_config_file, parse_set
    from tokray.recipes import get_recipe

    overrides = [o for path in args.config_files for o in load_config_file(path)] + parse_set(args.overrides)
    if not (overrides or args.mlflow):
        return cfg
    for r in cfg.recipes:
        apply_overrides(get_recipe(r), overrides)
    return dataclasses.replace(cfg, overrides=tuple(overrides), mlflow=args.mlflow or "")


if __name__ == "__main__":
    run_main(main)
