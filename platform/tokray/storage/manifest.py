"""The dataset manifest: what a dataset is (its record kind and settings) and the digest of every shard.

One manifest type for every record kind: ``kind`` (``tokray.tokens``, ``tokray.pixels``) picks the
format whose metadata type reads the settings (``tokray.storage.formats``).

``format_version`` 1: Parquet shards (every dataset before format 2, and LMDB). 2: the shards use a
codec with a fitted model (tokens: ``codec: context``, the model a side file in ``files``). The
version follows from the settings, so a tokray that reads only format 1 refuses format 2 by name.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tokray.storage.formats import format_for_kind, format_of

FORMAT_VERSIONS = (1, 2)
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


def check_shard_list(shards: tuple[ShardInfo, ...], where: str) -> None:
    """A manifest must name each shard once, inside the dataset, with ordered, disjoint sample-id ranges."""
    hint = "the manifest was edited or is damaged: re-create or re-copy the dataset"
    paths = [s.path for s in shards]
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"{where}: manifest lists shard {twice[0]!r} more than once; {hint}")
    for s in shards:
        parts = s.path.replace("\\", "/").split("/")
        if s.path.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"{where}: manifest shard path {s.path!r} leaves the dataset; {hint}")
        ascending = s.first_sample_id <= s.last_sample_id  # (writers may store any order within a shard)
        if s.rows < 0 or (s.rows and ascending and s.last_sample_id - s.first_sample_id + 1 < s.rows):
            raise ValueError(f"{where}: shard {s.path!r} claims {s.rows} rows in sample ids "
                             f"{s.first_sample_id}..{s.last_sample_id}; {hint}")
    for a, b in zip(shards, shards[1:]):
        if a.rows and b.rows and a.first_sample_id <= a.last_sample_id <= b.last_sample_id \
                and b.first_sample_id <= a.last_sample_id:
            raise ValueError(f"{where}: shards {a.path!r} and {b.path!r} overlap in sample ids "
                             f"({a.first_sample_id}..{a.last_sample_id} and {b.first_sample_id}..{b.last_sample_id}); "
                             f"{hint}")


def meta_to_json(meta) -> dict:
    return {"kind": format_of(meta).manifest_kind, **meta.to_json()}


def meta_from_json(d: dict, where: str = ""):
    """The metadata object of a manifest or progress record (dispatching on its ``kind``)."""
    return format_for_kind(d.get("kind", "tokray.tokens"), where).meta_type.from_json(d)


@dataclasses.dataclass(frozen=True)
class Manifest:
    meta: Any  # the record format's metadata (TokenMeta, PixelMeta)
    num_samples: int
    shards: tuple[ShardInfo, ...]
    store_bytes: int = 0  # bytes the whole dataset occupies on its store, manifest included
    files: dict = dataclasses.field(default_factory=dict, hash=False)  # side files: name -> {bytes, sha256}

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def format(self):
        return format_of(self.meta)

    @property
    def shard_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def file_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def to_json(self) -> dict:
        return {"format_version": self.format.format_version(self.meta), **meta_to_json(self.meta),
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
        if not isinstance(d, dict):
            raise ValueError(f"{where}: manifest.json holds a JSON {type(d).__name__}, not an object; it is not a "
                             "tokray manifest: re-create or re-copy the dataset")
        version = d.get("format_version")
        if version not in FORMAT_VERSIONS:
            raise ValueError(f"{where}: manifest format_version {version!r} is not supported; this tokray "
                             f"reads format_version {' and '.join(map(str, FORMAT_VERSIONS))}. Re-create the dataset "
                             "with this version or upgrade tokray.")
        try:
            shards = tuple(ShardInfo(**s) for s in d["shards"])
            manifest = cls(meta=meta_from_json(d, where), num_samples=int(d["num_samples"]),
                           shards=shards, store_bytes=int(d.get("store_bytes", 0)), files=dict(d.get("files", {})))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: manifest.json is missing or has a malformed field ({e!r})") from e
        fmt = manifest.format
        if version != fmt.format_version(manifest.meta):
            raise ValueError(f"{where}: manifest format_version {version} does not match its codec "
                             f"{fmt.codec(manifest.meta)!r} (format_version {fmt.format_version(manifest.meta)}); "
                             "the manifest was edited or is damaged: re-create or re-copy the dataset")
        missing = [f for f in fmt.codec_files(manifest.meta) if f not in manifest.files]
        if missing:
            raise ValueError(f"{where}: the {fmt.codec(manifest.meta)} codec needs the side file {missing[0]!r}, which "
                             "the manifest does not list; re-create or re-copy the dataset")
        if sum(s.rows for s in shards) != manifest.num_samples:
            raise ValueError(f"{where}: manifest num_samples {manifest.num_samples} != sum of shard rows")
        check_shard_list(shards, where)
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
