"""Token agreement of augmented tokens (SeiT++ Figure 3, with numbers): naive vs TokenAdapt.

  python jobs/evaluate_augment.py --images ../shared/datasets/cifar10-train.tar --out runs/evaluate_augment

For flip, crop (random-resized, scale 0.08-1) and affine (rotate/translate/shear), on the fixed
validation split: the share of token positions where the augmented tokens equal
tokenizer(A(image)), and the PSNR of the decoded augmented tokens against A(image), for
(a) naive augmentation of the embedding grid (bicubic) + cosine requantization and (b) TokenAdapt
(f, A in f-space, g, argmax). The same views are drawn for both (seeded). `identity` is the
no-op view (TokenAdapt's round trip g(f(z)) against z).

Writes into --out: `augment_tokens.png` (per view, rows: A(image) | tokenizer(A(image)) decoded |
naive decoded | TokenAdapt decoded) and `coloradapt_vs_embnoise.png` (rows: tokens decoded |
partner decoded | ColorAdapt | Emb-Noise, both re-quantized; the paper's Figure 5). Default
tokenizer and TokenAdapt: the embedded CIFAR-10 ones. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from tokray.assets import default_tokenizer
from tokray.augment import ops
from tokray.augment.geometry import warp
from tokray.augment.tokenadapt import load_tokenadapt, tokenadapt_logits
from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.data.images import ImageSource, decode_many
from tokray.data.splits import split_indices
from tokray.data.tokenizer import load_tokenizer, to_unit
from tokray.eval.agreement import EVAL_VIEWS, agreement


def to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_rows(path: str, rows: list[np.ndarray], gap: int = 4) -> None:
    """A PNG of image rows (each [n, h, w, 3]), a blank band after every 4th row, upscaled 3x."""
    from PIL import Image

    n, h, w = rows[0].shape[:3]
    bands = []
    for i, row in enumerate(rows):
        bands.append(np.concatenate(list(row), axis=1))
        if i % 4 == 3 and i != len(rows) - 1:
            bands.append(np.full((gap, n * w, 3), 255, np.uint8))
    img = np.concatenate(bands, axis=0)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


@torch.no_grad()
def view_rows(tokenizer, tokenadapt, pixels: np.ndarray, seed: int) -> list[np.ndarray]:
    rows = []
    for k, (name, spec) in enumerate(EVAL_VIEWS.items()):
        if name == "identity":
            continue
        x = to_unit(pixels)
        theta = spec.sample(len(x), torch.Generator().manual_seed(seed * 7919 + k))
        xa = warp(x, theta, (tokenizer.image_size,) * 2).clamp(-1, 1)
        emb = ops.embed(tokenizer.encode(x), tokenizer.quantizer.codebook)
        naive = ops.requantize(warp(emb, theta, tokenizer.grid), tokenizer.quantizer.codebook)
        ta = tokenadapt_logits(tokenadapt, emb, theta, tokenizer.grid).argmax(1)
        rows += [to_u8(xa), to_u8(tokenizer.decode(tokenizer.encode(xa))), to_u8(tokenizer.decode(naive)),
                 to_u8(tokenizer.decode(ta))]
    return rows


@torch.no_grad()
def colour_figure(tokenizer, pixels: np.ndarray, show: np.ndarray, offset_std: float, std: float, seed: int):
    """(rows for the PNG from ``show``, share of tokens changed by ColorAdapt and by Emb-Noise over ``pixels``)."""
    cb = tokenizer.quantizer.codebook
    gen = torch.Generator().manual_seed(seed)

    def both(px):
        ids = tokenizer.encode(to_unit(px))
        emb = ops.embed(ids, cb)
        return (ids, ops.requantize(ops.color_adapt(emb, 1.0, gen), cb),
                ops.requantize(ops.emb_noise(emb, 1.0, offset_std, std, gen), cb))

    changed = {"coloradapt": 0, "emb_noise": 0}
    count = 0
    for s in range(0, len(pixels), 500):
        ids, ca, en = both(pixels[s:s + 500])
        changed["coloradapt"] += int((ca != ids).sum())
        changed["emb_noise"] += int((en != ids).sum())
        count += ids.numel()
    ids, ca, en = both(show)  # the partner of sample i is sample B-1-i: row i of ids.flip(0)
    rows = [to_u8(tokenizer.decode(t)) for t in (ids, ids.flip(0), ca, en)]
    return rows, {k: v / max(1, count) for k, v in changed.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="a tar, a folder <anything>/<class>/<file>, or an s3:// prefix")
    p.add_argument("--out", default="runs/evaluate_augment", help="folder for the PNGs")
    p.add_argument("--tokenizer", help="tokenizer.safetensors (default: the embedded CIFAR-10 tokenizer)")
    p.add_argument("--tokenadapt", default="", help="TokenAdapt weights (default: the embedded CIFAR-10 ones)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--noise-offset-std", type=float, default=0.1, help="Emb-Noise per-channel offset (figure)")
    p.add_argument("--noise-std", type=float, default=0.1, help="Emb-Noise per-position std (figure)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke-test", action="store_true", help="64 images")
    args = parse_args(p)
    args.tokenizer = args.tokenizer or default_tokenizer()
    tokenizer, info = load_tokenizer(args.tokenizer)
    tokenadapt, ta_info = load_tokenadapt(args.tokenadapt, info["fingerprint"])  # refuses a mismatch first
    src = ImageSource(args.images)
    idx = split_indices(src.labels, args.split, args.val_per_class)
    limit = 64 if args.smoke_test else args.max_images
    if limit:
        idx = idx[np.linspace(0, len(idx) - 1, min(limit, len(idx))).astype(int)]  # across all classes
    pixels, kept, bad = decode_many(src, idx, tokenizer.image_size)
    if not len(pixels):
        raise ValueError(f"no decodable images in the {args.split} split of {args.images}")
    res = agreement(tokenizer, tokenadapt, pixels, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    show = pixels[np.linspace(0, len(pixels) - 1, min(12, len(pixels))).astype(int)]
    views_png = os.path.join(args.out, "augment_tokens.png")
    save_rows(views_png, view_rows(tokenizer, tokenadapt, show, args.seed))
    rows, changed = colour_figure(tokenizer, pixels, show, args.noise_offset_std, args.noise_std, args.seed)
    colour_png = os.path.join(args.out, "coloradapt_vs_embnoise.png")
    save_rows(colour_png, rows)
    table = [{"view": k, "naive": v["naive"], "tokenadapt": v["tokenadapt"],
              "ratio": v["tokenadapt"] / max(v["naive"], 1e-9), "naive_psnr_db": v["naive_psnr_db"],
              "tokenadapt_psnr_db": v["tokenadapt_psnr_db"], "tokenizer_psnr_db": v["tokenizer_psnr_db"]}
             for k, v in res.items()]
    print_table(table)
    print(f"tokens changed (all samples, re-quantized): ColorAdapt {changed['coloradapt']:.1%}, Emb-Noise "
          f"(offset {args.noise_offset_std}, std {args.noise_std}) {changed['emb_noise']:.1%}")
    out = {**res, "images": int(len(pixels)), "skipped": len(bad), "split": args.split,
           "tokenizer": info["fingerprint"], "tokenadapt": ta_info["fingerprint"],
           "tokens_changed": {**changed, "noise_offset_std": args.noise_offset_std, "noise_std": args.noise_std},
           "pngs": [views_png, colour_png]}
    return print_result(out)


if __name__ == "__main__":
    run_main(main)
