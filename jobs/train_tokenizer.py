"""Train the VQ tokenizer on an image source (tar, folder <anything>/<class>/<file>, or s3:// prefix).

  python jobs/train_tokenizer.py --images ../shared/datasets/cifar10-train.tar --out runs/tokenizer

Resumable (rerun the same command; `--no-resume` starts over), progress bar, held-out PSNR,
codes used and bits/token; the result is `<out>/tokenizer.safetensors`. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.fit.common import add_fit_args, fit_fields
from tokray.fit.tokenizer import TokenizerConfig, train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fit_args(p, TokenizerConfig, out="runs/tokenizer", model_help="registered tokenizer variant")
    p.add_argument("--smoke-test", action="store_true", help="a few steps on a few images (seconds)")
    args = parse_args(p)
    cfg = TokenizerConfig(**fit_fields(args))
    if args.smoke_test:
        cfg = dataclasses.replace(cfg, steps=6, batch_size=16, eval_every=3, ckpt_every=3, max_images=256,
                                  val_per_class=2, model_args={"widths": (16, 32), "codebook_size": 64,
                                                               **cfg.model_args})
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    res = train(cfg, resume=not args.no_resume)
    print_table(res["curve"], ["step", "seconds", "psnr_db", "codes_used", "bits_per_token"])
    return print_result({k: v for k, v in res.items() if k != "curve"})


if __name__ == "__main__":
    run_main(main)
