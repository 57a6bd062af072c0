"""Export a fine-tuned classifier as a self-contained model folder (weights, config, classes, tokenizer).

  python jobs/export.py --checkpoint runs/cifar_ft --out models_out/cifar_ft          # the latest checkpoint
  python jobs/export.py --checkpoint runs/cifar_ft --out models_out/cifar_ft_ema --ema  # its EMA weights
  python jobs/predict.py --model models_out/cifar_ft cat.jpg ship.png

The folder: model.safetensors (the classifier's weights, no optimizer, with a fingerprint), config.json
(model name and arguments, input view, class names, provenance) and tokenizer.safetensors (a copy of the
tokenizer the training tokens were made with, checked by fingerprint; a diffusers or codebook-only
tokenizer is referenced instead). Pixel-baseline checkpoints export too (no tokenizer: the JPEG size and
quality). Written beside --out and renamed into place; an existing --out needs --overwrite.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse

from tokray.cli import parse_args, print_result, print_table, run_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="fine-tuning run directory (its latest checkpoint), checkpoint_* directory or state.pt")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (as evaluate.py --ema)")
    p.add_argument("--tokenizer", help="the tokenizer the training tokens were made with (default: the run's "
                                       "tokenizer setting, else the embedded CIFAR-10 one; checked by fingerprint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parse_args(p)
    from tokray.predict import export_model

    res = export_model(args.checkpoint, args.out, ema=args.ema, tokenizer=args.tokenizer or "", overwrite=args.overwrite)
    print_table([{k: res[k] for k in ("out", "model", "input", "classes", "weights", "step", "tokenizer", "bytes")}])
    return print_result(res)


if __name__ == "__main__":
    run_main(main)
