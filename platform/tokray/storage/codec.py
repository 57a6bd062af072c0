"""Shard codec: token records <-> Parquet bytes.

ids are a non-nullable fixed-size list of uint16 per sample. Parquet dictionary-encodes the
leaf values and bit-packs the dictionary indices (ceil(log2(#distinct)) bits per token), then
zstd compresses the pages, so a shard costs about the order-0 entropy of its ids.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IDS, LABEL, SAMPLE_ID = "ids", "label", "sample_id"


def schema(tokens_per_sample: int) -> pa.Schema:
    return pa.schema([
        pa.field(IDS, pa.list_(pa.field("item", pa.uint16(), nullable=False), tokens_per_sample), nullable=False),
        pa.field(LABEL, pa.int32(), nullable=False),
        pa.field(SAMPLE_ID, pa.int64(), nullable=False),
    ])


def records_to_table(ids: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray) -> pa.Table:
    """Build a table from ids [N, h, w] or [N, h*w] (uint16), labels [N], sample ids [N]."""
    n = len(ids)
    flat = np.ascontiguousarray(ids, dtype=np.uint16).reshape(n, -1)
    t = flat.shape[1]
    ids_arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.uint16()), t)
    return pa.Table.from_arrays(
        [ids_arr, pa.array(np.asarray(labels, dtype=np.int32)), pa.array(np.asarray(sample_ids, dtype=np.int64))],
        schema=schema(t))


def encode_shard(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(
        table, sink, compression="zstd", compression_level=3,
        # the leaf path, not "ids": only then are the ids dictionary-coded and bit-packed
        use_dictionary=[f"{IDS}.list.element", LABEL], column_encoding={SAMPLE_ID: "DELTA_BINARY_PACKED"},
        write_statistics=False, data_page_size=1 << 20)
    return sink.getvalue()


def decode_shard(data: bytes, columns: list[str] | None = None) -> pa.Table:
    # single-threaded: shards are small, and pyarrow pool threads alive at exit can abort the process
    return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)


def table_ids(table: pa.Table) -> np.ndarray:
    """ids as a zero-copy uint16 array [N, h*w]."""
    col = table.column(IDS).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    return {IDS: table_ids(table),
            LABEL: table.column(LABEL).to_numpy(),
            SAMPLE_ID: table.column(SAMPLE_ID).to_numpy()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
