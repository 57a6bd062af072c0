"""Context-coded token shards (tokray.storage.entropy) against today's Parquet shards: bits per token
(order-0 bound, Parquet, coded with the model's bytes included), bytes per sample, % of the JPEG
bytes, and encode / decode samples/s on one core (decode: best of --repeats passes per shard, wall
clock and this thread's CPU time; tables built beforehand, once per process, see tables_s).

  python jobs/bench_codec.py                     # shipped CIFAR-10 tokens (train, val) + synthetic 32x32 ids
  python jobs/bench_codec.py --dataset URI       # any token dataset instead of the shipped one
  python jobs/bench_codec.py --smoke-test        # tiny sizes, seconds

Shards are coded as the dataset has them (its shard_rows); the synthetic set uses --shard-rows.
Only the ids are coded here (labels and sample ids are not): ``jobs/bench_store.py`` measures whole
datasets in each codec. Prints tables, then one JSON line.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: before numpy is imported

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from tokray.cli import print_result, print_table, run_main  # noqa: E402
from tokray.storage.entropy import decode_ids, encode_ids, fit_context_model, order0_bits  # noqa: E402
from tokray.storage.formats.tokens import FORMAT  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock and best CPU (this thread) seconds of ``repeats`` calls: on a shared machine
    the CPU time is what one uncontended core would take."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.thread_time() - c0)
    return wall, cpu


def bench(name: str, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]], codebook_size: int, repeats: int,
          jpeg_bytes: int | None = None, manifest_bytes: int = 0, model=None) -> dict:
    """shards: (ids [n, h, w], labels, sample ids) per shard. With ``model`` given (shared with
    another dataset that counts its bytes), its bytes are not counted here."""
    ids = np.concatenate([s[0] for s in shards])
    n, h, w = ids.shape
    tokens = ids.size
    parquet = sum(len(FORMAT.encode_shard(FORMAT.records_to_table(None, *s))) for s in shards)
    t0 = time.perf_counter()
    shared = model is not None
    if not shared:
        model = fit_context_model(ids, codebook_size)
    fit_s = 0.0 if shared else time.perf_counter() - t0
    model_bytes = 0 if shared else len(model.to_bytes())
    t0 = time.perf_counter()
    model.prepare()
    tables_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    coded = [encode_ids(s[0], model) for s in shards]
    enc_s = time.perf_counter() - t0
    for s, data in zip(shards, coded):
        if not np.array_equal(decode_ids(data, model, len(s[0]), (h, w)), s[0]):
            raise AssertionError(f"{name}: decoded ids differ from the input")
    walls, cpus = [float("inf")] * len(shards), [float("inf")] * len(shards)
    for _ in range(repeats):  # passes over all shards: a burst of load on the machine spoils one pass, not a shard
        for i, (s, data) in enumerate(zip(shards, coded)):
            wall, cpu = best_time(lambda: decode_ids(data, model, len(s[0]), (h, w)), 1)
            walls[i], cpus[i] = min(walls[i], wall), min(cpus[i], cpu)
    dec_s, dec_cpu = sum(walls), sum(cpus)
    coded_bytes = model_bytes + sum(len(c) for c in coded)
    row = {"dataset": name, "_model": model, "samples": n, "grid": f"{h}x{w}", "codes": codebook_size, "model": repr(model),
           "order0_bits": order0_bits(ids, codebook_size), "parquet_bits": 8 * parquet / tokens,
           "coded_bits": 8 * coded_bytes / tokens, "model_bytes": model_bytes, "coded_bytes": coded_bytes,
           "parquet_bytes": parquet, "coded_bytes_per_sample": coded_bytes / n, "parquet_bytes_per_sample": parquet / n,
           "table_mib": model.table_bytes / 2**20, "fit_s": fit_s, "tables_s": tables_s,
           "encode_samples_per_s": n / enc_s, "decode_samples_per_s": n / dec_s,
           "decode_samples_per_cpu_s": n / dec_cpu, "decode_tokens_per_s": tokens / dec_s}
    row["saving_vs_parquet"] = 1 - coded_bytes / parquet
    if jpeg_bytes:
        row["jpeg_bytes"] = jpeg_bytes
        row["manifest_bytes"] = manifest_bytes
        row["pct_jpeg_parquet"] = 100 * (parquet + manifest_bytes) / jpeg_bytes
        row["pct_jpeg_coded"] = 100 * (coded_bytes + manifest_bytes) / jpeg_bytes
    return row


def manifest_bytes(ds) -> int:
    """The manifest's own bytes: the store's, less the shards and side files (a stored model is measured here)."""
    return ds.manifest.store_bytes - ds.manifest.shard_bytes - ds.manifest.file_bytes


def dataset_shards(uri: str, limit: int | None):
    from tokray.storage.dataset import open_dataset

    ds = open_dataset(uri)
    shards, left = [], limit
    for i in range(len(ds.manifest.shards)):
        d = ds.format.to_numpy(ds.meta, ds.read_shard(i))
        s = (d["ids"], d["label"], d["sample_id"])
        if left is not None:
            s = tuple(a[:left] for a in s)
            left -= len(s[0])
        shards.append(s)
        if left is not None and left <= 0:
            break
    return ds, shards


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="token dataset URI (default: the shipped CIFAR-10 train tokens)")
    p.add_argument("--samples", type=int, help="use only the first N samples of the dataset")
    p.add_argument("--synth-samples", type=int, default=16384, help="synthetic 32x32 samples (0: skip)")
    p.add_argument("--synth-codes", type=int, default=8192, help="codebook size of the synthetic 32x32 ids")
    p.add_argument("--shard-rows", type=int, default=8192, help="rows per shard of the synthetic set")
    p.add_argument("--repeats", type=int, default=7, help="decode timing: best of this many passes")
    p.add_argument("--no-val", action="store_true", help="skip the shipped val split")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args()
    if args.smoke_test:
        args.samples, args.synth_samples, args.shard_rows, args.repeats = 3000, 300, 256, 1
    from tokray.assets import default_tokens

    def jpeg_of(ds):
        return (ds.meta.extra or {}).get("jpeg_bytes") if args.samples is None else None

    ds, shards = dataset_shards(args.dataset or default_tokens("train"), args.samples)
    rows = [bench(args.dataset or "cifar10 train (shipped)", shards, ds.meta.codebook_size, args.repeats,
                  jpeg_bytes=jpeg_of(ds), manifest_bytes=manifest_bytes(ds))]
    if args.dataset is None and not args.no_val:  # the rest of the shipped set: own model, or train's
        vds, vshards = dataset_shards(default_tokens("val"), args.samples)
        kw = dict(jpeg_bytes=jpeg_of(vds), manifest_bytes=manifest_bytes(vds))
        rows.append(bench("cifar10 val (shipped), own model", vshards, vds.meta.codebook_size, args.repeats, **kw))
        rows.append(bench("cifar10 val (shipped), train's model", vshards, vds.meta.codebook_size, args.repeats,
                          model=rows[0]["_model"], **kw))
    if args.synth_samples:
        from tokray.data.synth import SynthTokens

        g = SynthTokens(grid=(32, 32), codebook_size=args.synth_codes)
        syn = [g.chunk(s, min(args.shard_rows, args.synth_samples - s))
               for s in range(0, args.synth_samples, args.shard_rows)]
        rows.append(bench(f"synthetic 32x32, {args.synth_codes} codes", syn, args.synth_codes, args.repeats))
    for r in rows:
        r.pop("_model")
    print_table(rows, ["dataset", "samples", "grid", "codes", "order0_bits", "parquet_bits", "coded_bits",
                       "model_bytes", "parquet_bytes", "coded_bytes", "coded_bytes_per_sample", "saving_vs_parquet"])
    print()
    print_table(rows, ["dataset", "model", "table_mib", "fit_s", "tables_s", "encode_samples_per_s",
                       "decode_samples_per_s", "decode_samples_per_cpu_s", "decode_tokens_per_s"])
    jrows = [r for r in rows if "jpeg_bytes" in r]
    if len(jrows) == 3:  # the whole shipped set: train + val coded with train's model
        t, v = jrows[0], jrows[2]
        total = {"dataset": "shipped set (train + val, one model)", "jpeg_bytes": t["jpeg_bytes"] + v["jpeg_bytes"],
                 "manifest_bytes": t["manifest_bytes"] + v["manifest_bytes"]}
        for key, col in (("pct_jpeg_parquet", "parquet_bytes"), ("pct_jpeg_coded", "coded_bytes")):
            total[key] = 100 * (t[col] + v[col] + total["manifest_bytes"]) / total["jpeg_bytes"]
        jrows.append(total)
    if jrows:
        print()
        print_table(jrows, ["dataset", "jpeg_bytes", "manifest_bytes", "pct_jpeg_parquet", "pct_jpeg_coded"])
    print_result({"codec": rows, "pct_jpeg": {r["dataset"]: r["pct_jpeg_coded"] for r in jrows}})
    return 0


if __name__ == "__main__":
    run_main(main)
