"""The CIFAR-10 archive users download -> an image source every job takes.

``images_from_cifar("cifar-10-python.tar.gz", "cifar10-train.tar")`` reads the python-pickle
release (``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` = train, 50,000 images;
``test_batch`` = test, 10,000; ``batches.meta`` = the class names) and writes a tar (or, when DST
does not end in ``.tar``, a folder) laid out::

    <split>/<class>/<NNNNN>.png        split: train | test; NNNNN: the image's index in its split

which is the ``<anything>/<class>/<file>`` layout of every image source (``tokray.data.images``):
class = the parent folder, label = its index among the sorted class names. Images are lossless
PNG (``fmt="jpeg"``, ``quality``: JPEG files like ``../shared/datasets/cifar10-train.tar``). The
default split is train only, so that ``--images DST.tar`` means the training images (a tar of both
splits would be read as one source).

The pickles are untrusted input: they are read with an Unpickler whose ``find_class`` allows only
what the release holds besides builtins, numpy's array reconstruction (``ndarray``, ``dtype``,
``_reconstruct``), and refuses every other global; the arrays are then checked (uint8 [N, 3072],
labels in range). The tar is written under a temporary name and renamed, members in order with
fixed metadata, so the same archive always gives the same bytes.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
import time

import numpy as np

log = logging.getLogger(__name__)

SPLIT_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
SPLITS = ("train", "test", "all")
META = "batches.meta"
FORMATS = {"png": ".png", "jpeg": ".jpg"}

_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's own array-unpickling function, whatever its module


def _reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to rebuild an array of class {cls!r}")
    return _RECONSTRUCT(cls, shape, dtype)


def _dtype(obj, align=False, copy=True):
    d = np.dtype(obj, align, copy)
    if d.hasobject:
        raise pickle.UnpicklingError("refusing an object-dtype array")
    return d


class CifarUnpickler(pickle.Unpickler):
    """Builtins and numpy arrays of plain dtypes only; every other global is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype}

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle") from None


def load_cifar_pickle(data: bytes, what: str) -> dict:
    """One CIFAR pickle -> a dict with str keys (the release's keys are Python 2 strings: bytes here)."""
    try:
        obj = CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a damaged or hostile pickle raises many types
        raise ValueError(f"{what} is not a CIFAR-10 python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch(d: dict, what: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{what}: 'data' must be a uint8 array [N, 3072] (32x32 RGB, channel planes), found {desc}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"{what}: 'labels' must be {len(data)} class ids in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # [N, 32, 32, 3]


def _read_members(archive: str, names: set[str]) -> dict[str, bytes]:
    """The named batch files (by base name) of a .tar.gz or of an extracted folder, each read once."""
    found: dict[str, bytes] = {}
    if os.path.isdir(archive):
        for d, _, files in os.walk(archive):
            for f in files:
                if f in names and f not in found:
                    with open(os.path.join(d, f), "rb") as fh:
                        found[f] = fh.read()
    else:
        try:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf:  # streamed: the gzip is read once, in archive order
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base in names and base not in found:
                        found[base] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{archive} is not a readable tar(.gz) archive ({type(e).__name__}: {e}); give "
                             "cifar-10-python.tar.gz or its extracted cifar-10-batches-py folder") from None
    missing = sorted(names - set(found))
    if missing:
        raise ValueError(f"{archive} lacks {', '.join(missing)}: it is not the CIFAR-10 python release "
                         "(cifar-10-python.tar.gz holds cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta)")
    return found


def _encode(img: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img).save(buf, format="PNG")
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _TarSink:
    def __init__(self, path: str):
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.tf = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tf.addfile(info, io.BytesIO(data))

    def close(self, path: str) -> None:
        self.tf.close()
        os.replace(self.tmp, path)

    def abort(self) -> None:
        self.tf.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class _DirSink:
    def __init__(self, path: str):
        self.root = path

    def add(self, name: str, data: bytes) -> None:
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def close(self, path: str) -> None:
        pass

    def abort(self) -> None:
        pass


def images_from_cifar(archive: str, dst: str, split: str = "train", fmt: str = "png", quality: int = 95,
                      overwrite: bool = False, progress=None) -> dict:
    """Write the CIFAR-10 python release at ``archive`` (the .tar.gz or its extracted folder) as images
    ``<split>/<class>/<NNNNN>.<ext>`` into ``dst`` (a ``.tar`` file, else a folder). Returns counts
    per split and class, bytes and seconds. ``progress(n)`` is called per batch file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if not os.path.exists(archive):
        raise FileNotFoundError(f"no CIFAR-10 archive at {archive}; download cifar-10-python.tar.gz (the python "
                                "version) from the CIFAR-10 page and give its path")
    to_tar = str(dst).endswith(".tar")
    if os.path.exists(dst) and not overwrite and (to_tar or os.listdir(dst)):
        raise FileExistsError(f"{dst} already exists; choose another destination or pass --overwrite to replace it")
    splits = ("train", "test") if split == "all" else (split,)
    t0 = time.perf_counter()
    raw = _read_members(archive, {META, *(b for s in splits for b in SPLIT_BATCHES[s])})
    meta = load_cifar_pickle(raw.pop(META), META)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{META}: expected a list of class names under 'label_names'")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    if len(set(classes)) != len(classes) or any(not c or "/" in c for c in classes):
        raise ValueError(f"{META}: class names must be distinct folder names, got {classes}")
    ext = FORMATS[fmt]
    sink = _TarSink(dst) if to_tar else _DirSink(dst)
    counts: dict[str, dict[str, int]] = {}
    try:
        for s in splits:
            counts[s] = {c: 0 for c in classes}
            index = 0
            for b in SPLIT_BATCHES[s]:
                images, labels = _batch(load_cifar_pickle(raw.pop(b), b), b, len(classes))
                for img, label in zip(images, labels):
                    sink.add(f"{s}/{classes[label]}/{index:05d}{ext}", _encode(np.ascontiguousarray(img), fmt, quality))
                    counts[s][classes[label]] += 1
                    index += 1
                if progress:
                    progress(len(images))
    except BaseException:
        sink.abort()
        raise
    sink.close(dst)
    seconds = time.perf_counter() - t0
    size = os.path.getsize(dst) if to_tar else sum(os.path.getsize(os.path.join(d, f))
                                                  for d, _, fs in os.walk(dst) for f in fs)
    log.info("wrote %s: %s in %.1fs", dst, ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items()), seconds)
    return {"dst": str(dst), "layout": f"<split>/<class>/<NNNNN>{ext}", "format": fmt,
            "quality": quality if fmt == "jpeg" else None, "classes": classes, "counts": counts,
            "images": sum(sum(c.values()) for c in counts.values()), "bytes": size, "seconds": seconds}


def add_command(sub, report) -> None:
    """Register ``images-from-cifar ARCHIVE DST`` on ``sub`` (argparse subparsers of jobs/dataset.py);
    ``report(rows, result)`` prints the table and the JSON line and returns the exit code."""
    s = sub.add_parser("images-from-cifar", help="the CIFAR-10 python archive -> an image tar or folder "
                                                 "<split>/<class>/<NNNNN>.png that every job's --images takes",
                       description="ARCHIVE: cifar-10-python.tar.gz as downloaded (or its extracted "
                                   "cifar-10-batches-py folder). DST: a .tar file, else a folder. Layout: "
                                   "<split>/<class>/<NNNNN>.png (class = the parent folder, NNNNN = the image's index "
                                   "in its split). The pickles are read with a restricted unpickler.")
    s.add_argument("archive", metavar="ARCHIVE")
    s.add_argument("dst", metavar="DST")
    s.add_argument("--split", default="train", choices=SPLITS,
                   help="train (data_batch_1..5, default), test (test_batch) or all (both, under train/ and test/)")
    s.add_argument("--format", default="png", choices=sorted(FORMATS), help="png (lossless, default) or jpeg")
    s.add_argument("--quality", type=int, default=95, help="JPEG quality (with --format jpeg)")
    s.add_argument("--overwrite", action="store_true", help="replace DST")

    def run(args) -> int:
        res = images_from_cifar(args.archive, args.dst, split=args.split, fmt=args.format, quality=args.quality,
                                overwrite=args.overwrite)
        rows = [{"split": sp, "images": sum(c.values()), **c} for sp, c in res["counts"].items()]
        return report(rows, res)

    s.set_defaults(fn=run)
