"""The dataset manifest: what a token dataset is, and the digest of every shard."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "_progress.json"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset location (a key range name for LMDB)
    rows: int
    bytes: int
    sha256: str
    first_sample_id: int
    last_sample_id: int


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What every shard of a dataset shares; fixed before the first shard is written."""

    grid: tuple[int, int]
    codebook_size: int
    class_names: tuple[str, ...]
    tokenizer: str  # tokenizer fingerprint ("synthetic:..." for generated data)
    shard_rows: int
    extra: dict = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        h, w = self.grid
        if h <= 0 or w <= 0:
            raise ValueError(f"grid must be positive, got {self.grid}")
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size {self.codebook_size} must be in [2, 65536] to fit uint16 ids")
        if self.shard_rows <= 0:
            raise ValueError(f"shard_rows must be positive, got {self.shard_rows}")
        if not self.class_names:
            raise ValueError("class_names must name at least one class")

    @property
    def tokens_per_sample(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_json(self) -> dict:
        return {"grid": list(self.grid), "codebook_size": self.codebook_size,
                "class_names": list(self.class_names), "tokenizer": self.tokenizer,
                "shard_rows": self.shard_rows, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> "DatasetMeta":
        return cls(grid=tuple(d["grid"]), codebook_size=int(d["codebook_size"]),
                   class_names=tuple(d["class_names"]), tokenizer=d["tokenizer"],
                   shard_rows=int(d["shard_rows"]), extra=dict(d.get("extra", {})))


@dataclasses.dataclass(frozen=True)
class Manifest:
    meta: DatasetMeta
    num_samples: int
    shards: tuple[ShardInfo, ...]
    store_bytes: int = 0  # bytes the whole dataset occupies on its store, manifest included
    files: dict = dataclasses.field(default_factory=dict, hash=False)  # side files: name -> {bytes, sha256}

    @property
    def shard_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def file_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": "tokray.tokens", **self.meta.to_json(),
                "num_samples": self.num_samples, "shard_bytes": self.shard_bytes,
                "store_bytes": self.store_bytes, "files": self.files,
                "shards": [dataclasses.asdict(s) for s in self.shards]}

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> "Manifest":
        try:
            d: dict[str, Any] = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: manifest.json is not valid JSON ({e}); "
                             f"check it with `python jobs/dataset.py verify {where}`") from e
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: manifest format_version {version!r} is not supported; this tokray "
                             f"reads format_version {FORMAT_VERSION}. Re-create the dataset with this "
                             "version or upgrade tokray.")
        try:
            shards = tuple(ShardInfo(**s) for s in d["shards"])
            manifest = cls(meta=DatasetMeta.from_json(d), num_samples=int(d["num_samples"]),
                           shards=shards, store_bytes=int(d.get("store_bytes", 0)), files=dict(d.get("files", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: manifest.json is missing or has a malformed field ({e!r})") from e
        if sum(s.rows for s in shards) != manifest.num_samples:
            raise ValueError(f"{where}: manifest num_samples {manifest.num_samples} != sum of shard rows")
        return manifest

    def with_store_bytes(self, other_bytes: int) -> "Manifest":
        """Fix point: store bytes = shard bytes + other files + the manifest's own length."""
        m = dataclasses.replace(self, store_bytes=0)
        for _ in range(4):
            total = self.shard_bytes + self.file_bytes + other_bytes + len(m.dumps())
            if total == m.store_bytes:
                return m
            m = dataclasses.replace(m, store_bytes=total)
        return m
