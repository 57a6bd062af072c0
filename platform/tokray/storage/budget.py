"""Storage budgets: materialize a class-stratified, seeded subset that fits a byte or sample budget.

The same seed gives the same per-class order, so a smaller budget's subset is contained in a
larger one's (nested budgets make storage-vs-accuracy sweeps comparable). Bytes are those of the
codec the subset is written with, its fitted model included (a context-coded subset fits its own).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np

from tokray.storage.dataset import (Dataset, DatasetWriter, carry_side_files, manifest_digest, open_dataset,
                                    refuse_same_location, stored_meta)
from tokray.storage.manifest import Manifest
from tokray.storage.memory import MemoryStore
from tokray.storage.uri import parse_uri

log = logging.getLogger(__name__)

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BUDGET_FORMS = "a percent of the bytes (10%), bytes with a unit (300KB, 0.3GB, 2MiB) or a sample count (5000samples)"


@dataclasses.dataclass(frozen=True)
class Budget:
    kind: str  # "percent" | "bytes" | "samples"
    value: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        t = str(text).strip().lower().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)(%|samples?|[kmgt]?i?b)", t)
        if not m:
            raise ValueError(f"budget {text!r} is not understood; give {BUDGET_FORMS}")
        num, unit = float(m.group(1)), m.group(2)
        if unit == "%":
            if not 0 < num <= 100:
                raise ValueError(f"budget {text!r}: a percent must be in (0, 100]")
            return cls("percent", num)
        if unit.startswith("sample"):
            if num < 1 or num != int(num):
                raise ValueError(f"budget {text!r}: a sample count must be a positive integer")
            return cls("samples", int(num))
        if int(num * _UNITS[unit]) < 1:
            raise ValueError(f"budget {text!r}: a byte budget must be at least 1 byte")
        return cls("bytes", int(num * _UNITS[unit]))

    def __str__(self):
        return {"percent": f"{self.value:g}%", "samples": f"{int(self.value)}samples"}.get(
            self.kind, f"{int(self.value)}B")


def stratified_order(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """Per class, the positions of its samples in a seeded random order."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def allocate(class_sizes: np.ndarray, n: int) -> np.ndarray:
    """Split n over classes in proportion to their sizes (largest remainder): each within ±1."""
    share = class_sizes * (n / class_sizes.sum())
    counts = np.floor(share).astype(int)
    for c in np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]:
        counts[c] += 1
    return np.minimum(counts, class_sizes)


def _selection(order: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate([o[:k] for o, k in zip(order, counts)]))


def _positions(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    labels = ds.labels()
    starts = np.cumsum([0] + [s.rows for s in ds.manifest.shards])
    return labels, starts


def _iter_selected(ds: Dataset, selected: np.ndarray, starts: np.ndarray):
    """The selected rows (positions in the dataset), shard by shard, as tables of the dataset's format."""
    for i in range(len(ds.manifest.shards)):
        rows = selected[(selected >= starts[i]) & (selected < starts[i + 1])] - starts[i]
        if len(rows):
            yield ds.read_shard(i).take(rows)


def _write_selection(writer: DatasetWriter, ds: Dataset, selected: np.ndarray, starts: np.ndarray) -> Manifest:
    """The dataset's side files and selected rows into ``writer``; the manifest ``commit`` would write."""
    carry_side_files(ds, writer)
    for part in _iter_selected(ds, selected, starts):
        writer.write_table(part)
    return writer.finish()


def _estimated_bytes(ds: Dataset, selected: np.ndarray, starts: np.ndarray, meta) -> int:
    """Bytes the subset would take on a file store: the real writer, into memory."""
    return _write_selection(DatasetWriter("<memory>", meta, store=MemoryStore()), ds, selected, starts).store_bytes


def make_subset(src, dst, budget: Budget, seed: int = 0, overwrite: bool = False, codec: str | None = None) -> Manifest:
    """Write the subset of ``src`` that fits ``budget`` to ``dst``; its store bytes never exceed it. ``codec``:
    of the subset's shards (tokens: context | parquet; None: the default for new datasets)."""
    ds = open_dataset(src)
    refuse_same_location(ds, dst)
    dst_scheme = parse_uri(dst).scheme
    labels, starts = _positions(ds)
    num_classes = len(ds.meta.class_names)
    order = stratified_order(labels, num_classes, seed)
    sizes = np.array([len(o) for o in order])
    total = len(labels)

    if budget.kind == "samples":
        if budget.value > total:
            raise ValueError(f"budget {budget} asks for more samples than {src} has ({total})")
        limit, n = None, int(budget.value)
    else:
        limit = int(ds.manifest.store_bytes * budget.value / 100) if budget.kind == "percent" else int(budget.value)
        n = min(total, int(limit / (ds.manifest.store_bytes / total)))

    def meta_for(count):
        extra = {**ds.meta.extra, "subset": {"budget": str(budget), "budget_bytes": limit, "seed": seed,
                                             "samples": count, "source_samples": total,
                                             "source_store_bytes": ds.manifest.store_bytes}}
        # estimated (in memory) with the codec the destination will hold
        return stored_meta(ds.format.with_codec(dataclasses.replace(ds.meta, extra=extra), codec), dst_scheme)

    if limit is not None:
        n = _fit_count(ds, order, sizes, starts, n, limit, meta_for)
    for attempt in range(8):
        selected = _selection(order, allocate(sizes, n))
        writer = DatasetWriter(dst, meta_for(n), overwrite=overwrite or attempt > 0, source=manifest_digest(ds))
        manifest = _write_selection(writer, ds, selected, starts)
        if limit is None or manifest.store_bytes <= limit:
            manifest = writer.commit(manifest)
            if limit is None or manifest.store_bytes <= limit:
                return manifest
        writer.discard()  # over budget on this store (e.g. LMDB pages): shrink and rewrite
        n = max(1, int(n * min(0.99, limit / manifest.store_bytes)))
    raise ValueError(f"could not fit {src} into budget {budget} on {dst}; try a larger budget")


def _fit_count(ds, order, sizes, starts, n, limit, meta_for) -> int:
    """Largest sample count whose encoded subset fits ``limit`` (secant steps, then bisection)."""
    lo, hi = 0, int(sizes.sum()) + 1  # lo fits, hi does not
    for _ in range(12):
        n = min(max(n, lo + 1), hi - 1)
        if hi - lo <= 1 or n <= 0:
            break
        got = _estimated_bytes(ds, _selection(order, allocate(sizes, n)), starts, meta_for(n))
        if got <= limit:
            lo = n
            n = int(n * limit / got) if got else hi - 1
        else:
            hi = n
            n = int(n * limit / got)
        if hi - lo <= max(1, lo // 1000):  # within 0.1% of the best count
            break
        if n <= lo or n >= hi:
            n = (lo + hi) // 2
    if lo == 0:
        raise ValueError(f"budget of {limit} bytes is too small for even one sample of {ds.uri} "
                         f"(about {ds.manifest.store_bytes // max(1, len(ds))} B/sample plus the manifest)")
    return lo
