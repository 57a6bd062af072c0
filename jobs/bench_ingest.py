"""Training-ingest benchmark through the real path: a Ray Train TorchTrainer whose loop only consumes
its rank's batches of the global sample order (tokray.data.ingest; no model), per ingest mode, worker
count and store.

  python jobs/bench_ingest.py                           # a synthetic 200k-sample 8x8 set: local, S3, LMDB
  python jobs/bench_ingest.py --data URI --stores local # your dataset
  python jobs/bench_ingest.py --smoke-test              # seconds: a small set, local only (CI)

Cases: store x mode x workers x ``--splits`` (rank_split; 2+ workers). Per case: samples/s per worker
and in total, time to the first batch, each worker's peak RSS and its growth after the first batch
(flat = bounded memory), and the peak object store use (sampled on the driver). S3 rows copy the set to a moto server on 127.0.0.1 (the `test` extra). LMDB sets are read
through the same shard reader. Starts its own Ray (``--object-store-mb`` caps its object store) unless
RAY_ADDRESS names a cluster. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time

from tokray.cli import parse_args, print_result, print_table, run_main


@dataclasses.dataclass(frozen=True)
class Case:
    store: str
    mode: str
    workers: int
    split: str = "interleaved"


def consume_loop(config: dict) -> None:
    """The Train loop: this rank's batches of ``epochs`` epochs, timed; per-rank figures gathered on rank 0."""
    import psutil
    import ray.train
    import torch.distributed as dist

    from tokray.data.spec import DataSpec
    from tokray.data.stream import iter_torch_batches

    ingest = config["ingest"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    spec = DataSpec.from_manifest(ingest.manifest)
    proc = psutil.Process()
    micro = ingest.order.global_batch // world
    t0 = time.perf_counter()
    first = None
    seen, peak, rss_first = 0, proc.memory_info().rss, 0
    epoch = 0
    while epoch < config["epochs"]:  # one stream over several epochs, as the training loop reads them
        last = ingest.stream_end(epoch, config["epochs"] - 1)
        for batch in iter_torch_batches(ingest.dataset(epoch, 0, rank, world, last), spec, micro, drop_last=True):
            seen += len(batch["label"])
            if first is None:
                first = time.perf_counter() - t0
                rss_first = proc.memory_info().rss
            if seen // micro % 16 == 0:
                peak = max(peak, proc.memory_info().rss)
        epoch = last + 1
    elapsed = time.perf_counter() - t0 - (first or 0)
    peak = max(peak, proc.memory_info().rss)
    mine = {"rank": rank, "samples": seen, "samples_per_s": seen / max(elapsed, 1e-9), "first_batch_s": first,
            "peak_rss_mib": peak / 2**20, "rss_growth_mib": (peak - rss_first) / 2**20}
    everyone = [None] * world
    if world > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if rank == 0:  # a file, not ray.train.report: V2 keeps reported metrics only beside a checkpoint
        with open(os.path.join(config["out"], "workers.json.tmp"), "w") as f:
            json.dump(everyone, f)
        os.replace(os.path.join(config["out"], "workers.json.tmp"), os.path.join(config["out"], "workers.json"))


class ObjectStoreSampler:
    """Peak bytes in Ray's object store, sampled every 0.2 s. Ray has no public API for this: it is what
    `ray memory --stats-only` prints (ray._private.internal_api), so a failure reads as unknown."""

    def __init__(self):
        import ray

        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._address = ray.get_runtime_context().gcs_address  # this job's Ray, not another one on the machine

    def _used(self):
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        return get_memory_info_reply(get_state_from_address(self._address)).store_stats.object_store_bytes_used

    def _run(self):
        while not self._stop.is_set():
            try:
                used = self._used()
                self.peak = used if self.peak is None else max(self.peak, used)
            except Exception:  # a private API: never let it fail the benchmark
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def run_case(uri: str, case: Case, args, out: str) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from tokray.data.ingest import plan_ingest
    from tokray.recipes import get_recipe

    cfg = get_recipe("smoke", data=uri, batch_size=args.batch_size, num_workers=case.workers, ingest=case.mode,
                     cpus_per_worker=args.cpus / case.workers, shuffle_window=args.window, rank_split=case.split,
                     out=out)
    with ObjectStoreSampler() as store:
        t0 = time.perf_counter()
        ingest = plan_ingest(uri, cfg)
        trainer = TorchTrainer(
            consume_loop, train_loop_config={"ingest": ingest, "epochs": args.epochs, "out": out},
            scaling_config=ray.train.ScalingConfig(num_workers=case.workers,
                                                   resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=ray.train.RunConfig(name=f"bench-{case.store}-{case.mode}-{case.workers}-{case.split}",
                                           storage_path=os.path.join(out, "ray")))
        os.makedirs(out, exist_ok=True)
        trainer.fit()
        wall = time.perf_counter() - t0
    with open(os.path.join(out, "workers.json")) as f:
        workers = json.load(f)
    del ingest  # frees materialized blocks before the next case
    total = sum(w["samples"] for w in workers)
    return {"store": case.store, "mode": case.mode, "workers": case.workers, "split": case.split, "samples": total,
            "per_worker_samples_per_s": min(w["samples_per_s"] for w in workers),
            "total_samples_per_s": sum(w["samples_per_s"] for w in workers),
            "first_batch_s": max(w["first_batch_s"] or 0 for w in workers),
            "peak_rss_mib": max(w["peak_rss_mib"] for w in workers),
            "rss_growth_mib": max(w["rss_growth_mib"] for w in workers),
            "object_store_peak_mib": None if store.peak is None else store.peak / 2**20, "wall_s": wall}


def store_uris(src: str, stores: list[str], tmp: str, stack) -> dict[str, str]:
    from tokray.storage.dataset import copy_dataset

    uris = {}
    for store in stores:
        if store == "local":
            uris[store] = src
        elif store == "lmdb":
            uris[store] = f"lmdb://{tmp}/lmdb"
            copy_dataset(src, uris[store])
        elif store == "s3":
            sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
            from s3server import LocalS3Server  # test machinery (moto): the repo's tests/, not the package

            server = stack.enter_context(LocalS3Server())
            server.create_bucket("bench-ingest")
            os.environ.update(server.env())  # Ray workers started after this inherit the endpoint
            uris[store] = "s3://bench-ingest/tokens"
            copy_dataset(src, uris[store])
    return uris


def main() -> int:
    import contextlib

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="token dataset URI (default: a synthetic set of --samples)")
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("H", "W"))
    p.add_argument("--shard-rows", type=int, default=8192)
    p.add_argument("--modes", nargs="+", default=["materialize", "stream"], choices=["materialize", "stream"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--splits", nargs="+", default=["interleaved"], choices=["interleaved", "storage"],
                   help="rank_split: how a global batch is split over the workers (storage: a rank reads ~1/W "
                        "of a window's shards); one worker is the same either way, so its cases run once")
    p.add_argument("--stores", nargs="+", default=["local", "s3", "lmdb"], choices=["local", "s3", "lmdb"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024, help="global batch")
    p.add_argument("--window", type=int, default=262_144, help="shuffle window, samples")
    p.add_argument("--cpus", type=float, default=2, help="CPUs the workers of a case share")
    p.add_argument("--object-store-mb", type=int, help="start Ray with this object store size")
    p.add_argument("--smoke-test", action="store_true",
                   help="20k samples, local store, both modes and splits, 2 workers")
    args = parse_args(p)
    if args.smoke_test:
        args.samples, args.stores, args.shard_rows, args.workers = 20_000, ["local"], 2048, [2]
        args.splits = ["interleaved", "storage"]
    import ray

    from tokray.data.synth import SynthTokens
    from tokray.storage.dataset import DatasetWriter, open_dataset

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        src = args.data
        if src is None:
            src = os.path.join(tmp, "synth")
            gen = SynthTokens(grid=tuple(args.grid), codebook_size=512, num_classes=10, seed=0)
            with DatasetWriter(src, gen.meta(args.shard_rows)) as writer:
                for batch in gen.batches(args.samples, chunk=8192):
                    writer.write(*batch)
        uris = store_uris(src, args.stores, tmp, stack)
        if not ray.is_initialized():
            store = args.object_store_mb * 2**20 if args.object_store_mb else None
            ray.init(include_dashboard=False, configure_logging=False, object_store_memory=store,
                     log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cases = dict.fromkeys(Case(s, m, w, split if w > 1 else "interleaved") for s in args.stores
                              for m in args.modes for w in args.workers for split in args.splits)
        rows = [run_case(uris[c.store], c, args, os.path.join(tmp, "runs", f"{c.store}-{c.mode}-{c.workers}-{c.split}"))
                for c in cases]
    print_table(rows)
    samples, grid = args.samples, list(args.grid)
    if args.data is not None:  # what was measured: the given dataset's size and grid, not the synthetic defaults
        m = open_dataset(args.data).manifest
        samples, grid = m.num_samples, list(m.meta.grid)
    return print_result({"samples": samples, "data": args.data or "synthetic", "grid": grid,
                         "batch_size": args.batch_size,
                         "epochs": args.epochs, "object_store_mb": args.object_store_mb, "cases": rows})


if __name__ == "__main__":
    run_main(main)
