"""Training ingest: each rank's part of the global sample order (tokray.data.order), as Ray Data streams.

Two modes, one order:
- ``stream``: each rank runs one Ray Data read over the windows of the epochs ahead (whole epochs, up to
  ``STREAM_WINDOWS`` windows, so an epoch boundary does not stall the stream); a read task reads
  the window's shards that hold the rank's rows straight from the store (local, S3 through the node's
  cache tier, LMDB) and takes the rank's slice of every global batch, in order. Memory is a few
  windows per rank, whatever the size of the dataset.
- ``materialize``: the driver reads and verifies every shard once into Ray's object store; the
  same read tasks then take the shards from there instead of the store.
``auto`` materializes when the decoded dataset fits ``materialize_fraction`` of the cluster's object
store. A read task reads only the shards of its window that hold the rank's rows: all of them with the
default ``rank_split`` (interleaved), about 1/W of them with ``storage`` (tokray.data.order).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Iterable

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from tokray.config import INGEST_MODES as MODES
from tokray.data.order import SampleOrder, Window
from tokray.storage.dataset import Dataset, open_dataset
from tokray.storage.manifest import Manifest
from tokray.storage.stores import open_store

log = logging.getLogger(__name__)

NODE_ID_LABEL = "ray.io/node-id"  # every node's built-in label (ray._raylet.RAY_NODE_ID_KEY)
READS_IN_FLIGHT = 2
STREAM_WINDOWS = 512  # windows one Ray Data stream plans at most (whole epochs; see Ingest.stream_end)


@dataclasses.dataclass(frozen=True)
class Ingest:
    """What a worker needs to read its part of any epoch from any position (the driver's ``plan_ingest``)."""

    mode: str  # "stream" or "materialize" (auto is resolved on the driver)
    uri: str
    manifest: Manifest
    order: SampleOrder
    blocks: tuple = ()  # materialize: one ObjectRef of a verified shard table per shard, in manifest order
    trace_dir: str = ""  # non-empty: every read task appends the shards it read to <trace_dir>/rank<r>.jsonl

    @property
    def materialized(self) -> bool:
        return self.mode == "materialize"

    def shard_table(self, i: int, dataset: Dataset | None) -> pa.Table:
        if self.materialized:
            import ray

            return ray.get(self.blocks[i])
        return dataset.read_shard(i)

    def dataset(self, epoch: int, start: int, rank: int, world: int, last_epoch: int):
        """A ``ray.data.Dataset`` of the rows ``rank`` of ``world`` trains on from position (``epoch``, ``start``:
        samples of it consumed by the whole run) through the end of ``last_epoch`` (``stream_end``), in
        training order. One stream over several epochs reads the next epoch's first window while this epoch's
        last one trains, instead of stalling on it at every epoch boundary."""
        import ray
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the blocks' order is the training order
        ctx.enable_progress_bars = False
        # reads run beside the worker: its node's cache tier, no transfer. No CPU is reserved for them: the
        # Train workers hold the node's CPUs, and reading + decoding a window is small next to a step
        here = {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}
        source = _WindowSource(self, epoch, start, rank, world, last_epoch)
        # two read tasks at a time: one window in flight while the rank trains on the one before
        return ray.data.read_datasource(source, num_cpus=0, label_selector=here, concurrency=READS_IN_FLIGHT)

    def stream_end(self, epoch: int, final_epoch: int) -> int:
        """The last epoch one stream from ``epoch`` covers: through ``final_epoch`` (the run's last), but at most
        ``STREAM_WINDOWS`` windows' worth of whole epochs (at least one), so planning one stays cheap."""
        return min(final_epoch, epoch + max(1, STREAM_WINDOWS // self.order.windows_per_epoch) - 1)


def resolve_mode(mode: str, inmemory_bytes: int, object_store_bytes: float, fraction: float) -> str:
    """``auto`` -> materialize when the decoded set fits ``fraction`` of the object store, else stream."""
    if mode not in MODES:
        raise ValueError(f"ingest mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "materialize" if inmemory_bytes <= fraction * object_store_bytes else "stream"


def plan_ingest(uri: str, cfg, trace_dir: str = "") -> Ingest:
    """On the driver (Ray running), for TrainConfig ``cfg``: the sample order, ``auto`` resolved and logged,
    and in materialize mode every shard read into the object store (a corrupt shard fails here, before a
    worker starts)."""
    import ray

    ds = open_dataset(uri)
    m = ds.manifest
    order = SampleOrder.for_dataset([s.rows for s in m.shards], cfg.seed, cfg.shuffle_window, cfg.batch_size,
                                    cfg.rank_split)
    decoded = ds.format.inmemory_bytes(m.meta, m.num_samples, m.shard_bytes)
    store = ray.cluster_resources().get("object_store_memory", 0.0)
    chosen = resolve_mode(cfg.ingest, decoded, store, cfg.materialize_fraction)
    log.info("ingest %s (%s): %d samples, %.1f MB decoded, object store %.0f MB (materialize up to %.0f%%); "
             "windows of %d of %d shards, global batch %d split %s", chosen, "auto" if cfg.ingest == "auto" else "asked",
             m.num_samples, decoded / 1e6, store / 1e6, 100 * cfg.materialize_fraction, order.window_shards,
             len(m.shards), order.global_batch, order.split)
    blocks = materialize_shards(ds) if chosen == "materialize" else ()
    return Ingest(chosen, ds.uri, m, order, blocks, trace_dir)


def materialize_shards(ds: Dataset) -> tuple:
    """Every shard, verified, as one object-store block each (refs owned by the driver)."""
    import ray

    # DEFAULT: outside the caller's placement group (a Tune trial's holds no CPU for these reads)
    read = ray.remote(num_returns=2)(_read_shard_and_rows).options(scheduling_strategy="DEFAULT")
    pairs = [read.remote(ds.uri, ds.manifest, i) for i in range(len(ds.manifest.shards))]
    ray.get([rows for _, rows in pairs])  # raises the first read task's error (e.g. a bad digest)
    return tuple(table for table, _ in pairs)


def _read_shard_and_rows(uri: str, manifest: Manifest, i: int) -> tuple[pa.Table, int]:
    table = Dataset(open_store(uri), manifest).read_shard(i)
    return table, table.num_rows


def rows_in_rank_slices(lo: int, hi: int, global_batch: int, per_rank: int, rank: int) -> int:
    """How many positions in [lo, hi) fall in rank's slice of their global batch."""
    def upto(x: int) -> int:
        full, rest = divmod(x, global_batch)
        return full * per_rank + min(max(rest - rank * per_rank, 0), per_rank)
    return max(0, upto(hi) - upto(lo)) if hi > lo else 0


class _WindowSource(Datasource):
    """One read task per window, in order: epoch ``epoch``'s from position ``start`` on, then every window of
    the epochs after it through ``last_epoch``."""

    def __init__(self, ingest: Ingest, epoch: int, start: int, rank: int, world: int, last_epoch: int):
        self.ingest, self.rank, self.world = ingest, rank, world
        self.parts = [(e, w, start if e == epoch else 0) for e in range(epoch, last_epoch + 1)
                      for w in ingest.order.windows(e, start if e == epoch else 0)]

    def _rows(self, w: Window, start: int) -> int:
        o = self.ingest.order
        lo, hi = max(w.start, start), min(w.end, o.used_per_epoch)
        return rows_in_rank_slices(lo, hi, o.global_batch, o.global_batch // self.world, self.rank)

    def _bytes(self, w: Window, start: int) -> int:
        m = self.ingest.manifest
        return m.format.inmemory_bytes(m.meta, self._rows(w, start),
                                       sum(m.shards[s].bytes for s in w.shards) // self.world)

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._bytes(w, start) for _, w, start in self.parts)

    def get_name(self) -> str:
        return "TokrayWindows"

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        schema = self.ingest.manifest.format.schema(self.ingest.manifest.meta)
        tasks = []
        for epoch, w, start in self.parts:
            meta = BlockMetadata(num_rows=self._rows(w, start), size_bytes=self._bytes(w, start), exec_stats=None,
                                 input_files=tuple(self.ingest.manifest.shards[s].path for s in w.shards))
            tasks.append(ReadTask(_window_reader(self.ingest, epoch, w, start, self.rank, self.world),
                                  meta, schema=schema, per_task_row_limit=per_task_row_limit))
        return tasks


def _window_reader(ingest: Ingest, epoch: int, w: Window, start: int, rank: int, world: int):
    def read() -> Iterable[pa.Table]:
        ds = None if ingest.materialized else Dataset(open_store(ingest.uri), ingest.manifest)
        rows = ingest.order.rank_rows(epoch, w, rank, world, start)
        shards, rows = needed_shards(tuple(ingest.order.shard_rows[s] for s in w.shards), rows)
        table = pa.concat_tables([ingest.shard_table(w.shards[k], ds) for k in shards])
        if ingest.trace_dir:
            _trace_read(ingest.trace_dir, epoch, w, [w.shards[k] for k in shards], rank, world, start, len(rows))
        yield table.take(pa.array(rows))
    return read


def needed_shards(window_rows: tuple[int, ...], rows: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The window's shards (indices into it) that hold any of ``rows`` (rows of the window's shards
    concatenated), and the rows renumbered into just those shards concatenated: the others are not read."""
    firsts = np.concatenate([[0], np.cumsum(window_rows)[:-1]]).astype(np.int64)
    shard_of = np.searchsorted(firsts, rows, side="right") - 1
    keep = np.unique(shard_of)
    kept_firsts = np.zeros(len(window_rows), dtype=np.int64)
    kept_firsts[keep] = np.concatenate([[0], np.cumsum(np.asarray(window_rows)[keep])[:-1]])
    return keep.tolist(), (rows - firsts[shard_of] + kept_firsts[shard_of]).astype(np.int64)


def _trace_read(trace_dir: str, epoch: int, w: Window, shards: list[int], rank: int, world: int, start: int,
                kept: int) -> None:
    """One line per window read, naming the shards read (an audit of what a rank read: resume must not read
    skipped windows, a rank reads only the shards that hold its rows)."""
    os.makedirs(trace_dir, exist_ok=True)
    line = json.dumps({"epoch": epoch, "window": w.index, "shards": shards, "rank": rank, "world": world,
                       "start": start, "rows_kept": kept, "pid": os.getpid()})
    with open(os.path.join(trace_dir, f"rank{rank}.jsonl"), "a") as f:  # one short O_APPEND write
        f.write(line + "\n")
