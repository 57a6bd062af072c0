"""Image sources: a tar, a folder or an s3:// prefix laid out ``<anything>/<class>/<file>``.

Class = the name of a file's parent folder; label = its index among the sorted class names;
member order (and so the stable sample id) = sorted member path. Splits: ``tokray.data.splits``.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from typing import Iterator

import numpy as np

from tokray.storage.uri import parse_uri

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


class ImageSource:
    def __init__(self, uri: str):
        self.uri = str(uri)
        if "://" not in self.uri:
            self.uri = os.path.abspath(self.uri)  # workers run in another directory
        self._tar = None
        self._tar_index = None
        parsed = parse_uri(uri) if "://" in self.uri else None
        if parsed is not None and parsed.scheme == "lmdb":
            raise ValueError(f"{uri}: an image source is a tar, a folder or an s3:// prefix, not an LMDB env")
        self.kind = "s3" if parsed is not None and parsed.scheme == "s3" else (
            "tar" if os.path.isfile(self._local) else "dir")
        if self.kind != "s3" and not os.path.exists(self._local):
            raise FileNotFoundError(f"image source {uri} does not exist; give a tar, a folder laid out "
                                    "<anything>/<class>/<file>, or an s3:// prefix")
        self.members = self._list()
        if not self.members:
            raise ValueError(f"image source {uri} holds no image files laid out <anything>/<class>/<file>")
        self.class_names = tuple(sorted({m.rsplit("/", 2)[-2] for m in self.members}))
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels = np.array([index[m.rsplit("/", 2)[-2]] for m in self.members], dtype=np.int32)

    @property
    def _local(self) -> str:
        return self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self):
        return {**self.__dict__, "_tar": None, "_tar_index": None}

    def _list(self) -> list[str]:
        if self.kind == "tar":
            with tarfile.open(self._local) as tf:  # one scan; the index serves every later read
                self._tar_index = {m.name: m for m in tf.getmembers() if m.isfile()}
            names = list(self._tar_index)
        elif self.kind == "dir":
            root = self._local
            names = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
        else:
            names = [p.split("/", 1)[1] for p in self._s3().find(self.uri[len("s3://"):])]
        return sorted(n for n in names if n.lower().endswith(IMAGE_EXTS) and n.count("/") >= 1)

    def _index(self) -> dict:
        if self._tar_index is None:  # an unpickled copy: rebuild (TarFile.getmember is a linear search)
            with tarfile.open(self._local) as tf:
                self._tar_index = {m.name: m for m in tf.getmembers() if m.isfile()}
        return self._tar_index

    def _s3(self):
        from tokray.storage.s3 import S3Store

        return S3Store(parse_uri(self.uri)).fs

    def read(self, i: int) -> bytes:
        name = self.members[i]
        if self.kind == "tar":
            if self._tar is None:
                self._tar = tarfile.open(self._local)
            return self._tar.extractfile(self._index()[name]).read()
        if self.kind == "dir":
            with open(os.path.join(self._local, name), "rb") as f:
                return f.read()
        bucket = self.uri[len("s3://"):].split("/", 1)[0]
        return self._s3().cat_file(f"{bucket}/{name}")

    def identity(self) -> str:
        """What this source is, for resume checks: a digest of its sorted member names (and, for a tar, sizes)."""
        import hashlib

        h = hashlib.sha256()
        for m in self.members:
            h.update(m.encode())
            if self.kind == "tar":
                h.update(str(self._index()[m].size).encode())
        return f"images:{os.path.basename(self._local.rstrip('/'))}:{len(self.members)}:{h.hexdigest()[:16]}"

    def file_bytes(self, indices=None) -> int:
        """Bytes of the image files themselves (what pixel storage costs)."""
        if self.kind == "tar":
            return sum(self._index()[self.members[i]].size for i in (range(len(self)) if indices is None else indices))
        return sum(len(self.read(i)) for i in (range(len(self)) if indices is None else indices))


def decode_image(data: bytes, size: int) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [size, size, 3] RGB (bicubic resize when the size differs)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def decode_batch(source: ImageSource, indices, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode images; a corrupt or non-image file is logged by name and marked invalid.

    Returns (pixels [n, size, size, 3] uint8, zeros where invalid; valid [n] bool).
    """
    pixels = np.zeros((len(indices), size, size, 3), np.uint8)
    valid = np.ones(len(indices), dtype=bool)
    for j, i in enumerate(indices):
        try:
            pixels[j] = decode_image(source.read(int(i)), size)
        except Exception as e:  # PIL raises many types for a bad file; the job must go on
            valid[j] = False
            log.warning("skipping %s: not a decodable image (%s: %s)", source.members[int(i)], type(e).__name__, e)
    return pixels, valid


def decode_many(source: ImageSource, indices, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode images, dropping unreadable ones: (pixels, kept indices, names of skipped files)."""
    indices = np.asarray(indices, dtype=np.int64)
    pixels, valid = decode_batch(source, indices, size)
    return pixels[valid], indices[valid], [source.members[int(i)] for i in indices[~valid]]


def iter_indices(n: int, chunk: int) -> Iterator[range]:
    for start in range(0, n, chunk):
        yield range(start, min(n, start + chunk))
