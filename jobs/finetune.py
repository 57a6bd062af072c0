"""Fine-tune a token ViT classifier on Ray Train: from an MTM checkpoint (--init) or from scratch.

  python jobs/finetune.py --init runs/cifar_mtm      # the MTM encoder, loaded strictly (head new)
  python jobs/finetune.py                            # the same recipe from scratch (the comparison)
  python jobs/finetune.py --smoke-test --init runs/smoke
  python jobs/finetune.py --init runs/cifar_mtm --set augment.coloradapt_prob=0.5 --set lr=1e-3 --mlflow file://$PWD/mlruns

The encoder loads strictly: every model key but the new head must come from the checkpoint, and
the job names the checkpoint keys it drops (the MTM decoder). Layer-wise lr decay, CutMix/Mixup
with label smoothing (timm), drop path and an optional EMA come from the recipe. Top-1 on the
validation tokens (default: the embedded CIFAR-10 validation split) after every epoch; a table and
one JSON line at the end.
"""

from __future__ import annotations

import argparse

from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.train.launch import add_train_args, config_from_args, tracking_from_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_train_args(p, task="classify", default_recipe="cifar_ft")
    p.add_argument("--init", help="MTM checkpoint to start from: a run directory (latest checkpoint), a "
                                  "checkpoint_* directory or a state.pt; omit to train from scratch")
    p.add_argument("--eval-data", help="validation token dataset URI (default: the embedded CIFAR-10 validation split)")
    p.add_argument("--ema-decay", type=float, help="EMA decay of the weights (0 = off); its top-1 is reported too "
                                                   "(evaluate.py --ema and export.py --ema then use the EMA weights)")
    args = parse_args(p)
    from tokray.train.launch import fit, prepare

    extra = {"init": args.init, "eval_data": args.eval_data, "ema_decay": args.ema_decay}
    plan = prepare(config_from_args(args, task="classify", smoke_recipe="smoke_ft", extra=extra), resume=args.resume,
                   overwrite=args.overwrite)
    cfg = plan.config
    result = fit(plan, tracking=tracking_from_args(args))
    m = result.metrics or {}
    ckpt = result.checkpoint.path if result.checkpoint else None
    total = plan.steps[1]
    row = {"recipe": cfg.recipe, "init": cfg.init or "scratch", "steps": m.get("step"), "epochs": m.get("epoch"),
           "loss": m.get("loss"), "val_top1": m.get("val_top1"), "val_top1_ema": m.get("val_top1_ema"),
           "samples_per_s": m.get("samples_per_s", 0.0)}
    print_table([{k: ("-" if v is None else v) for k, v in row.items()}])
    return print_result({**row, "total_steps": total, "val_samples": m.get("val_samples"), "checkpoint": ckpt,
                         "out": cfg.out})


if __name__ == "__main__":
    run_main(main)
