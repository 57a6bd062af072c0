"""Import SeiT's released token files into a tokray token dataset.

SeiT format (ImageNet release):

- ``<split>-token.data.bin.gz``: gzip of one byte string, the images concatenated; each image is
  its h*w token ids in raster order. A token t < 255 is the byte t; a token t >= 255 is the two
  bytes 255, t-255 (byte 255 escapes the next byte, so ids go up to 510).
- ``<split>-token.index.npy.gz``: gzip of a ``.npy`` integer array of N+1 byte offsets into the
  decompressed data (image i is ``data[offsets[i]:offsets[i+1]]``).
- ``<split>-label.txt``: one integer class id per line (N lines).
- ``codebook.ckpt``: a torch file holding the (K, d) float codebook (or a dict of that one tensor).

``encode_seit_tokens`` is the writer of this format (the inverse of ``decode_seit_tokens``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
from typing import Iterator

import numpy as np

from tokray.storage.dataset import DatasetWriter
from tokray.storage.formats.tokens import TokenMeta
from tokray.storage.manifest import Manifest

ESCAPE = 255
MAX_ID = 2 * ESCAPE  # escape + a second byte of 255
CODEBOOK_FILE = "codebook.safetensors"


def decode_seit_tokens(data: bytes, offsets: np.ndarray, tokens_per_image: int,
                       first_index: int = 0) -> np.ndarray:
    """Token ids [N, tokens_per_image] uint16 of the images ``data[offsets[i]:offsets[i+1]]``.

    ``offsets`` may start past 0 (a slice of a larger index); ``first_index`` is the index of the
    first image, used only in error messages.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    base = int(offsets[0])
    b = np.frombuffer(data, dtype=np.uint8)[base:int(offsets[-1])]
    if len(b) != offsets[-1] - base:
        raise ValueError(f"SeiT data has {base + len(b)} bytes; the index needs {int(offsets[-1])}")
    starts, ends = offsets[:-1] - base, offsets[1:] - base
    pos = np.arange(len(b), dtype=np.int64)
    # A token starts after every non-escape byte and at every image start, so a run of 255 bytes
    # beginning there alternates escape, second byte, escape, ... (a second byte may be 255 too).
    run_start = np.where(b != ESCAPE, pos + 1, 0)
    s = starts[starts < len(b)]
    run_start[s] = np.maximum(run_start[s], s)
    run_start = np.maximum.accumulate(run_start)
    esc = (b == ESCAPE) & ((pos - run_start) % 2 == 0)

    # an escape's second byte must lie in the same image, and each image must hold exactly h*w tokens
    nonempty = np.flatnonzero(ends > starts)
    dangling = nonempty[esc[ends[nonempty] - 1]]
    cum = np.concatenate([[0], np.cumsum(esc, dtype=np.int64)])
    counts = (ends - starts) - (cum[ends] - cum[starts])
    bad = np.flatnonzero(counts != tokens_per_image)
    if dangling.size or bad.size:  # report the first bad image
        i = int(min(dangling[:1].tolist() + bad[:1].tolist()))
        if dangling.size and dangling[0] == i:
            raise ValueError(f"SeiT image {first_index + i} ends with an escape byte (255) and no byte "
                             "after it; the data file is truncated or corrupt")
        raise ValueError(f"SeiT image {first_index + i} decodes to {int(counts[i])} tokens, expected "
                         f"{tokens_per_image}; check --grid or the data file")

    ids = b.astype(np.uint16)
    ids[1:] += ESCAPE * esc[:-1].astype(np.uint16)  # the byte after an escape carries +255
    return ids[~esc].reshape(n, tokens_per_image)


def encode_seit_tokens(ids: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Write ids [N, T] (0..510) in SeiT's byte format: (data bytes, int64 offsets [N+1])."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [N, T], got shape {ids.shape}")
    flat = ids.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() > MAX_ID):
        raise ValueError(f"SeiT's format holds ids 0..{MAX_ID}; got {int(flat.min())}..{int(flat.max())}")
    hi = flat >= ESCAPE
    width = 1 + hi.astype(np.int64)
    pos = np.cumsum(width) - width
    out = np.empty(int(width.sum()), dtype=np.uint8)
    out[pos] = np.where(hi, ESCAPE, flat)
    out[pos[hi] + 1] = flat[hi] - ESCAPE
    per_image = width.reshape(ids.shape).sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(per_image)]).astype(np.int64)
    return out.tobytes(), offsets


def seit_index_path(data_path: str) -> str:
    """``x-token.data.bin.gz`` -> ``x-token.index.npy.gz`` (same directory)."""
    head, name = os.path.split(data_path)
    if "data.bin" not in name:
        raise ValueError(f"cannot derive the index file from {data_path!r}: its name has no 'data.bin'")
    return os.path.join(head, name.replace("data.bin", "index.npy"))


def _require(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SeiT {what} file not found: {path}")


@dataclasses.dataclass
class SeitFiles:
    """A SeiT split: the index, labels and codebook in memory; the token data read as streamed."""

    data_path: str
    index_path: str
    offsets: np.ndarray  # [N+1] int64
    labels: np.ndarray  # [N] int32
    codebook: "torch.Tensor"  # noqa: F821  [K, d]

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def iter_chunks(self, tokens_per_image: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first image index, ids [n, tokens_per_image]) for consecutive chunks of ``rows`` images.

        Reads the gzip stream sequentially, so memory is one chunk, not the whole split.
        """
        try:
            yield from self._chunks(tokens_per_image, rows)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated stream ends in EOFError
            raise ValueError(f"{self.data_path} is not a complete gzip stream ({type(e).__name__}: {e}); "
                             "download it again") from None

    def _chunks(self, tokens_per_image: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        o = self.offsets
        with gzip.open(self.data_path, "rb") as f:
            f.read(int(o[0]))
            for start in range(0, self.num_images, rows):
                stop = min(start + rows, self.num_images)
                want = int(o[stop] - o[start])
                data = f.read(want)
                if len(data) != want:
                    raise ValueError(f"{self.data_path} ends early: images {start}..{stop - 1} need bytes "
                                     f"{int(o[start])}..{int(o[stop])}, the data has {int(o[start]) + len(data)}")
                chunk = o[start:stop + 1] - o[start]
                yield start, decode_seit_tokens(data, chunk, tokens_per_image, first_index=start)
            if f.read(1):
                raise ValueError(f"{self.data_path} has bytes past the index's last offset {int(o[-1])}; "
                                 "the index does not match the data file")


def _load_offsets(path: str) -> np.ndarray:
    try:
        offsets = np.load(io.BytesIO(gzip.decompress(open(path, "rb").read())), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a gzip'd .npy array ({type(e).__name__}: {e})") from None
    if offsets.ndim != 1 or len(offsets) < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-D integer array of N+1 >= 2 offsets, "
                         f"got shape {offsets.shape} dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if offsets[0] < 0 or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: offsets must be non-negative and non-decreasing")
    return offsets


def _load_labels(path: str) -> np.ndarray:
    with open(path) as f:
        lines = [ln.strip() for ln in f]
    labels = []
    for i, ln in enumerate(lines):
        if not ln:
            continue
        try:
            labels.append(int(ln))
        except ValueError:
            raise ValueError(f"{path} line {i + 1}: {ln!r} is not an integer class id") from None
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: class ids must be >= 0, found {int(labels.min())}")
    return labels.astype(np.int32)


def _load_codebook(path: str):
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never full unpickling
    except Exception as e:  # torch raises several types for a bad or unsafe file
        raise ValueError(f"cannot load the codebook {path} as weights ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or not obj.is_floating_point():
        what = f"a tensor of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise ValueError(f"{path}: expected a (K, d) float tensor or a dict holding one; found {what}")
    return obj.detach().to(torch.float32).contiguous()


def read_seit_files(data_path: str, labels_path: str, codebook_path: str,
                    index_path: str | None = None) -> SeitFiles:
    """Check and load a SeiT split (index, labels, codebook); the data is streamed by ``iter_chunks``."""
    index_path = index_path or seit_index_path(data_path)
    for path, what in [(data_path, "token data"), (index_path, "token index"), (labels_path, "label"),
                       (codebook_path, "codebook")]:
        _require(path, what)
    offsets = _load_offsets(index_path)
    labels = _load_labels(labels_path)
    if len(labels) != len(offsets) - 1:
        raise ValueError(f"{labels_path} has {len(labels)} labels but {index_path} indexes "
                         f"{len(offsets) - 1} images")
    return SeitFiles(data_path, index_path, offsets, labels, _load_codebook(codebook_path))


def _class_names(path: str | None, num_classes: int) -> tuple[str, ...]:
    if path is None:
        return tuple(f"class{c}" for c in range(num_classes))
    _require(path, "class names")
    with open(path) as f:
        names = tuple(ln.strip() for ln in f if ln.strip())
    if len(names) < num_classes:
        raise ValueError(f"{path} names {len(names)} classes but the labels go up to {num_classes - 1}")
    return names


def _source_identity(*paths: str) -> str:
    """Names, sizes and modification times of the SeiT files (a resume must read the same ones)."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.basename(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return "seit:" + h.hexdigest()[:16]


def import_seit(data_path: str, labels_path: str, codebook_path: str, dst_uri, grid=(32, 32),
                class_names: str | None = None, shard_rows: int = 8192, overwrite: bool = False,
                progress=None) -> Manifest:
    """Convert a SeiT split into a token dataset at ``dst_uri`` (sample id = image index).

    Streams chunk by chunk into shards (resumable like any DatasetWriter write) and stores the
    codebook beside the shards as ``codebook.safetensors``. ``progress(n)`` is called per chunk.
    """
    import safetensors.torch

    src = read_seit_files(data_path, labels_path, codebook_path)
    h, w = (int(x) for x in grid)
    k, d = src.codebook.shape
    digest = hashlib.sha256(src.codebook.numpy().astype("<f4").tobytes()).hexdigest()[:16]
    meta = TokenMeta(grid=(h, w), codebook_size=k,
                       class_names=_class_names(class_names, int(src.labels.max(initial=0)) + 1),
                       tokenizer=f"seit-codebook:{digest}", shard_rows=shard_rows,
                       extra={"source": "seit", "codebook_shape": [k, d]})
    with DatasetWriter(dst_uri, meta, overwrite=overwrite, source=_source_identity(data_path, labels_path)) as writer:
        # written before the manifest, so a complete dataset always carries its codebook
        writer.add_file(CODEBOOK_FILE, safetensors.torch.save({"codebook": src.codebook}))
        for start, ids in src.iter_chunks(h * w, shard_rows):
            shard = start // shard_rows
            if not writer.shard_done(shard):  # resume: the stream is read anyway, the write is skipped
                top = int(ids.max(initial=0))
                if top >= k:
                    raise ValueError(f"token id {top} (images {start}..{start + len(ids) - 1}) is outside "
                                     f"the codebook of {codebook_path}: K = {k}")
                stop = start + len(ids)
                writer.write_shard(shard, ids.reshape(-1, h, w), src.labels[start:stop],
                                   np.arange(start, stop, dtype=np.int64))
            if progress:
                progress(len(ids))
        return writer.close(num_shards=-(-src.num_images // shard_rows))
