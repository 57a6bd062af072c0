"""Tokenize an image source into a token dataset on any store, with Ray Data.

  python jobs/tokenize_images.py --images ../shared/datasets/cifar10-train.tar --dst runs/tokens \\
      --tokenizer runs/tokenizer/tokenizer.safetensors [--split train|val|all]

Decoding runs as Ray tasks, the tokenizer as an actor pool (on a GPU when there is one), and
shards stream into the store as they complete. Resumable per shard: rerun the same command.
Unreadable files are named in the log, counted and skipped. Ends with images/s and a JSON line.
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from tokray.assets import default_tokenizer
from tokray.cli import print_result, print_table, run_main
from tokray.data.tokenize import TokenizeJob, tokenize
from tokray.runtime import setup_logging


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="a tar, a folder <anything>/<class>/<file>, or an s3:// prefix")
    p.add_argument("--dst", required=True, help="token dataset URI (local path, s3://, lmdb://)")
    p.add_argument("--tokenizer", help="tokenizer.safetensors from jobs/train_tokenizer.py (default: the embedded CIFAR-10 one)")
    p.add_argument("--split", default="all", choices=["all", "train", "val"],
                   help="the fixed, seeded validation split (val) or the rest (train)")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--shard-rows", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--actors", type=int, default=1, help="tokenizer actors (one GPU each when GPUs exist)")
    p.add_argument("--in-process", action="store_true", help="plain loop without Ray (the reference path)")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="the first 512 images only")
    args = p.parse_args()
    setup_logging()
    if args.tokenizer is None:
        args.tokenizer = default_tokenizer()
    job = TokenizeJob(images=args.images, dst=args.dst, tokenizer=args.tokenizer, split=args.split,
                      val_per_class=args.val_per_class, shard_rows=args.shard_rows, batch_size=args.batch_size,
                      num_actors=args.actors, max_images=512 if args.smoke_test else args.max_images)
    if not args.in_process:
        import ray

        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False,
                 **({"num_cpus": 2} if args.smoke_test else {}))
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours below counts images
    with tqdm(desc="tokenize", unit="img") as bar:
        res = tokenize(job, use_ray=not args.in_process, overwrite=args.overwrite, progress=bar.update)
    print_table([{"path": res["path"], "images": res["images"], "skipped": len(res["skipped"]),
                  "seconds": res["seconds"], "images_per_s": res["images_per_s"], "store_bytes": res["store_bytes"],
                  "token_bytes_per_image": res["store_bytes"] / max(1, res["num_samples"])}])
    for name in res["skipped"]:
        print(f"skipped (unreadable): {name}")
    print_result({**res, "skipped_count": len(res["skipped"])})
    return 0


if __name__ == "__main__":
    run_main(main)
