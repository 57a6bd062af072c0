"""MTM pre-training on Ray Train, fed by Ray Data.

  python jobs/pretrain.py                          # recipe cifar_mtm on the embedded CIFAR-10 tokens
  ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/pretrain.py
  python jobs/pretrain.py --recipe cifar_mtm --data s3://bucket/tokens --epochs 10 --resume

Connects to a running cluster (RAY_ADDRESS or `ray start --head` on this machine) or starts Ray
locally. Prints the config, saves it as <out>/config.json, logs one progress line per interval,
checkpoints to <out>/ray/<name>/, and ends with a table and one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os

from tokray.cli import print_result, print_table, run_main, setup_logging
from tokray.recipes import get_recipe, list_recipes

log = logging.getLogger("tokray.jobs.pretrain")


def latest_checkpoint(storage: str) -> str | None:
    found = sorted(glob.glob(os.path.join(storage, "*", "checkpoint_*", "state.pt")), key=os.path.getmtime)
    return os.path.dirname(found[-1]) if found else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="cifar_mtm", help=f"one of: {', '.join(list_recipes())}")
    p.add_argument("--data", help="token dataset URI (default: the embedded CIFAR-10 training tokens)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--out", help="run directory (default runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--smoke-test", action="store_true", help="recipe 'smoke': seconds on CPU, 2 workers")
    args = p.parse_args()
    setup_logging()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from models import create_model
    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset
    from tokray.storage.raysource import read_ray_dataset
    from tokray.train.pretrain import total_steps, train_loop_per_worker

    overrides = {k: v for k, v in {"epochs": args.epochs, "num_workers": args.num_workers, "max_steps": args.max_steps,
                                   "data": args.data, "out": args.out}.items() if v is not None}
    if args.gpu:
        overrides["use_gpu"] = True
    name = "smoke" if args.smoke_test else args.recipe
    cfg = get_recipe(name, **{"out": f"runs/{name}", **overrides})
    data = cfg.data or default_tokens("train")
    ds_meta = open_dataset(data)  # clear errors on the driver before any worker starts
    meta = ds_meta.meta
    create_model(cfg.model, grid=meta.grid, vocab_size=meta.codebook_size, **cfg.model_args)  # fits the data?
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    print(cfg.to_json(), flush=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(cfg.to_json())

    ray.init(configure_logging=False, **({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    # token sets are small: read (and verify) once, then every epoch streams from the object store
    dataset = read_ray_dataset(data).materialize()
    resume = latest_checkpoint(os.path.join(out, "ray")) if args.resume else None
    if args.resume and resume is None:
        log.warning("--resume: no checkpoint under %s; starting from step 0", out)
    per_epoch, total = total_steps(cfg, len(ds_meta))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_json(), "grid": list(meta.grid), "vocab_size": meta.codebook_size,
                           "num_samples": len(ds_meta), "resume_from": resume},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(name=name, storage_path=os.path.join(out, "ray"),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": dataset})
    result = trainer.fit()
    m = result.metrics or {}
    print_table([{"recipe": name, "steps": m.get("step"), "total": total, "loss": m.get("loss"),
                  "samples_per_s": m.get("samples_per_s", 0.0), "checkpoint": result.checkpoint.path if result.checkpoint else "-"}])
    print_result({"recipe": name, "step": m.get("step"), "total_steps": total, "loss": m.get("loss"),
                  "samples_per_s": m.get("samples_per_s"), "checkpoint": result.checkpoint.path if result.checkpoint else None,
                  "out": out})
    return 0


if __name__ == "__main__":
    run_main(main)
