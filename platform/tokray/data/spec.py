"""What a training run needs to know about its data, built once from the dataset's manifest.

``DataSpec`` is the typed summary the driver hands to workers and stores in every checkpoint:
the record kind, the token grid and codebook (tokens) or the image size and JPEG quality
(pixels), the tokenizer fingerprint, the class names and the split. Models, tasks and checks
read it instead of the manifest, so a pixel dataset never has to pretend to be a token one.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Kind = Literal["tokens", "pixels"]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    kind: Kind
    class_names: tuple[str, ...]
    num_samples: int = 0
    grid: tuple[int, int] = (0, 0)  # tokens: the id grid (h, w)
    codebook_size: int = 0  # tokens
    tokenizer: str = ""  # tokens: fingerprint of the tokenizer that made the ids
    image_size: int = 0  # pixels: side of the stored images
    quality: int = 0  # pixels: their JPEG quality
    split: str = ""  # train | val | all, when the writer recorded it
    files: tuple[str, ...] = ()  # side files stored with the dataset (e.g. codebook.safetensors)

    def __post_init__(self):
        if self.kind not in ("tokens", "pixels"):
            raise ValueError(f"data kind must be 'tokens' or 'pixels', got {self.kind!r}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))
        object.__setattr__(self, "files", tuple(self.files))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_tokens(self) -> bool:
        return self.kind == "tokens"

    @property
    def input_key(self) -> str:
        """The batch key a model reads: uint16 ``ids`` or uint8 ``pixels``."""
        return "ids" if self.is_tokens else "pixels"

    def layout(self) -> tuple:
        """What two datasets must share for one model to train on one and be scored on the other."""
        return (self.kind, self.grid, self.codebook_size, self.image_size, self.quality, self.class_names)

    def describe(self) -> str:
        what = (f"{self.grid[0]}x{self.grid[1]} grid, {self.codebook_size} codes" if self.is_tokens
                else f"{self.image_size}px JPEG q{self.quality}")
        return f"{self.kind}: {what}, {self.num_classes} classes"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {**d, "class_names": list(self.class_names), "grid": list(self.grid), "files": list(self.files)}

    @classmethod
    def from_json(cls, d: dict) -> "DataSpec":
        """Also reads the untyped summaries of older checkpoints ({kind?, grid, codebook_size, ...})."""
        kind = d.get("kind", "tokens")
        fields = {f.name for f in dataclasses.fields(cls)}
        spec = {k: v for k, v in d.items() if k in fields}
        if kind == "pixels" and not spec.get("image_size"):
            spec["image_size"] = int(d["grid"][0])
            spec["grid"] = (0, 0)
            spec["codebook_size"] = 0
            spec["tokenizer"] = ""
        return cls(**{**spec, "kind": kind})

    @classmethod
    def from_manifest(cls, manifest) -> "DataSpec":
        """The spec of an opened dataset's manifest (``tokray.storage.manifest.Manifest``)."""
        meta = manifest.meta
        common = {"class_names": tuple(meta.class_names), "num_samples": manifest.num_samples,
                  "split": str(meta.extra.get("split", "")), "files": tuple(sorted(manifest.files))}
        if meta.kind == "pixels":
            return cls(kind="pixels", image_size=meta.size, quality=meta.quality, **common)
        return cls(kind="tokens", grid=tuple(meta.grid), codebook_size=meta.codebook_size,
                   tokenizer=meta.tokenizer, **common)
