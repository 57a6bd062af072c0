"""Storage benchmark: each token codec's bytes against the order-0 entropy bound and its decode
speed, read throughput per store and path, and peak memory of writing and reading large synthetic
datasets.

  python jobs/bench_store.py                      # a synthetic 45k-sample 8x8 set, all stores
  python jobs/bench_store.py --dataset URI        # your dataset (copied to S3/LMDB for the test)
  python jobs/bench_store.py --grid 32 32 --codebook 8192 --samples 16384 --skip s3 lmdb ray rss

The codec table: the dataset copied once per codec (context, parquet; the same ids), each copy's
bits/token (order-0 bound of its ids, and every stored byte), bytes/sample, % of the JPEG bytes
when the dataset records them (tokenized sets), and decode samples/s on one core (CPU time of
stored bytes -> Arrow table, best of 3 per shard). The read paths use the default codec's copy.
S3 rows use a moto server on 127.0.0.1 (needs the `test` extra). Prints tables, then one JSON line.
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
from tokray.storage.formats.tokens import CODECS, DEFAULT_CODEC


def codec_rows(uri, tmp) -> tuple[list[dict], dict[str, str]]:
    """One row per codec: the dataset copied with it, measured; and the copies' URIs."""
    rows, copies = [], {}
    for codec in CODECS:
        copies[codec] = os.path.join(tmp, f"codec-{codec}")
        t0 = time.perf_counter()
        m = copy_dataset(uri, copies[codec], codec=codec)
        write_s = time.perf_counter() - t0
        st = open_dataset(copies[codec]).codec_stats()
        jpeg = (m.meta.extra or {}).get("jpeg_bytes")
        h, w = m.meta.grid
        rows.append({"codec": codec, "grid": f"{h}x{w}", "codes": m.meta.codebook_size, "samples": m.num_samples,
                     "order0_bits": st.order0_bits, "stored_bits": st.stored_bits, "store_bytes": m.store_bytes,
                     "model_bytes": sum(m.files[f]["bytes"] for f in m.format.codec_files(m.meta)),
                     "bytes_per_sample": st.bytes_per_sample, "pct_jpeg": 100 * m.store_bytes / jpeg if jpeg else "-",
                     "decode_samples_per_s": st.decode_samples_per_s, "write_s": write_s})
    return rows, copies


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


def lmdb_picks(uri, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random sample ids of the dataset (a split's ids have gaps), drawn before the timing starts."""
    ds = open_dataset(uri)
    sids = np.concatenate([ds.read_shard(i, ["sample_id"]).column("sample_id").to_numpy()
                           for i in range(len(ds.manifest.shards))])
    return np.random.default_rng(seed).choice(sids, n)


def lmdb_random(ds, pick: np.ndarray, batch: int = 1) -> int:
    """One ``get`` per id (batch 1) or ``get_many`` of ``batch`` ids in one transaction, on dataset ``ds``."""
    if batch == 1:
        for sid in pick:
            ds.get(int(sid))
    else:
        for start in range(0, len(pick), batch):
            ds.get_many(pick[start:start + batch])
    return len(pick)


def lmdb_rows(uri, pick: np.ndarray) -> list[dict]:
    """Random access twice: from a fresh open (each shard a lookup touches is verified on that first
    touch: a whole-shard scan + sha256), and once every shard is verified (a loader's steady state)."""
    warm = open_dataset(uri)
    lmdb_random(warm, pick, batch=1024)  # touches every shard the picks fall in
    rows = []
    for name, batch, n in (("random access by sample id", 1, 20_000),
                           ("random access, get_many of 1024 (one txn)", 1024, len(pick))):
        rows.append({"path": f"lmdb: {name}, first touch verifies",
                     "samples_per_s": timed(lambda: lmdb_random(open_dataset(uri), pick[:n], batch), 3)})
        rows.append({"path": f"lmdb: {name}, shards verified",
                     "samples_per_s": timed(lambda: lmdb_random(warm, pick[:n], batch), 3)})
    return rows


def ray_rows(uris: dict[str, str]) -> list[dict]:
    """The Ray Data read paths on each codec's copy (shards decode in the read tasks)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = [row for codec, uri in uris.items() for row in _ray_codec_rows(codec, uri)]
    ray.shutdown()
    return rows


def _ray_codec_rows(codec: str, uri: str) -> list[dict]:
    from tokray.data.spec import DataSpec
    from tokray.data.stream import iter_torch_batches
    from tokray.storage.raysource import read_ray_dataset

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

    for path, fn in (("default iter_torch_batches (bs 256)", default_path),
                     ("tokray arrow collate (bs 256)", tokray_path(256)),
                     ("tokray arrow collate (bs 1024)", tokray_path(1024)),
                     ("materialized blocks (bs 1024)", materialized)):
        rows.append({"path": f"ray data, {codec}: {path}", "samples_per_s": timed(fn, 2)})
    return rows


def s3_rows(copies: dict[str, str], local: dict[str, float], tmp) -> list[dict]:
    """Each codec's copy on a moto server: a first pass (every shard a GET) and the best of 3 cached passes
    (one LIST; opening the dataset included), with the cached pass's ratio to the local one."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from s3server import LocalS3Server  # test machinery (moto): the repo's tests/, not the package

    rows = []
    with LocalS3Server() as server:
        os.environ.update(server.env())
        os.environ["TOKRAY_CACHE_DIR"] = os.path.join(tmp, "cache")
        server.create_bucket("bench")
        for codec, uri in copies.items():
            s3 = f"s3://bench/{codec}"
            copy_dataset(uri, s3, codec=codec)
            rows.append({"path": f"s3 {codec} (moto, 127.0.0.1): first pass", "samples_per_s": timed(lambda: plain_pass(s3))})
            cached = timed(lambda: plain_pass(s3), 3)
            rows.append({"path": f"s3 {codec}: cached pass", "samples_per_s": cached, "vs_local": cached / local[codec]})
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
    p.add_argument("--grid", type=int, nargs=2, default=[8, 8], metavar=("H", "W"), help="of the synthetic set")
    p.add_argument("--codebook", type=int, default=512, help="codebook size of the synthetic set")
    p.add_argument("--rss-sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                   help="dataset sizes for the peak-memory rows")
    p.add_argument("--skip", nargs="*", default=[], choices=["s3", "lmdb", "ray", "rss"])
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    args = parse_args(p)
    if args.smoke_test:
        args.samples, args.rss_sizes = 3000, [5000, 20000]
    with tempfile.TemporaryDirectory(prefix="tokray-bench-") as tmp:  # its copies are removed afterwards
        return measure(args, tmp)


def measure(args, tmp: str) -> int:
    uri = args.dataset
    if uri is None:
        uri = os.path.join(tmp, "synth")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "dataset.py"), "-q", "synth", uri,
                        "--samples", str(args.samples), "--grid", *map(str, args.grid), "--codebook",
                        str(args.codebook)], check=True)
    storage, copies = codec_rows(uri, tmp)
    for r in storage:
        r["vs_order0"] = r["stored_bits"] / r["order0_bits"] - 1
    print_table(storage, ["codec", "grid", "codes", "samples", "order0_bits", "stored_bits", "vs_order0", "store_bytes",
                          "model_bytes", "bytes_per_sample", "pct_jpeg", "decode_samples_per_s", "write_s"])
    print()

    uri = copies[DEFAULT_CODEC]
    local = {c: timed(lambda c=c: plain_pass(copies[c]), 3) for c in CODECS}
    rows = [{"path": f"local {c}: plain iterator (verify+decode)", "samples_per_s": local[c]} for c in CODECS]
    if "s3" not in args.skip:
        rows += s3_rows(copies, local, tmp)
    if "lmdb" not in args.skip:
        lmdb = f"lmdb://{tmp}/lmdb"
        copy_dataset(uri, lmdb)
        rows += lmdb_rows(lmdb, lmdb_picks(lmdb, 100_000))
    if "ray" not in args.skip:
        rows += ray_rows(copies)
    if rows:
        print_table(rows, ["path", "samples_per_s", "vs_local"])
        print()

    rss = []
    if "rss" not in args.skip:
        for n in args.rss_sizes:
            where = os.path.join(tmp, f"rss-{n}")
            rss.append({"samples": n, "write_peak_rss_mib": peak_rss("write", n, where),
                        "read_peak_rss_mib": peak_rss("read", n, where)})
        print_table(rss)
    return print_result({"storage": {r["codec"]: r for r in storage},
                         "throughput": {r["path"]: r["samples_per_s"] for r in rows}, "peak_rss": rss})


if __name__ == "__main__":
    run_main(main)
