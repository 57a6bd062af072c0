"""Datasets (token or pixel records) on any store: info, verify, copy, subset, synth, pixels, import-seit.

  python jobs/dataset.py info URI [--measure-shards 8]
  python jobs/dataset.py verify URI
  python jobs/dataset.py copy SRC DST [--codec context|parquet]
  python jobs/dataset.py subset SRC DST --budget 10%|300KB|5000samples [--seed 0] [--codec context|parquet]
  python jobs/dataset.py synth DST [--samples 45000 --grid 8 8 --codebook 512] [--codec context|parquet]
  python jobs/dataset.py pixels IMAGES DST --size 16 --quality 50 [--split train|val|all]
  python jobs/dataset.py import-seit DATA_BIN_GZ LABELS_TXT CODEBOOK DST [--grid 32 32]
  python jobs/dataset.py prune SRC DST [--tokenizer SPEC]
  python jobs/dataset.py images-from-cifar cifar-10-python.tar.gz DST.tar [--split train|test|all] [--format jpeg]

info, verify, copy and subset work the same on token and pixel datasets. Token shards are
context-coded (format_version 2) unless --codec parquet (format_version 1) is given.

URIs: a local path or file:///abs/path, s3://bucket/prefix (endpoint and credentials from the
standard AWS variables and config files), lmdb:///abs/path.
"""

from __future__ import annotations

import argparse
import logging
import os

from tqdm import tqdm

from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.data import cifar, prune
from tokray.data.pixels import write_pixel_dataset
from tokray.data.seit_import import import_seit, seit_index_path
from tokray.data.synth import SynthTokens
from tokray.storage.budget import BUDGET_FORMS, Budget, make_subset
from tokray.storage.dataset import DatasetWriter, copy_dataset, open_dataset
from tokray.storage.formats.tokens import CODECS, FORMAT
from tokray.storage.uri import URI_FORMS

log = logging.getLogger("tokray.jobs.dataset")


def cmd_info(args) -> int:
    if args.measure_shards < 0:
        raise ValueError(f"--measure-shards must be 0 or more, got {args.measure_shards}")
    ds = open_dataset(args.uri)
    m = ds.manifest
    # the codec's trade, on the first shards (decoding them all would make info as slow as a pass)
    stats = ds.codec_stats(args.measure_shards) if args.measure_shards else None
    fields = {"uri": ds.uri, "kind": m.kind, "samples": m.num_samples, **ds.format.summary(m.meta),
              "classes": len(m.meta.class_names), "shards": len(m.shards), "shard_rows": m.meta.shard_rows,
              "codec": ds.codec, "format_version": ds.format.format_version(m.meta),
              "shard_bytes": m.shard_bytes, "store_bytes": m.store_bytes,
              "bytes_per_sample": m.store_bytes / max(1, m.num_samples)}
    if stats:
        if stats.units_per_sample:
            fields["order0_bits_per_token"] = stats.order0_bits
            fields["stored_bits_per_token"] = stats.stored_bits
        fields["decode_samples_per_s"] = stats.decode_samples_per_s
        fields["measured_samples"] = stats.measured_samples
    print_table([{"field": k, "value": v} for k, v in fields.items()])
    return print_result({"uri": ds.uri, "kind": m.kind, "num_samples": m.num_samples, **_meta_fields(m.meta),
                         "num_classes": len(m.meta.class_names), "shards": len(m.shards), "shard_bytes": m.shard_bytes,
                         "store_bytes": m.store_bytes, "codec": ds.codec,
                         "format_version": ds.format.format_version(m.meta),
                         "codec_stats": stats.to_json() if stats else None, "extra": m.meta.extra})


def _meta_fields(meta) -> dict:
    """The record kind's settings for the JSON line (tokens: grid, codebook_size, tokenizer; pixels: size, quality)."""
    d = meta.to_json()
    return {k: v for k, v in d.items() if k not in ("class_names", "extra", "shard_rows", "encoding", "codec")}


def cmd_verify(args) -> int:
    ds = open_dataset(args.uri, cache=None if args.use_cache else False)  # the store itself, unless told
    with tqdm(total=len(ds.manifest.shards), desc="verify", unit="shard", disable=args.quiet) as bar:
        problems = ds.verify(on_shard=bar.update)
    for p in problems:
        print(f"BAD {p}")
    ok = not problems
    print(f"{'OK' if ok else 'FAILED'}: {len(ds.manifest.shards) - len(problems)}/{len(ds.manifest.shards)} "
          f"shards intact, {ds.manifest.num_samples} samples, {ds.uri}")
    print_result({"uri": ds.uri, "ok": ok, "shards": len(ds.manifest.shards), "bad_shards": problems})
    return 0 if ok else 1


def cmd_copy(args) -> int:
    src = open_dataset(args.src)
    with tqdm(total=len(src.manifest.shards), desc="copy", unit="shard", disable=args.quiet) as bar:
        m = copy_dataset(args.src, args.dst, overwrite=args.overwrite, progress=bar.update, codec=args.codec)
    return print_result({"dst": args.dst, "num_samples": m.num_samples, "store_bytes": m.store_bytes,
                         "codec": m.format.codec(m.meta), "source_store_bytes": src.manifest.store_bytes})


def cmd_subset(args) -> int:
    budget = Budget.parse(args.budget)
    m = make_subset(args.src, args.dst, budget, seed=args.seed, overwrite=args.overwrite, codec=args.codec)
    sub = m.meta.extra["subset"]
    print_table([{"budget": str(budget), "budget_bytes": sub["budget_bytes"] or "-", "samples": m.num_samples,
                  "store_bytes": m.store_bytes, "of_source_bytes": m.store_bytes / sub["source_store_bytes"]}])
    return print_result({"dst": args.dst, "budget": str(budget), "budget_bytes": sub["budget_bytes"],
                         "num_samples": m.num_samples, "store_bytes": m.store_bytes, "seed": args.seed,
                         "codec": m.format.codec(m.meta)})


def cmd_synth(args) -> int:
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    gen = SynthTokens(grid=tuple(args.grid), codebook_size=args.codebook, num_classes=args.classes, seed=args.seed)
    meta = gen.meta(args.shard_rows)
    meta = FORMAT.with_codec(meta, args.codec)
    with DatasetWriter(args.dst, meta, overwrite=args.overwrite) as writer:
        with tqdm(total=args.samples, desc="synth", unit="sample", disable=args.quiet) as bar:
            for start in range(0, args.samples, args.shard_rows):
                n = min(args.shard_rows, args.samples - start)
                if not writer.shard_done(start // args.shard_rows):  # resume: skip finished shards
                    writer.write_shard(start // args.shard_rows, *gen.chunk(start, n))
                bar.update(n)
        m = writer.close(num_shards=-(-args.samples // args.shard_rows))
    return print_result({"dst": args.dst, "num_samples": m.num_samples, "store_bytes": m.store_bytes,
                         "shards": len(m.shards), "codec": m.meta.codec})


def cmd_pixels(args) -> int:
    with tqdm(desc="pixels", unit="image", disable=args.quiet) as bar:
        res = write_pixel_dataset(args.images, args.dst, size=args.size, quality=args.quality, split=args.split,
                                  max_images=args.max_images, shard_rows=args.shard_rows, overwrite=args.overwrite,
                                  val_per_class=args.val_per_class, progress=bar.update)
    print_table([{"images": res["samples"], "size": f"{res['size']}x{res['size']}", "quality": res["quality"],
                  "store_bytes": res["store_bytes"], "bytes_per_image": res["bytes_per_image"],
                  "shards_written": res["shards_written"], "skipped": len(res["skipped"])}])
    for name in res["skipped"]:
        print(f"skipped (unreadable): {name}")
    return print_result({**{k: v for k, v in res.items() if k != "skipped"}, "skipped_count": len(res["skipped"])})


def cmd_import_seit(args) -> int:
    with tqdm(desc="import-seit", unit="image", disable=args.quiet) as bar:
        m = import_seit(args.data, args.labels, args.codebook, args.dst, grid=tuple(args.grid),
                        class_names=args.class_names, shard_rows=args.shard_rows, overwrite=args.overwrite,
                        progress=bar.update)
    h, w = m.meta.grid
    source_bytes = os.path.getsize(args.data) + os.path.getsize(seit_index_path(args.data))
    print_table([{"samples": m.num_samples, "grid": f"{h}x{w}", "codebook_size": m.meta.codebook_size,
                  "store_bytes": m.store_bytes, "bytes_per_sample": m.store_bytes / max(1, m.num_samples),
                  "source_gz_bytes": source_bytes}])
    return print_result({"dst": args.dst, "num_samples": m.num_samples, "grid": [h, w],
                         "codebook_size": m.meta.codebook_size, "tokenizer": m.meta.tokenizer,
                         "store_bytes": m.store_bytes, "shards": len(m.shards), "source_gz_bytes": source_bytes})


def _report(rows: list[dict], result: dict) -> int:
    print_table(rows)
    return print_result(result)


def _src_dst(sub, name: str, fn, help: str) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help)
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--overwrite", action="store_true", help="replace whatever is at DST (a dataset or an interrupted write)")
    _codec_arg(s)
    s.set_defaults(fn=fn)
    return s


def _codec_arg(s) -> None:
    s.add_argument("--codec", choices=CODECS, default=None,
                   help="token shards: context (format 2, the default: ids context-coded with a model fitted to "
                        "them) or parquet (format 1); pixel datasets are parquet")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="print a dataset's manifest summary and what its codec costs",
                       description=f"URI: {URI_FORMS}")
    s.add_argument("uri")
    s.add_argument("--measure-shards", type=int, default=8,
                   help="decode the first N shards to measure bits/token and decode speed (0: skip; default 8)")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("verify", help="check every shard's sha256; exit 1 naming bad shards")
    s.add_argument("uri")
    s.add_argument("--use-cache", action="store_true",
                   help="trust the node's shard cache for remote stores (default: read every shard from the store)")
    s.set_defaults(fn=cmd_verify)

    _src_dst(sub, "copy", cmd_copy, help="copy a dataset between any two stores (resumable)")
    s = _src_dst(sub, "subset", cmd_subset, help="materialize a stratified, seeded subset within a storage budget")
    s.add_argument("--budget", required=True, help=BUDGET_FORMS.replace("%", "%%"))
    s.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("synth", help="write a synthetic, spatially correlated token dataset (resumable)")
    s.add_argument("dst")
    s.add_argument("--samples", type=int, default=45000)
    s.add_argument("--grid", type=int, nargs=2, default=[8, 8], metavar=("H", "W"))
    s.add_argument("--codebook", type=int, default=512)
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-rows", type=int, default=8192, help="samples per shard (default 8192)")
    s.add_argument("--overwrite", action="store_true")
    _codec_arg(s)
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("pixels", help="store an image source as a pixel dataset of small JPEGs (resumable)",
                       description="IMAGES: a tar, a folder <anything>/<class>/<file>, or an s3:// prefix. Each image "
                                   "is resized to SIZE x SIZE (bicubic) and stored as a baseline JPEG at QUALITY.")
    s.add_argument("images", metavar="IMAGES")
    s.add_argument("dst", metavar="DST")
    s.add_argument("--size", type=int, required=True, help="side of the stored images in pixels (e.g. 32, 16, 8)")
    s.add_argument("--quality", type=int, required=True, help="JPEG quality, 1..100 (e.g. 75)")
    s.add_argument("--split", default="train", choices=["train", "val", "all"],
                   help="the fixed, seeded validation split (val), the rest (train, default) or all")
    s.add_argument("--val-per-class", type=int, default=500)
    s.add_argument("--max-images", type=int, default=0, help="the first N images of the split (0 = all)")
    s.add_argument("--shard-rows", type=int, default=8192, help="samples per shard (default 8192)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_pixels)

    s = sub.add_parser(
        "import-seit", help="convert SeiT's released token files into a token dataset (resumable)",
        description="DATA_BIN_GZ is <split>-token.data.bin.gz; its index <split>-token.index.npy.gz must lie "
                    "beside it. Sample ids are image indices; the codebook is stored as codebook.safetensors.")
    s.add_argument("data", metavar="DATA_BIN_GZ")
    s.add_argument("labels", metavar="LABELS_TXT", help="one integer class id per line")
    s.add_argument("codebook", metavar="CODEBOOK", help="codebook.ckpt: a (K, d) tensor saved with torch.save")
    s.add_argument("dst", metavar="DST")
    s.add_argument("--grid", type=int, nargs=2, default=[32, 32], metavar=("H", "W"), help="default 32 32")
    s.add_argument("--class-names", metavar="FILE", help="one name per line (default class0..classC-1)")
    s.add_argument("--shard-rows", type=int, default=8192, help="samples per shard (default 8192)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_import_seit)
    prune.add_command(sub, _report)
    cifar.add_command(sub, _report)
    return p


def main() -> int:
    args = parse_args(build_parser())
    return args.fn(args)


if __name__ == "__main__":
    run_main(main)
