"""MTM pre-training on Ray Train, fed by Ray Data.

  python jobs/pretrain.py                          # recipe cifar_mtm on the embedded CIFAR-10 tokens
  ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/pretrain.py
  python jobs/pretrain.py --recipe cifar_mtm --data s3://bucket/tokens --epochs 10 --resume
  python jobs/pretrain.py --config overrides.yaml --set model_args.mask_ratio_min=0.5 --mlflow file://$PWD/mlruns

Connects to a running cluster (RAY_ADDRESS or `ray start --head` on this machine) or starts Ray
locally. Prints the config, saves it as <out>/config.json, logs one progress line per interval,
checkpoints to <out>/ray/<recipe>/, writes TensorBoard events to <out>/tb, and ends with a table
and one JSON line.
"""

from __future__ import annotations

import argparse

from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.train.launch import add_train_args, config_from_args, tracking_from_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_train_args(p, task="mtm", default_recipe="cifar_mtm")
    args = parse_args(p)
    from tokray.train.launch import fit, prepare

    plan = prepare(config_from_args(args, task="mtm", smoke_recipe="smoke"), resume=args.resume,
                   overwrite=args.overwrite)
    cfg = plan.config
    result = fit(plan, tracking=tracking_from_args(args))
    m = result.metrics or {}
    ckpt = result.checkpoint.path if result.checkpoint else None
    total = plan.steps[1]
    print_table([{"recipe": cfg.recipe, "steps": m.get("step"), "total": total, "loss": m.get("loss"),
                  "samples_per_s": m.get("samples_per_s", 0.0), "checkpoint": ckpt or "-"}])
    return print_result({"recipe": cfg.recipe, "step": m.get("step"), "total_steps": total, "loss": m.get("loss"),
                         "samples_per_s": m.get("samples_per_s"), "checkpoint": ckpt, "out": cfg.out})


if __name__ == "__main__":
    run_main(main)
