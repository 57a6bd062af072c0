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
import time

from tokray.cli import print_result, print_table, run_main, setup_logging

log = logging.getLogger("tokray.jobs.evaluate")


def load_classifier(path: str, use_ema: bool):
    """(model in eval mode, its config, its data summary) from a fine-tuning checkpoint."""
    from tokray.train.checkpoint import load_state, resolve_checkpoint
    from tokray.train.tasks import ClassifyTask

    state, cfg, data = load_state(path)
    if cfg.task != "classify":
        raise ValueError(f"checkpoint {resolve_checkpoint(path)} is a {cfg.task} checkpoint of {cfg.model}, not a "
                         f"classifier; fine-tune it first: python jobs/finetune.py --init {path}")
    if use_ema and "ema" not in state:
        raise ValueError(f"--ema: checkpoint {resolve_checkpoint(path)} holds no EMA weights (its run had ema_decay 0)")
    model = ClassifyTask(cfg, data, augment=False).build()  # the weights (codebook stem too) come from the file
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), cfg, data


def token_batches(uri: str, data: dict, ckpt: str, batch_size: int, limit: int):
    """Batches of a token dataset that fits the checkpoint (grid, vocabulary, classes)."""
    import torch

    from tokray.storage.dataset import open_dataset
    from tokray.train.checkpoint import require_fits_data

    ds = open_dataset(uri)
    require_fits_data(data, ds.meta, ckpt, uri)
    _require_same_classes(list(ds.meta.class_names), data["class_names"], uri, ckpt)
    seen = 0
    for b in ds.iter_batches(batch_size):
        n = len(b["label"]) if not limit else min(len(b["label"]), limit - seen)
        if n <= 0:
            return
        seen += n
        yield {"ids": torch.from_numpy(b["ids"][:n].astype("int64")), "label": torch.from_numpy(b["label"][:n].astype("int64"))}


def image_batches(src_uri: str, split: str, tokenizer_path: str, data: dict, ckpt: str, batch_size: int, limit: int,
                  device):
    """Decode raw images, tokenize them with the checkpoint data's tokenizer, yield id batches."""
    import numpy as np
    import torch

    from tokray.data.images import ImageSource, decode_many, iter_indices, validation_split
    from tokray.train.tokenizer import load_tokenizer, to_unit

    tokenizer, info = load_tokenizer(tokenizer_path)
    if info["fingerprint"] != data["tokenizer"]:  # ids mean nothing under another tokenizer
        raise ValueError(f"checkpoint {ckpt} was trained on tokens of tokenizer {data['tokenizer']}, but "
                         f"{tokenizer_path} is tokenizer {info['fingerprint']}; pass the training data's --tokenizer")
    tokenizer.to(device)
    src = ImageSource(src_uri)
    _require_same_classes(list(src.class_names), data["class_names"], src_uri, ckpt)
    idx = np.arange(len(src))
    if split != "all":
        val = validation_split(src.labels)
        idx = np.flatnonzero(val if split == "val" else ~val)
    idx = idx[:limit] if limit else idx
    size = tokenizer.image_size
    for chunk in iter_indices(len(idx), batch_size):
        pixels, kept, skipped = decode_many(src, idx[chunk.start:chunk.stop], size)
        with torch.no_grad():
            ids = tokenizer.encode(to_unit(pixels).to(device)).cpu()
        yield {"ids": ids, "label": torch.from_numpy(src.labels[kept].astype("int64"))}


def _require_same_classes(have: list, want: list, where: str, ckpt: str) -> None:
    if have != want:
        raise ValueError(f"{where} has classes {have[:4]}{'...' if len(have) > 4 else ''} ({len(have)}), but checkpoint "
                         f"{ckpt} was trained on {want[:4]}{'...' if len(want) > 4 else ''} ({len(want)})")


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
    p.add_argument("--max-samples", type=int, default=0, help="evaluate only the first N samples (0 = all)")
    p.add_argument("--smoke-test", action="store_true", help="runs/smoke_ft, first 512 samples: seconds")
    args = p.parse_args()
    setup_logging()

    import torch

    from tokray.assets import default_tokenizer, default_tokens
    from tokray.devices import local_device
    from tokray.train.checkpoint import resolve_checkpoint
    from tokray.train.tasks import eval_view, top1

    ckpt = resolve_checkpoint(args.checkpoint or ("runs/smoke_ft" if args.smoke_test else "runs/cifar_ft"))
    limit = args.max_samples or (512 if args.smoke_test else 0)
    device = local_device()
    model, cfg, data = load_classifier(ckpt, args.ema)
    model.to(device)
    torch.set_grad_enabled(False)
    if args.images:
        source = args.images
        batches = image_batches(args.images, args.split, args.tokenizer or default_tokenizer(), data, ckpt,
                                args.batch_size, limit, device)
    else:
        source = args.data or default_tokens("val")
        batches = token_batches(source, data, ckpt, args.batch_size, limit)
    t0 = time.perf_counter()
    correct, seen = top1(model, batches, device, view=lambda ids: eval_view(cfg, ids))  # central crop if trained on crops
    if seen == 0:
        raise ValueError(f"{source} gave no samples to evaluate")
    secs = time.perf_counter() - t0
    row = {"checkpoint": ckpt, "source": source, "input": "images" if args.images else "tokens",
           "weights": "ema" if args.ema else "model", "samples": seen, "top1": 100.0 * correct / seen,
           "samples_per_s": seen / secs}
    print_table([row])
    print_result({**row, "model": cfg.model, "recipe": cfg.recipe, "device": str(device)})
    return 0


if __name__ == "__main__":
    run_main(main)
