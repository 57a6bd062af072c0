"""Storage budget x recipe sweep on Ray Tune, with pixel baselines at matched bytes and the full-pixel
reference: the storage-vs-accuracy table; optionally a Tune search over training/augmentation settings.

  python jobs/sweep.py --images ../shared/datasets/cifar10-train.tar          # the default CIFAR sweep (hours on CPU)
  python jobs/sweep.py --images ../shared/datasets/cifar10-train.tar          # again after an interruption: continues
  python jobs/sweep.py --budgets 100% 10% --recipes cifar_seit cifar_seitpp --steps 780 --asha
  python jobs/sweep.py --budgets 10% --recipes cifar_seitpp --space docs/sweep/space-aug.yaml --num-samples 8
  python jobs/sweep.py --preset gpu --images TAR                              # paper-like length, 4 trials per GPU
  python jobs/sweep.py --images ../shared/datasets/cifar10-train.tar --report # the trials finished so far
  python jobs/sweep.py --smoke-test                                          # a two-trial sweep in seconds

Phases: (1) one class-stratified token subset per budget (bytes on the store never above the budget);
(2) one MTM pre-training per budget and MTM recipe, shared by every trial that fine-tunes it; (3)
the fine-tuning trials (and, with --images, pixel baselines: the same training images as downsampled
JPEGs whose store bytes fit the budget, and the full-pixel reference `pixels-full`: every training
image at its own size and JPEG quality; a pixel ViT of the same width, depth and sequence length,
with random-resized crop, flip and CutMix/Mixup like the token recipes), each a Ray Train run inside
a Tune trial, then top-1 on the validation split, clean and under Gaussian noise and blur (raw images
corrupted with kornia, then tokenized on the fly). --protocol steps (default) trains every budget
for the same optimizer steps (MTM and fine-tuning), --protocol epochs for the same epochs. --space
turns each token trial into --num-samples Tune samples of the settings it names (--search random,
grid or optuna). Each phase is a Tune experiment under <out>/tune/ and is restored with
Tuner.restore when rerun. Writes results.md, results.csv and results.png (and results-space.png)
into <out> (or --results-dir); prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import logging
import os

from tokray.cli import parse_args, print_result, print_table, run_main

log = logging.getLogger("tokray.jobs.sweep")

SMOKE = {"budgets": ("2%", "1%"), "recipes": ("cifar_seit",), "pixel_sizes": (), "full_pixels": False, "epochs": 1.0,
         "mtm_epochs": 1.0, "max_steps": 3, "model_args": {"embed_dim": 32, "depth": 1, "num_heads": 2},
         "eval_limit": 100}


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
    p.add_argument("--no-full-pixels", action="store_true", help="no full-pixel reference (it needs --images)")
    p.add_argument("--protocol", choices=("steps", "epochs"),
                   help="steps (default): every budget trains the same optimizer steps (a 10%% subset 10x the\n"
                        "epochs); epochs: every budget the same epochs")
    p.add_argument("--epochs", type=float, help="fine-tuning epochs (default 3): of every trial (--protocol epochs), of\n"
                                                "the full set, i.e. the steps of every trial (--protocol steps)")
    p.add_argument("--mtm-epochs", type=float, help="MTM pre-training epochs, the same way (default 3)")
    p.add_argument("--steps", type=int, help="--protocol steps: fine-tuning steps of every trial (instead of --epochs)")
    p.add_argument("--mtm-steps", type=int, help="--protocol steps: MTM steps of every pre-training")
    p.add_argument("--concurrent", type=int, help="trials at once, one CPU (or GPU worker) each (default 2)")
    p.add_argument("--asha", action="store_true", help="ASHA early stopping on val top-1 (per epoch or per step)")
    p.add_argument("--space", metavar="FILE.yaml", help="Tune search space over TrainConfig/AugmentConfig keys, e.g.\n"
                                                        "`augment.noise_prob: {uniform: [0, 0.5]}` (tokray.sweep.space)")
    p.add_argument("--num-samples", type=int, help="--space: samples per budget and recipe (default 1)")
    p.add_argument("--search", choices=("random", "grid", "optuna"), help="--space: the searcher (default random)")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="cpu (default); gpu: 300 fine-tuning / 400 MTM epochs of the full set per run, 4 trials per\n"
                        "GPU (fractional GPUs), bf16")
    p.add_argument("--ingest", choices=("auto", "stream", "materialize"),
                   help="how every trial reads its training set (README, 'Training ingest'; default auto)")
    p.add_argument("--severity", type=int, help="corruption severity 1-5 (default 3)")
    p.add_argument("--results-dir", help="where results.md/.csv/.png go (default: --out)")
    p.add_argument("--report", action="store_true",
                   help="write the results of the trials finished so far (of a running or interrupted sweep, the\n"
                        "same flags) and run nothing")
    p.add_argument("--smoke-test", action="store_true", help="a two-trial sweep with a tiny model: seconds")
    from tokray.train.launch import add_override_args, add_tracking_args

    add_override_args(p)  # the same --config / --set / --mlflow as pretrain.py and finetune.py, for every trial
    add_tracking_args(p)
    args = parse_args(p)

    import dataclasses

    from tokray.runtime import init_ray
    from tokray.sweep.plan import (SweepConfig, full_set_samples, materialize_subsets, mtm_runs, preset, run_order,
                                   token_trials)
    from tokray.sweep.report import write_results
    from tokray.sweep.run import finished_rows, require_finished, run_phase, run_search, split_reference
    from tokray.sweep.space import load_space

    fields = {"out": args.out, "data": args.data, "eval_data": args.eval_data, "images": args.images,
              "budgets": tuple(args.budgets) if args.budgets else None,
              "recipes": tuple(args.recipes) if args.recipes else None,
              "pixel_sizes": tuple(args.pixel_sizes) if args.pixel_sizes is not None else None,
              "full_pixels": False if args.no_full_pixels else None, "protocol": args.protocol,
              "epochs": args.epochs, "mtm_epochs": args.mtm_epochs, "steps": args.steps, "mtm_steps": args.mtm_steps,
              "concurrent": args.concurrent, "asha": args.asha or None, "num_samples": args.num_samples,
              "search": args.search, "corruption_severity": args.severity, "ingest": args.ingest}
    smoke = {**SMOKE, **({"budgets": ("2%",), "pixel_sizes": (16, 8)} if args.images else {})}  # 2 trials either way
    base = SweepConfig(**smoke) if args.smoke_test else preset(args.preset)
    cfg = dataclasses.replace(base, **{k: v for k, v in fields.items() if v is not None})
    if args.space:  # checked against every swept recipe now: a bad key or value fails before any trial
        cfg = dataclasses.replace(cfg, space=load_space(args.space, cfg.recipes, cfg.search))
    elif args.num_samples or args.search:
        raise ValueError("--num-samples and --search apply to a --space search; give --space FILE.yaml")
    cfg = _with_trial_overrides(cfg, args)
    init_ray(dashboard=True)  # many Train runs in one driver: see init_ray
    subsets = materialize_subsets(cfg)
    full = full_set_samples(cfg)
    if not args.report:
        require_finished(run_phase("mtm", mtm_runs(cfg, subsets, full), cfg), "MTM pre-training")
    tokens, pixels = token_trials(cfg, subsets, full), []
    if cfg.images:
        from tokray.sweep.pixels import full_pixel_trial, pixel_trials

        pixels = (pixel_trials(cfg, subsets, full) if cfg.pixel_sizes else []) + \
                 ([full_pixel_trial(cfg, full)] if cfg.full_pixels else [])
    trials = run_order(cfg, tokens + pixels)
    reference, trials = split_reference(trials)
    if args.report:
        rows = finished_rows(reference, trials, cfg)
    else:  # the reference first: a sweep stopped part-way has the ratio to full pixels
        rows = run_phase("reference", reference, cfg)
        if cfg.space:
            rows += run_search(tokens, cfg) + run_phase("finetune", [t for t in trials if t["kind"] != "tokens"], cfg,
                                                        use_asha=cfg.asha)
        else:
            rows += run_phase("finetune", trials, cfg, use_asha=cfg.asha)
    length = (f"{rows[0]['steps']:,} steps per run" if cfg.protocol == "steps" and rows
              else f"{cfg.epochs:g} fine-tuning epochs")
    planned = len(tokens) * (cfg.num_samples if cfg.space and cfg.search != "grid" else 1) + len(pixels)
    partial = f" ({len(rows)} of {planned} trials finished)" if args.report and len(rows) < planned else ""
    res = write_results(rows, args.results_dir or os.path.abspath(cfg.out), protocol=cfg.protocol,
                        title=f"CIFAR-10 tokens vs pixels, {cfg.protocol}-matched, {length}{partial}",
                        command=_command_line())
    print_table(res["rows"], ["budget", "store_bytes", "pct_jpeg", "method", "protocol", "steps", "top1",
                              "top1_gaussian_noise", "top1_gaussian_blur", *(p.key for p in cfg.space)])
    return print_result({"results_md": res["md"], "results_csv": res["csv"], "plot": res["png"],
                         "space_plot": res.get("space_png"), "trials": len(rows),
                         "failed": sum(1 for r in rows if r.get("error")),
                         "rows": [{k: r[k] for k in ("budget", "store_bytes", "method", "protocol", "steps", "top1")}
                                  for r in res["rows"]]})


def _command_line() -> str:
    """This job's command as a user would retype it (--report stripped: the results are the sweep's)."""
    import shlex
    import sys

    return "python " + shlex.join(["jobs/sweep.py", *(a for a in sys.argv[1:] if a != "--report")])


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
