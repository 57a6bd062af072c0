"""Top-1 of a fine-tuned checkpoint on a token dataset, or on raw images tokenized on the fly.

  python jobs/evaluate.py --checkpoint runs/cifar_ft                       # embedded CIFAR-10 val tokens
  python jobs/evaluate.py --checkpoint runs/cifar_ft --data s3://bucket/val-tokens
  python jobs/evaluate.py --checkpoint runs/cifar_ft --images ../shared/datasets/cifar10-train.tar --split val

Raw images (a tar, a <class>/<file> folder or an s3:// prefix) are decoded and tokenized with the
tokenizer the checkpoint's training data was made with (--tokenizer, default the embedded one; any
other is refused, naming both fingerprints). Runs in-process on the local accelerator or CPU.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import logging

from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.eval.classify import evaluate_checkpoint

log = logging.getLogger("tokray.jobs.evaluate")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="fine-tuning run directory, checkpoint_* directory or state.pt "
                                        "(default runs/cifar_ft; runs/smoke_ft with --smoke-test)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="token dataset URI (default: the embedded CIFAR-10 validation split)")
    src.add_argument("--images", help="raw images to tokenize on the fly: a tar, a folder or an s3:// prefix")
    p.add_argument("--split", choices=["val", "train", "all"], default="val",
                   help="with --images: the fixed validation split (500/class, seed 0), the rest, or all")
    p.add_argument("--tokenizer", help="with --images: tokenizer file (default: the embedded CIFAR-10 tokenizer)")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--max-samples", type=int, default=0, help="evaluate a seeded, class-stratified sample of N (0 = all)")
    p.add_argument("--smoke-test", action="store_true", help="runs/smoke_ft, first 512 samples: seconds")
    args = parse_args(p)

    ckpt = args.checkpoint or ("runs/smoke_ft" if args.smoke_test else "runs/cifar_ft")
    res = evaluate_checkpoint(ckpt, data=args.data or "", images=args.images or "", split=args.split,
                              tokenizer=args.tokenizer or "", ema=args.ema, batch_size=args.batch_size,
                              limit=args.max_samples or (512 if args.smoke_test else 0))
    row = {k: res[k] for k in ("checkpoint", "source", "input", "weights", "samples", "top1", "samples_per_s")}
    print_table([row])
    return print_result(res)


if __name__ == "__main__":
    run_main(main)
