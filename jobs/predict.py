"""Top-k classes of raw image files under an exported model (jobs/export.py), tokenized on the fly.

  python jobs/predict.py --model models_out/cifar_ft cat.jpg ship.png
  python jobs/predict.py --model models_out/cifar_ft --top-k 3 photos/*.jpg

Images are decoded, resized to the tokenizer's input size and tokenized with the exported tokenizer
(pixel baselines: stored as JPEG the way their training data was), then cropped to the model's view:
the same path as `jobs/evaluate.py --images`. From Python: `tokray.predict.predict(model_dir, images,
top_k)`. Runs on the local accelerator or CPU. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse

from tokray.cli import parse_args, print_result, print_table, run_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported model folder (python jobs/export.py)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--tokenizer", help="load this tokenizer instead of the folder's (checked by fingerprint)")
    p.add_argument("--batch-size", type=int, default=256)
    args = parse_args(p)
    from tokray.predict import load_model

    model = load_model(args.model, tokenizer=args.tokenizer or "")
    preds = model.predict(args.images, top_k=args.top_k, batch_size=args.batch_size)
    print_table([{"image": r["image"], "class": r["class"], "prob": r["prob"],
                  f"top-{len(r['top'])}": ", ".join(f"{t['class']} {t['prob']:.2f}" for t in r["top"])} for r in preds])
    return print_result({"model": model.dir, "images": len(preds), "predictions": preds})


if __name__ == "__main__":
    run_main(main)
