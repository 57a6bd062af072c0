"""Token records: ``ids`` a fixed-size list of uint16 per sample (h*w ids, row-major).

Parquet dictionary-encodes the ids and bit-packs the dictionary indices (ceil(log2(#distinct))
bits per token), then zstd compresses the pages, so a shard costs about the order-0 entropy of
its ids. In LMDB a value is int32 label + the uint16 ids (little-endian).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import pyarrow as pa

from tokray.storage.formats import (LABEL, SAMPLE_ID, RecordFormat, check_common_meta, label_columns,
                                    label_fields, parquet_bytes)

IDS = "ids"


@dataclasses.dataclass(frozen=True)
class TokenMeta:
    """What every shard of a token dataset shares; fixed before the first shard is written."""

    grid: tuple[int, int]
    codebook_size: int
    class_names: tuple[str, ...]
    tokenizer: str  # tokenizer fingerprint ("synthetic:..." for generated data)
    shard_rows: int
    extra: dict = dataclasses.field(default_factory=dict, hash=False)

    kind: ClassVar[str] = "tokens"

    def __post_init__(self):
        h, w = self.grid
        if h <= 0 or w <= 0:
            raise ValueError(f"grid must be positive, got {self.grid}")
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size {self.codebook_size} must be in [2, 65536] to fit uint16 ids")
        check_common_meta(self)

    @property
    def tokens_per_sample(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_json(self) -> dict:
        return {"grid": list(self.grid), "codebook_size": self.codebook_size,
                "class_names": list(self.class_names), "tokenizer": self.tokenizer,
                "shard_rows": self.shard_rows, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "TokenMeta":
        return cls(grid=tuple(d["grid"]), codebook_size=int(d["codebook_size"]),
                   class_names=tuple(d["class_names"]), tokenizer=d["tokenizer"],
                   shard_rows=int(d["shard_rows"]), extra=dict(d.get("extra", {})))


def table_ids(table: pa.Table) -> np.ndarray:
    """ids as a zero-copy uint16 array [N, h*w]."""
    col = table.column(IDS).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


class TokenFormat(RecordFormat):
    kind = "tokens"
    meta_type = TokenMeta
    payload_key = IDS

    def schema(self, meta: TokenMeta) -> pa.Schema:
        return _schema(meta.tokens_per_sample)

    def records_to_table(self, meta: TokenMeta | None, ids, labels, sample_ids) -> pa.Table:
        """ids [N, h, w] or [N, h*w] (uint16), labels [N], sample ids [N]."""
        n = len(ids)
        flat = np.ascontiguousarray(ids, dtype=np.uint16).reshape(n, -1)
        t = flat.shape[1]
        ids_arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.uint16()), t)
        return pa.Table.from_arrays([ids_arr, *label_columns(labels, sample_ids)], schema=_schema(t))

    def encode_shard(self, table: pa.Table) -> bytes:
        # the leaf path, not "ids": only then are the ids dictionary-coded and bit-packed
        return parquet_bytes(table, [f"{IDS}.list.element", LABEL])

    def check_table(self, meta: TokenMeta, table: pa.Table) -> None:
        ids = table_ids(table)
        if ids.shape[1] != meta.tokens_per_sample:
            raise ValueError(f"records hold {ids.shape[1]} ids per sample; the dataset's {meta.grid[0]}x{meta.grid[1]} "
                             f"grid needs {meta.tokens_per_sample}")
        top = int(ids.max()) if ids.size else 0
        if top >= meta.codebook_size:
            raise ValueError(f"token id {top} is outside the codebook (size {meta.codebook_size})")

    def to_numpy(self, meta: TokenMeta, table: pa.Table) -> dict:
        return {IDS: table_ids(table).reshape(-1, *meta.grid), LABEL: table.column(LABEL).to_numpy(),
                SAMPLE_ID: table.column(SAMPLE_ID).to_numpy()}

    def payloads(self, table: pa.Table) -> list[bytes]:
        ids = table_ids(table).astype("<u2", copy=False)
        return [row.tobytes() for row in ids]

    def table_from_payloads(self, meta: TokenMeta, payloads, labels, sample_ids) -> pa.Table:
        ids = np.frombuffer(b"".join(payloads), dtype="<u2").reshape(len(payloads), meta.tokens_per_sample)
        return self.records_to_table(meta, ids, labels, sample_ids)

    def payloads_to_numpy(self, meta: TokenMeta, payloads) -> np.ndarray:
        flat = payloads if isinstance(payloads, np.ndarray) else np.frombuffer(b"".join(payloads), dtype=np.uint8)
        return np.ascontiguousarray(flat).view("<u2").reshape(-1, *meta.grid)

    def inmemory_bytes(self, meta: TokenMeta, rows: int, shard_bytes: int) -> int:
        return rows * (2 * meta.tokens_per_sample + 12)

    def summary(self, meta: TokenMeta) -> dict:
        return {"grid": f"{meta.grid[0]}x{meta.grid[1]}", "codebook_size": meta.codebook_size,
                "tokenizer": meta.tokenizer}


def _schema(tokens_per_sample: int) -> pa.Schema:
    return pa.schema([pa.field(IDS, pa.list_(pa.field("item", pa.uint16(), nullable=False), tokens_per_sample),
                               nullable=False), *label_fields()])


FORMAT = TokenFormat()
