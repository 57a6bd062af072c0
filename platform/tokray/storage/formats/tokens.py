"""Token records: ``ids`` a fixed-size list of uint16 per sample (h*w ids, row-major).

Two shard codecs (``TokenMeta.codec``); a shard decodes to the same Arrow table with either.

- ``context`` (manifest format_version 2; the default for new datasets): the ids coded with rANS
  under a ContextModel (``tokray.storage.entropy``: each token predicted from its left and upper
  neighbours), which the writer fits to the dataset's first ``FIT_TOKENS`` ids and stores as the
  side file ``MODEL_FILE`` (digested in the manifest, counted in store_bytes). Shard layout
  (little-endian): ``TKC\\x01``, rows u32, grid h and w u16 (so an edited manifest's grid is
  reported as such), the byte lengths of the label and sample-id columns (u32 each), those
  columns (LZMA; sample ids as deltas or, when ascending, as a bitmap of the
  id range), then the coded ids (``entropy.encode_ids``: model fingerprint and a CRC32 of the ids).
  About 10% below the order-0 entropy of the ids on CIFAR-10 tokens.
- ``parquet`` (format_version 1, every dataset written before format 2): zstd Parquet. The ids are
  dictionary-coded and bit-packed (ceil(log2(#distinct)) bits per token), then zstd: about the
  order-0 entropy of the ids, the bound for coding each token on its own.

In LMDB a value is int32 label + the uint16 ids (little-endian), whatever the codec: random access
by sample id needs each record on its own, so an LMDB dataset's manifest is format_version 1.
"""

from __future__ import annotations

import dataclasses
import lzma
import struct
from typing import Callable, ClassVar

import numpy as np
import pyarrow as pa

from tokray.storage.entropy import ContextModel, decode_ids, encode_ids, fit_context_model, order0_bits
from tokray.storage.formats import (LABEL, PARQUET, SAMPLE_ID, RecordFormat, check_common_meta, label_columns,
                                    label_fields, parquet_bytes)

IDS = "ids"
CONTEXT = "context"
CODECS = (CONTEXT, PARQUET)
DEFAULT_CODEC = CONTEXT
MODEL_FILE = "context-model.tkm"
# ids the model is fitted on: the first ~4 M of a dataset (all of CIFAR-10; the first shard of a
# 32x32 set). The writer holds them in memory (2 bytes each) until the model is stored.
FIT_TOKENS = 1 << 22


@dataclasses.dataclass(frozen=True)
class TokenMeta:
    """What every shard of a token dataset shares; fixed before the first shard is written."""

    grid: tuple[int, int]
    codebook_size: int
    class_names: tuple[str, ...]
    tokenizer: str  # tokenizer fingerprint ("synthetic:..." for generated data)
    shard_rows: int
    extra: dict = dataclasses.field(default_factory=dict, hash=False)
    codec: str = DEFAULT_CODEC  # how shards store the records: context | parquet

    kind: ClassVar[str] = "tokens"

    def __post_init__(self):
        h, w = self.grid
        if h <= 0 or w <= 0:
            raise ValueError(f"grid must be positive, got {self.grid}")
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size {self.codebook_size} must be in [2, 65536] to fit uint16 ids")
        if self.codec not in CODECS:
            raise ValueError(f"codec {self.codec!r} is not a token codec; choose {' or '.join(CODECS)}")
        if self.codec == CONTEXT and max(h, w) > 65535:  # a coded shard's header holds h and w as u16
            raise ValueError(f"grid {self.grid} is too large for codec context (sides up to 65535); use codec parquet")
        check_common_meta(self)

    @property
    def tokens_per_sample(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_json(self) -> dict:
        # format_version 1 manifests have no codec field: a parquet dataset is written as before
        codec = {} if self.codec == PARQUET else {"codec": self.codec}
        return {"grid": list(self.grid), "codebook_size": self.codebook_size,
                "class_names": list(self.class_names), "tokenizer": self.tokenizer,
                "shard_rows": self.shard_rows, **codec, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "TokenMeta":
        return cls(grid=tuple(d["grid"]), codebook_size=int(d["codebook_size"]),
                   class_names=tuple(d["class_names"]), tokenizer=d["tokenizer"],
                   shard_rows=int(d["shard_rows"]), extra=dict(d.get("extra", {})), codec=d.get("codec", PARQUET))


def table_ids(table: pa.Table) -> np.ndarray:
    """ids as a zero-copy uint16 array [N, h*w]."""
    col = table.column(IDS).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


class TokenFormat(RecordFormat):
    """Token records in Parquet shards (codec ``parquet``); ``bind`` gives the context-coded ones."""

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

    def unit_stats(self, meta: TokenMeta, tables: list[pa.Table]) -> tuple[int, float]:
        ids = np.concatenate([table_ids(t).ravel() for t in tables]) if tables else np.zeros(0, np.uint16)
        return meta.tokens_per_sample, order0_bits(ids, meta.codebook_size)

    # -- codecs --------------------------------------------------------------------------------
    def codec(self, meta: TokenMeta) -> str:
        return meta.codec

    def format_version(self, meta: TokenMeta) -> int:
        return 2 if meta.codec == CONTEXT else 1

    def with_codec(self, meta: TokenMeta, codec: str | None) -> TokenMeta:
        codec = DEFAULT_CODEC if codec is None else codec
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r} is not a token codec; choose {' or '.join(CODECS)}")
        return dataclasses.replace(meta, codec=codec)

    def codec_files(self, meta: TokenMeta) -> tuple[str, ...]:
        return (MODEL_FILE,) if meta.codec == CONTEXT else ()

    def fit_rows(self, meta: TokenMeta) -> int:
        return -(-FIT_TOKENS // meta.tokens_per_sample) if meta.codec == CONTEXT else 0

    def fit_codec(self, meta: TokenMeta, tables: list[pa.Table]) -> dict[str, bytes]:
        if meta.codec != CONTEXT:
            return {}
        ids = np.concatenate([table_ids(t) for t in tables])[:self.fit_rows(meta)]
        return {MODEL_FILE: fit_context_model(ids.reshape(-1, *meta.grid), meta.codebook_size).to_bytes()}

    def bind(self, meta: TokenMeta, read_file) -> "TokenFormat":
        return ContextTokenFormat(meta, lambda: read_file(MODEL_FILE)) if meta.codec == CONTEXT else self


class ContextTokenFormat(TokenFormat):
    """The token format of one context-coded dataset: shards coded under its model, read on first use
    (``load`` returns the verified bytes of ``MODEL_FILE``)."""

    def __init__(self, meta: TokenMeta, load: Callable[[], bytes] | None = None, model: ContextModel | None = None):
        self.meta, self._load, self._model = meta, load, model

    @property
    def model(self) -> ContextModel:
        # (its digest is the manifest's; a manifest edited to another codebook size is caught by check_table)
        if self._model is None:
            self._model = ContextModel.from_bytes(self._load())
        return self._model

    def __reduce__(self):  # crosses to Ray tasks as the model's bytes (KBs), not the loader's store
        return ContextTokenFormat, (self.meta, None, self.model)

    def bind(self, meta, read_file):
        return self if meta == self.meta else TokenFormat.bind(self, meta, read_file)

    def encode_shard(self, table: pa.Table) -> bytes:
        ids = table_ids(table)
        labels = _pack_column(table.column(LABEL).to_numpy(), sample_ids=False)
        sids = _pack_column(table.column(SAMPLE_ID).to_numpy(), sample_ids=True)
        h, w = self.meta.grid
        coded = encode_ids(ids.reshape(-1, h, w), self.model)
        return _SHARD_HEAD.pack(_SHARD_MAGIC, len(ids), h, w, len(labels), len(sids)) + labels + sids + coded

    def decode_shard(self, data: bytes, columns: list[str] | None = None) -> pa.Table:
        want = list(columns) if columns else [IDS, LABEL, SAMPLE_ID]
        unknown = sorted(set(want) - {IDS, LABEL, SAMPLE_ID})
        if unknown:
            raise ValueError(f"token shards have no column {unknown[0]!r}; they have {IDS}, {LABEL}, {SAMPLE_ID}")
        mv = memoryview(data).cast("B")
        if len(mv) < _SHARD_HEAD.size or bytes(mv[:4]) != _SHARD_MAGIC:
            raise ValueError("not a context-coded token shard (bad magic)")
        _, n, h, w, nl, ns = _SHARD_HEAD.unpack_from(mv)
        at = _SHARD_HEAD.size
        if len(mv) < at + nl + ns:
            raise ValueError("context-coded token shard is truncated")
        cols = {LABEL: lambda: pa.array(_unpack_column(mv[at:at + nl], n).astype(np.int32)),
                SAMPLE_ID: lambda: pa.array(_unpack_column(mv[at + nl:at + nl + ns], n)),
                IDS: lambda: pa.FixedSizeListArray.from_arrays(
                    pa.array(decode_ids(mv[at + nl + ns:], self.model, n, (h, w)).reshape(-1)), h * w)}
        schema = _schema(h * w)  # the shard's own grid: check_table compares it with the manifest's
        return pa.Table.from_arrays([cols[c]() for c in want], schema=pa.schema([schema.field(c) for c in want]))


def _schema(tokens_per_sample: int) -> pa.Schema:
    return pa.schema([pa.field(IDS, pa.list_(pa.field("item", pa.uint16(), nullable=False), tokens_per_sample),
                               nullable=False), *label_fields()])


# -- the label and sample-id columns of a context-coded shard ---------------------------------------
_SHARD_MAGIC = b"TKC\x01"
_SHARD_HEAD = struct.Struct("<4sIHHII")
_COLUMN_HEAD = struct.Struct("<BBq")  # method, byte width, first value
_VALUES, _DELTAS, _BITMAP = 0, 1, 2
# small alphabets, no byte structure: literals coded without context bits; a window the size of a column
_COLUMN_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 16,
                 "lc": 0, "lp": 0, "pb": 0}]


def _zigzag(v: np.ndarray) -> np.ndarray:
    return ((v << 1) ^ (v >> 63)).view(np.uint64)


def _narrow(u: np.ndarray) -> tuple[int, bytes]:
    """The fewest bytes per value (1, 2, 4, 8) that hold ``u`` (uint64), and the values at that width."""
    top = int(u.max()) if u.size else 0
    width = next(b for b in (1, 2, 4, 8) if top < 1 << (8 * b))
    return width, u.astype(f"<u{width}").tobytes()


def _pack_column(values: np.ndarray, sample_ids: bool) -> bytes:
    """An integer column, LZMA-compressed: labels as values; sample ids as deltas from the first, or, when
    they ascend, as the bitmap of which ids of their range are present (a split's ids: ~0.7 bits each)."""
    v = np.asarray(values, dtype=np.int64)
    if not sample_ids or not v.size:
        width, raw = _narrow(_zigzag(v))
        return _COLUMN_HEAD.pack(_VALUES, width, 0) + _lzma(raw)
    d = np.diff(v)  # wraps like the decoder's cumsum: any int64 ids
    width, raw = _narrow(_zigzag(d))
    options = [_COLUMN_HEAD.pack(_DELTAS, width, int(v[0])) + _lzma(raw)]
    if (d > 0).all() and int(v[-1]) - int(v[0]) < 64 * v.size:
        present = np.zeros(int(v[-1] - v[0]) + 1, dtype=bool)
        present[v - v[0]] = True
        options.append(_COLUMN_HEAD.pack(_BITMAP, 1, int(v[0])) + _lzma(np.packbits(present).tobytes()))
    return min(options, key=len)


def _unpack_column(block: memoryview, n: int) -> np.ndarray:
    """Inverse of _pack_column: the n int64 values; malformed bytes raise ValueError."""
    if len(block) < _COLUMN_HEAD.size:
        raise ValueError("context-coded token shard: truncated column")
    method, width, first = _COLUMN_HEAD.unpack_from(block)
    if width not in (1, 2, 4, 8) or method not in (_VALUES, _DELTAS, _BITMAP):
        raise ValueError("context-coded token shard: malformed column")
    if n == 0 and method != _VALUES:
        raise ValueError("context-coded token shard: malformed column")
    body = block[_COLUMN_HEAD.size:]
    if method == _BITMAP:
        raw = _unlzma(body, 8 * n + 1, exact=False)
        pos = np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8)))
        if pos.size != n:
            raise ValueError("context-coded token shard: sample-id bitmap does not match the row count")
        return pos.astype(np.int64) + first
    count = n if method == _VALUES else max(0, n - 1)
    u = np.frombuffer(_unlzma(body, count * width), f"<u{width}").astype(np.uint64)
    v = (u >> np.uint64(1)).view(np.int64) ^ -(u & np.uint64(1)).view(np.int64)
    if method == _VALUES:
        return v
    out = np.empty(n, dtype=np.int64)
    out[0] = first
    np.cumsum(v, out=out[1:])
    out[1:] += first
    return out


def _lzma(raw: bytes) -> bytes:
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_COLUMN_LZMA)


def _unlzma(data: memoryview, size: int, exact: bool = True) -> bytes:
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_COLUMN_LZMA).decompress(bytes(data),
                                                                                              max_length=size + 1)
    except lzma.LZMAError as e:
        raise ValueError(f"context-coded token shard: corrupt column ({e})") from None
    if len(out) > size or (exact and len(out) != size):
        raise ValueError("context-coded token shard: column does not match the row count")
    return out


FORMAT = TokenFormat()
