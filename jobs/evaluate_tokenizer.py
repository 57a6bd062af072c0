"""Evaluate a tokenizer on images: PSNR of reconstructions, codes used, order-0 entropy, and token
bytes per image on the store against the source's JPEG bytes per image.

  python jobs/evaluate_tokenizer.py --images ../shared/datasets/cifar10-train.tar [--tokenizer PATH]
  python jobs/evaluate_tokenizer.py --images IMAGES --tokenizer diffusers:VQ_DIR [--tokens URI]

--tokenizer: a tokray tokenizer file or diffusers:PATH (default: the embedded CIFAR-10 one); a
codebook-only tokenizer (codebook:URI, SeiT imports) cannot be evaluated on images. Default images:
the fixed validation split of the source (`--split all` for every image). Writes
`<out>/reconstructions.png` (originals above their reconstructions); with --tokens also
`decoded_tokens.png` (a pruned dataset decodes through its map). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

from tokray.assets import default_tokenizer
from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.data.images import ImageSource, decode_many
from tokray.data.splits import split_indices
from tokray.data.tokenizer import load_tokenizer, require_can, to_unit
from tokray.devices import local_device
from tokray.eval.metrics import entropy_bits, psnr_db
from tokray.storage.dataset import DatasetWriter, open_dataset
from tokray.storage.formats.tokens import TokenMeta


def save_grid(path: str, *image_sets: np.ndarray, per_row: int = 16) -> None:
    """A PNG of rows of ``per_row`` images; with several sets, their rows alternate (originals over
    reconstructions)."""
    from PIL import Image

    h, w = image_sets[0].shape[1:3]
    rows = []
    for s in range(0, len(image_sets[0]), per_row):
        for images in image_sets:
            batch = images[s:s + per_row]
            row = np.zeros((h, per_row * w, 3), np.uint8)
            row[:, : len(batch) * w] = np.concatenate(list(batch), axis=1)
            rows.append(row)
    Image.fromarray(np.concatenate(rows, axis=0)).resize((per_row * w * 2, len(rows) * h * 2), Image.NEAREST).save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="a tar, a folder <anything>/<class>/<file>, or an s3:// prefix")
    p.add_argument("--tokenizer", help="PATH.safetensors or diffusers:PATH (default: the embedded CIFAR-10 tokenizer)")
    p.add_argument("--split", default="val", choices=["val", "train", "all"])
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--out", default="runs/evaluate_tokenizer", help="folder for the PNG grid")
    p.add_argument("--tokens", help="also decode the first 64 samples of this token dataset to a PNG "
                   "(it must come from the same tokenizer)")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default: 500 at 32x32, 8 at 256x256)")
    p.add_argument("--smoke-test", action="store_true", help="64 images")
    args = parse_args(p)
    args.tokenizer = args.tokenizer or default_tokenizer()
    tokens = open_dataset(args.tokens) if args.tokens else None
    # checked first: a wrong pairing fails before any work; a pruned dataset gives the pruned view
    model, info = load_tokenizer(args.tokenizer, for_dataset=tokens)
    require_can(model, "encode", "evaluate_tokenizer")
    require_can(model, "decode", "evaluate_tokenizer")
    model.to(local_device())
    src = ImageSource(args.images)
    limit = 64 if args.smoke_test else args.max_images
    pixels, kept, bad = decode_many(src, split_indices(src.labels, args.split, args.val_per_class, max_images=limit),
                                    model.image_size)
    if not len(pixels):
        raise ValueError(f"no decodable images in the {args.split} split of {args.images}")
    batch = args.batch_size or max(1, min(500, 500 * 32 * 32 // model.image_size ** 2))
    ids, recon = [], []
    with torch.no_grad():
        for s in range(0, len(pixels), batch):
            x = to_unit(pixels[s:s + batch])
            i = model.encode(x)
            ids.append(i.cpu())
            recon.append(model.decode(i).cpu())
    ids, recon = torch.cat(ids), torch.cat(recon)
    psnr = psnr_db(recon, to_unit(pixels))
    recon_u8 = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with tempfile.TemporaryDirectory() as tmp:  # the ids just computed, stored: shards + manifest bytes
        meta = TokenMeta(grid=model.grid, codebook_size=model.codebook_size, class_names=src.class_names,
                         tokenizer=info["fingerprint"], shard_rows=8192)
        with DatasetWriter(os.path.join(tmp, "tokens"), meta) as writer:
            writer.write(ids.numpy().astype(np.uint16), src.labels[kept], kept)
            stored = writer.close()
    os.makedirs(args.out, exist_ok=True)
    grid_path = os.path.join(args.out, "reconstructions.png")
    show = np.linspace(0, len(pixels) - 1, min(64, len(pixels))).astype(int)  # across all classes
    save_grid(grid_path, pixels[show], recon_u8[show])
    if args.tokens:
        stored_ids = torch.from_numpy(next(tokens.iter_batches(64))["ids"].astype(np.int64))
        decoded = np.concatenate([model.decode_pixels(stored_ids[s:s + batch])
                                  for s in range(0, len(stored_ids), batch)])
        save_grid(os.path.join(args.out, "decoded_tokens.png"), decoded)
    bits = entropy_bits(ids.numpy())
    tokens_per_image = ids.shape[1] * ids.shape[2]
    out = {"psnr_db": psnr, "codes_used": int(len(torch.unique(ids))), "codebook_size": model.codebook_size,
           "bits_per_token": bits, "entropy_bytes_per_image": bits * tokens_per_image / 8,
           "token_bytes_per_image": stored.store_bytes / max(1, stored.num_samples),
           "jpeg_bytes_per_image": src.file_bytes(kept) / max(1, len(kept)),
           "images": int(len(kept)), "skipped": len(bad), "tokenizer": info["fingerprint"], "grid_png": grid_path,
           "tokenizer_kind": model.kind, "image_size": model.image_size, "grid": list(model.grid)}
    out["token_vs_jpeg"] = out["token_bytes_per_image"] / out["jpeg_bytes_per_image"]
    print_table([{k: v for k, v in out.items() if k not in ("grid_png", "tokenizer", "tokenizer_kind", "grid")}])
    return print_result(out)


if __name__ == "__main__":
    run_main(main)
