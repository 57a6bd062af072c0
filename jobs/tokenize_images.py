"""Tokenize an image source into a token dataset on any store, with Ray Data.

  python jobs/tokenize_images.py --images ../shared/datasets/cifar10-train.tar --dst runs/tokens \\
      --tokenizer runs/tokenizer/tokenizer.safetensors [--split train|val|all]
  python jobs/tokenize_images.py --images IMAGES --split train --dst runs/tok-train --tokenizer diffusers:VQ_DIR --prune
  python jobs/tokenize_images.py --images IMAGES --split val --dst runs/tok-val --tokenizer diffusers:VQ_DIR \\
      --pruned-like runs/tok-train

--tokenizer: a tokray tokenizer file, diffusers:PATH (a VQModel save_pretrained folder, or
diffusers:CONFIG.json?weights=FILE.safetensors; ?size=N sets the input side, ?norm=01|imagenet the input
normalisation). --prune keeps only the codes the images use (ids remapped to 0..K-1, the map and the
pruned codebook stored in the dataset); --pruned-like encodes into an already pruned dataset's codes.

Decoding runs as Ray tasks, the tokenizer as an actor pool (one GPU per actor when the cluster has
GPUs; a big tokenizer runs there in bf16, and the log says where and how it runs), and shards stream
into the store as they complete. Resumable per shard: rerun the same command. Unreadable files are
named in the log, counted and skipped. Ends with images/s and a JSON line.
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from tokray.assets import default_tokenizer
from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.data.tokenize import TokenizeJob, tokenize, tokenize_pruned


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="a tar, a folder <anything>/<class>/<file>, or an s3:// prefix")
    p.add_argument("--dst", required=True, help="token dataset URI (local path, s3://, lmdb://)")
    p.add_argument("--tokenizer", help="PATH.safetensors (jobs/train_tokenizer.py) or diffusers:PATH "
                   "(default: the embedded CIFAR-10 tokenizer)")
    p.add_argument("--split", default="all", choices=["all", "train", "val"],
                   help="the fixed, seeded validation split (val) or the rest (train)")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--shard-rows", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default: by image size, 256 at "
                   "32x32, 4 at 256x256; 8x that on a GPU)")
    p.add_argument("--actors", type=int, default=1, help="tokenizer actors (one GPU each when GPUs exist)")
    p.add_argument("--in-process", action="store_true", help="plain loop without Ray (the reference path)")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bf16 autocast for big tokenizers on a GPU, else float32)")
    p.add_argument("--prune", action="store_true", help="then keep only the codes used: ids remapped to 0..K-1, "
                   "map and pruned codebook kept in the dataset (tokenizes into DST-unpruned first)")
    p.add_argument("--keep-unpruned", action="store_true", help="with --prune: keep DST-unpruned")
    p.add_argument("--pruned-like", metavar="URI", help="encode into the codes of this pruned dataset (e.g. the "
                   "validation split into the training split's codes)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--smoke-test", action="store_true", help="the first 512 images only")
    args = parse_args(p)
    args.tokenizer = args.tokenizer or default_tokenizer()
    job = TokenizeJob(images=args.images, dst=args.dst, tokenizer=args.tokenizer, split=args.split,
                      val_per_class=args.val_per_class, shard_rows=args.shard_rows, batch_size=args.batch_size,
                      num_actors=args.actors, max_images=512 if args.smoke_test else args.max_images,
                      dtype=args.dtype, pruned_like=args.pruned_like or "")
    if not args.in_process:
        import ray

        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False,
                 **({"num_cpus": 2} if args.smoke_test else {}))
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours below counts images
    with tqdm(desc="tokenize", unit="img") as bar:
        if args.prune:
            res = tokenize_pruned(job, use_ray=not args.in_process, overwrite=args.overwrite, progress=bar.update,
                                  keep_unpruned=args.keep_unpruned)
        else:
            res = tokenize(job, use_ray=not args.in_process, overwrite=args.overwrite, progress=bar.update)
    print_table([{"path": res["path"], "images": res["images"], "skipped": len(res["skipped"]),
                  "seconds": res["seconds"], "images_per_s": res["images_per_s"], "codes": res["codebook_size"],
                  "store_bytes": res["store_bytes"],
                  "token_bytes_per_image": res["store_bytes"] / max(1, res["num_samples"])}])
    for name in res["skipped"]:
        print(f"skipped (unreadable): {name}")
    return print_result({**res, "skipped_count": len(res["skipped"])})


if __name__ == "__main__":
    run_main(main)
