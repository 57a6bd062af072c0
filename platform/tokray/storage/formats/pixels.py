"""Pixel records: each image as a small baseline JPEG (``jpeg`` binary), the pixel baselines' format.

Standard Huffman tables (no per-image ``optimize``) make every image's ~600 header bytes identical,
and the shard's zstd stores them about once; on CIFAR-10 that is 3-10x fewer bytes than the loose
files (32 px q75: about 300 B per image instead of 887; 16 px q50: about 67 B). In LMDB a value
is int32 label + the JPEG bytes.
"""

from __future__ import annotations

import dataclasses
import io
from typing import ClassVar, Iterable

import numpy as np
import pyarrow as pa

from tokray.storage.formats import (LABEL, SAMPLE_ID, RecordFormat, check_common_meta, label_columns,
                                    label_fields, parquet_bytes)

JPEG = "jpeg"


@dataclasses.dataclass(frozen=True)
class PixelMeta:
    """What every shard of a pixel dataset shares: image side, JPEG quality, classes."""

    size: int
    quality: int
    class_names: tuple[str, ...]
    shard_rows: int
    extra: dict = dataclasses.field(default_factory=dict, hash=False)  # split, source, images, ...

    kind: ClassVar[str] = "pixels"

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"size must be a positive number of pixels (e.g. 32, 16, 8), got {self.size!r}")
        if not isinstance(self.quality, (int, np.integer)) or not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be a JPEG quality in 1..100 (e.g. 75), got {self.quality!r}")
        check_common_meta(self)

    def to_json(self) -> dict:
        return {"encoding": "jpeg", "size": int(self.size), "quality": int(self.quality),
                "class_names": list(self.class_names), "shard_rows": self.shard_rows, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "PixelMeta":
        return cls(size=int(d["size"]), quality=int(d["quality"]), class_names=tuple(d["class_names"]),
                   shard_rows=int(d["shard_rows"]), extra=dict(d.get("extra", {})))


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> baseline JPEG (4:2:0, standard tables: the header is the same for every
    image of one size and quality, so the shard's zstd keeps it about once)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=int(quality), optimize=False)
    return buf.getvalue()


def decode_jpegs(blobs: Iterable[bytes], size: int) -> np.ndarray:
    """JPEG bytes -> uint8 [B, size, size, 3] (PIL, RGB). A blob of another size is an error."""
    from PIL import Image

    blobs = list(blobs)
    out = np.empty((len(blobs), size, size, 3), np.uint8)
    for j, b in enumerate(blobs):
        with Image.open(io.BytesIO(b)) as im:
            if im.size != (size, size):
                raise ValueError(f"a stored image is {im.size[0]}x{im.size[1]}, the dataset says {size}x{size}")
            out[j] = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return out


class PixelFormat(RecordFormat):
    kind = "pixels"
    meta_type = PixelMeta
    payload_key = "pixels"

    def schema(self, meta=None) -> pa.Schema:
        return pa.schema([pa.field(JPEG, pa.binary(), nullable=False), *label_fields()])

    def records_to_table(self, meta, jpegs, labels, sample_ids) -> pa.Table:
        return pa.Table.from_arrays([pa.array(list(jpegs), type=pa.binary()), *label_columns(labels, sample_ids)],
                                    schema=self.schema())

    def encode_shard(self, table: pa.Table) -> bytes:
        return parquet_bytes(table, [LABEL])

    def to_numpy(self, meta: PixelMeta, table: pa.Table) -> dict:
        """{pixels uint8 [B, size, size, 3], label, sample_id}: the JPEGs decoded."""
        return {"pixels": decode_jpegs(table.column(JPEG).to_pylist(), meta.size),
                LABEL: table.column(LABEL).to_numpy(), SAMPLE_ID: table.column(SAMPLE_ID).to_numpy()}

    def payloads(self, table: pa.Table) -> list[bytes]:
        return table.column(JPEG).to_pylist()

    def table_from_payloads(self, meta, payloads, labels, sample_ids) -> pa.Table:
        return self.records_to_table(meta, payloads, labels, sample_ids)

    def payloads_to_numpy(self, meta: PixelMeta, payloads) -> np.ndarray:
        blobs = [bytes(p) for p in payloads]  # (rows of a uint8 array when every JPEG has one size)
        return decode_jpegs(blobs, meta.size)

    def inmemory_bytes(self, meta, rows: int, shard_bytes: int) -> int:
        # the loose JPEGs are a few times the shard bytes (their headers are zstd-shared on the store)
        return 4 * shard_bytes + 12 * rows

    def summary(self, meta: PixelMeta) -> dict:
        return {"image_size": f"{meta.size}x{meta.size}", "jpeg_quality": meta.quality}


FORMAT = PixelFormat()
