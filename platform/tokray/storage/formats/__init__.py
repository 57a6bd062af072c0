"""Record formats: what one kind of dataset stores per sample, as a plug-in to the one storage core.

A format knows its metadata type (the settings every shard of a dataset shares), its Arrow schema,
how a shard's table becomes bytes and back, and how one row becomes an LMDB value. The manifest,
writer, reader, Ray Datasource and budgets are written once against this interface
(``tokray.storage.dataset``); they never branch on the kind.

Every format's table has ``label`` (int32) and ``sample_id`` (int64, stable) beside its payload.
A new record kind is one module here plus one line in ``_FORMATS``.

Shard codecs: a kind may offer more than one way to turn a table into shard bytes (tokens:
``context`` and ``parquet``). A codec that needs a model fits it when the dataset is written, from
the first rows (``fit_rows``, ``fit_codec``), and stores it as side files (``codec_files``); the
reader and writer then code shards through ``bind``, the format bound to one dataset's files.
"""

from __future__ import annotations

import abc
import importlib
import io
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LABEL, SAMPLE_ID = "label", "sample_id"
PARQUET = "parquet"  # the codec every kind has: zstd Parquet shards (manifest format_version 1)

# manifest kind -> "module:attribute" of the format object (imported on first use)
_FORMATS = {"tokray.tokens": "tokray.storage.formats.tokens:FORMAT",
            "tokray.pixels": "tokray.storage.formats.pixels:FORMAT"}


class RecordFormat(abc.ABC):
    """One kind of record. Subclasses set ``kind`` ("tokens") and ``meta_type`` (a frozen dataclass)."""

    kind: ClassVar[str]
    meta_type: ClassVar[type]
    payload_key: ClassVar[str]  # the key of the sample itself in ``to_numpy`` batches

    @property
    def manifest_kind(self) -> str:
        return f"tokray.{self.kind}"

    @abc.abstractmethod
    def schema(self, meta) -> pa.Schema:
        ...

    @abc.abstractmethod
    def records_to_table(self, meta, *columns) -> pa.Table:
        """The format's columns (payload, labels, sample ids) as one table of its schema."""

    @abc.abstractmethod
    def encode_shard(self, table: pa.Table) -> bytes:
        ...

    def decode_shard(self, data: bytes, columns: list[str] | None = None) -> pa.Table:
        # single-threaded: shards are small, and pyarrow pool threads alive at exit can abort the process
        return pq.read_table(pa.BufferReader(data), columns=columns, use_threads=False)

    def check_table(self, meta, table: pa.Table) -> None:
        """Refuse records that do not fit ``meta`` before they are written (default: nothing to check)."""

    @abc.abstractmethod
    def to_numpy(self, meta, table: pa.Table) -> dict[str, Any]:
        """A table as a batch of numpy arrays (what ``Dataset.iter_batches`` yields)."""

    @abc.abstractmethod
    def payloads(self, table: pa.Table) -> list[bytes]:
        """Per row, the payload bytes an LMDB value holds after its int32 label."""

    @abc.abstractmethod
    def table_from_payloads(self, meta, payloads: list[bytes], labels: np.ndarray, sample_ids: np.ndarray) -> pa.Table:
        ...

    @abc.abstractmethod
    def payloads_to_numpy(self, meta, payloads):
        """LMDB payloads (a list of bytes, or a uint8 array [n, width] when all have one size) -> the batch's
        ``payload_key`` array."""

    @abc.abstractmethod
    def inmemory_bytes(self, meta, rows: int, shard_bytes: int) -> int:
        """Estimated bytes of ``rows`` decoded rows (Ray Data plans blocks with it)."""

    @abc.abstractmethod
    def summary(self, meta) -> dict:
        """The fields ``jobs/dataset.py info`` shows for this kind, in order."""

    def unit_stats(self, meta, tables: list[pa.Table]) -> tuple[int, float] | None:
        """(units per sample, order-0 entropy in bits per unit) of the tables' payload, for kinds made of
        symbols (tokens); None for the others."""
        return None

    # -- shard codecs (see the module docstring); the defaults: Parquet only, nothing to fit --------
    def codec(self, meta) -> str:
        return PARQUET

    def format_version(self, meta) -> int:
        """The manifest format_version of a dataset with this metadata."""
        return 1

    def with_codec(self, meta, codec: str | None):
        """``meta`` for a new dataset whose shards use ``codec`` (None: this kind's default)."""
        if codec not in (None, PARQUET):
            raise ValueError(f"codec {codec!r}: {self.kind} datasets have one codec, {PARQUET}")
        return meta

    def codec_files(self, meta) -> tuple[str, ...]:
        """Side files the writer fits for the codec (a copy or subset never carries the source's)."""
        return ()

    def fit_rows(self, meta) -> int:
        """Rows the writer holds back to fit the codec on before it writes the first shard."""
        return 0

    def fit_codec(self, meta, tables: list[pa.Table]) -> dict[str, bytes]:
        """The codec files (``codec_files``) fitted to the first rows of a dataset."""
        return {}

    def bind(self, meta, read_file) -> "RecordFormat":
        """The format that codes one dataset's shards; ``read_file(name)`` returns a verified side file."""
        return self


def parquet_bytes(table: pa.Table, dictionary_columns: list[str]) -> bytes:
    """zstd Parquet with the given columns dictionary-coded and delta-coded sample ids."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=3, use_dictionary=dictionary_columns,
                   column_encoding={SAMPLE_ID: "DELTA_BINARY_PACKED"}, write_statistics=False,
                   data_page_size=1 << 20)
    return sink.getvalue()


def label_columns(labels, sample_ids) -> list[pa.Array]:
    return [pa.array(np.asarray(labels, dtype=np.int32)), pa.array(np.asarray(sample_ids, dtype=np.int64))]


def label_fields() -> list[pa.Field]:
    return [pa.field(LABEL, pa.int32(), nullable=False), pa.field(SAMPLE_ID, pa.int64(), nullable=False)]


def check_common_meta(meta) -> None:
    """The settings every record kind has: rows per shard and the class names."""
    if meta.shard_rows <= 0:
        raise ValueError(f"shard_rows must be positive, got {meta.shard_rows}")
    if not meta.class_names:
        raise ValueError("class_names must name at least one class")


def known_kinds() -> list[str]:
    return sorted(_FORMATS)


def format_for_kind(manifest_kind: str, where: str = "") -> RecordFormat:
    """The format of a manifest's ``kind`` field; an unknown kind names the known ones."""
    if manifest_kind not in _FORMATS:
        raise ValueError(f"{where + ': ' if where else ''}manifest kind {manifest_kind!r} is not a record kind this "
                         f"tokray reads ({', '.join(known_kinds())}); upgrade tokray or re-create the dataset")
    module, attr = _FORMATS[manifest_kind].split(":")
    return getattr(importlib.import_module(module), attr)


def format_of(meta) -> RecordFormat:
    """The format whose metadata type ``meta`` is."""
    return format_for_kind(f"tokray.{meta.kind}")
