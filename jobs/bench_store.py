"""Storage benchmark: bytes per sample against the entropy bound, read throughput per store and
path, and peak memory of writing and reading large synthetic datasets.

  python jobs/bench_store.py                      # a synthetic 45k-sample set, all stores
  python jobs/bench_store.py --dataset URI        # your dataset (copied to S3/LMDB for the test)

S3 rows use a moto server on 127.0.0.1 (needs the `test` extra). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from tokray.cli import parse_args, print_result, print_table, run_main
from tokray.storage.dataset import copy_dataset, open_dataset
from tokray.storage.formats.tokens import table_ids


def order0_entropy_bits(uri) -> float:
    counts = None
    for table in open_dataset(uri).iter_tables():
        c = np.bincount(table_ids(table).ravel(), minlength=65536)
        counts = c if counts is None else counts + c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def timed(fn, repeats: int = 1) -> float:
    """Best samples/s of ``repeats`` runs of fn() (which returns a sample count)."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def plain_pass(uri) -> int:
    return sum(len(b["ids"]) for b in open_dataset(uri).iter_batches(batch_size=1024))


def lmdb_random(uri, n: int = 20000, seed: int = 0, batch: int = 1) -> int:
    """Random sample ids, one ``get`` each (batch 1) or ``get_many`` of ``batch`` ids in one transaction."""
    ds = open_dataset(uri)
    sids = np.concatenate([s for s in (np.arange(i.first_sample_id, i.last_sample_id + 1) for i in ds.manifest.shards)])
    pick = np.random.default_rng(seed).choice(sids, n)
    if batch == 1:
        for sid in pick:
            ds.get(int(sid))
    else:
        for start in range(0, n, batch):
            ds.get_many(pick[start:start + batch])
    return n


def ray_rows(uri) -> list[dict]:
    import ray

    from tokray.data.spec import DataSpec
    from tokray.data.stream import iter_torch_batches
    from tokray.storage.raysource import read_ray_dataset

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    ds = read_ray_dataset(uri)
    spec = DataSpec.from_manifest(open_dataset(uri).manifest)

    def default_path():
        return sum(len(b["ids"]) for b in ds.iter_torch_batches(batch_size=256))

    def tokray_path(bs):
        return lambda: sum(len(b["ids"]) for b in iter_torch_batches(ds, spec, batch_size=bs))

    mat = ds.materialize()

    def materialized():
        return sum(len(b["ids"]) for b in iter_torch_batches(mat, spec, batch_size=1024))

    rows.append({"path": "ray data: default iter_torch_batches (bs 256)", "samples_per_s": timed(default_path, 2)})
    rows.append({"path": "ray data: tokray arrow collate (bs 256)", "samples_per_s": timed(tokray_path(256), 2)})
    rows.append({"path": "ray data: tokray arrow collate (bs 1024)", "samples_per_s": timed(tokray_path(1024), 2)})
    rows.append({"path": "ray data: materialized blocks (bs 1024)", "samples_per_s": timed(materialized, 2)})
    ray.shutdown()
    return rows


def s3_rows(uri, tmp) -> list[dict]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from s3server import LocalS3Server  # test machinery (moto): the repo's tests/, not the package

    rows = []
    with LocalS3Server() as server:
        os.environ.update(server.env())
        os.environ["TOKRAY_CACHE_DIR"] = os.path.join(tmp, "cache")
        server.create_bucket("bench")
        copy_dataset(uri, "s3://bench/tokens")
        rows.append({"path": "s3 (moto, 127.0.0.1): first pass", "samples_per_s": timed(lambda: plain_pass("s3://bench/tokens"))})
        rows.append({"path": "s3 (moto, 127.0.0.1): cached pass", "samples_per_s": timed(lambda: plain_pass("s3://bench/tokens"), 3)})
    return rows


def peak_rss(mode: str, samples: int, where: str) -> float:
    """Peak RSS in MiB of a child process that writes or reads ``samples`` synthetic samples."""
    code = ("import sys; from tokray.data.synth import SynthTokens; from tokray.storage.dataset import DatasetWriter, open_dataset\n"
            f"n, uri = {samples}, {where!r}\n"
            "if sys.argv[1] == 'write':\n"
            "    g = SynthTokens()\n"
            "    with DatasetWriter(uri, g.meta(8192), overwrite=True) as w:\n"
            "        for b in g.batches(n, 8192): w.write(*b)\n"
            "else:\n"
            "    assert sum(len(b['ids']) for b in open_dataset(uri).iter_batches(1024)) == n\n"
            # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork+exec
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="token dataset URI (default: a synthetic 45k-sample set)")
    p.add_argument("--samples", type=int, default=45000, help="size of the synthetic set when --dataset is not given")
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                   help="dataset sizes for the peak-memory rows")
    p.add_argument("--skip", nargs="*", default=[], choices=["s3", "lmdb", "ray", "rss"])
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = parse_args(p)
    if args.smoke_test:
        args.samples, args.rss_sizes = 3000, [5000, 20000]
    tmp = tempfile.mkdtemp(prefix="tokray-bench-")
    uri = args.dataset
    if uri is None:
        uri = os.path.join(tmp, "synth")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "dataset.py"), "-q", "synth", uri,
                        "--samples", str(args.samples)], check=True)
    ds = open_dataset(uri)
    m = ds.manifest
    bits = order0_entropy_bits(uri)
    tps = m.meta.tokens_per_sample
    storage = {"samples": m.num_samples, "store_bytes": m.store_bytes, "bytes_per_sample": m.store_bytes / m.num_samples,
               "entropy_bits_per_token": bits, "entropy_bytes_per_sample": bits * tps / 8,
               "stored_bits_per_token": 8 * m.store_bytes / m.num_samples / tps}
    storage["overhead_vs_entropy"] = storage["bytes_per_sample"] / storage["entropy_bytes_per_sample"] - 1
    print_table([storage])
    print()

    rows = [{"path": "local parquet: plain iterator (verify+decode)", "samples_per_s": timed(lambda: plain_pass(uri), 3)}]
    if "s3" not in args.skip:
        rows += s3_rows(uri, tmp)
    if "lmdb" not in args.skip:
        copy_dataset(uri, f"lmdb://{tmp}/lmdb")
        rows.append({"path": "lmdb: random access by sample id", "samples_per_s": timed(lambda: lmdb_random(f"lmdb://{tmp}/lmdb"))})
        rows.append({"path": "lmdb: random access, get_many of 1024 (one txn)",
                     "samples_per_s": timed(lambda: lmdb_random(f"lmdb://{tmp}/lmdb", n=100_000, batch=1024), 3)})
    if "ray" not in args.skip:
        rows += ray_rows(uri)
    print_table(rows)
    print()

    rss = []
    if "rss" not in args.skip:
        for n in args.rss_sizes:
            where = os.path.join(tmp, f"rss-{n}")
            rss.append({"samples": n, "write_peak_rss_mib": peak_rss("write", n, where),
                        "read_peak_rss_mib": peak_rss("read", n, where)})
        print_table(rss)
    return print_result({"storage": storage, "throughput": {r["path"]: r["samples_per_s"] for r in rows}, "peak_rss": rss})


if __name__ == "__main__":
    run_main(main)
