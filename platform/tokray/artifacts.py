"""Shipped weight files: one safetensors file = tensors + a JSON config + a fingerprint.

The metadata of an artifact holds ``config`` (JSON: what builds the model), ``fingerprint`` (16 hex
digits of sha256 over the config and every tensor's raw bytes), ``extra`` (JSON: provenance,
measurements) and any further string fields a kind needs (e.g. TokenAdapt's ``tokenizer``).
The VQ tokenizer (``tokray.data.tokenizer``) and TokenAdapt (``tokray.augment.tokenadapt``) are
both written and read here.

The fingerprint hashes each tensor's bytes as they lie in memory (a uint8 view), so it is defined
for every dtype (bf16 has no numpy type) and equals, for float32 and float16, the hash the
shipped files were made with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch

META_KEYS = ("config", "fingerprint", "extra")


@dataclasses.dataclass(frozen=True)
class ArtifactInfo:
    """What an artifact's metadata says: enough to check a file before reading its tensors."""

    path: str
    config: dict
    fingerprint: str
    extra: dict
    fields: dict[str, str]  # the kind's own metadata strings, e.g. {"tokenizer": "<fingerprint>"}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (row-major, native byte order), whatever its dtype."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def fingerprint(tensors: dict[str, torch.Tensor], config: dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()[:16]


def save_artifact(path: str, tensors: dict[str, torch.Tensor], config: dict, extra: dict | None = None,
                  fields: dict[str, str] | None = None) -> str:
    """Write ``tensors`` with their config, fingerprint, extra and fields; returns the fingerprint.

    Atomic (a temporary file renamed over ``path``), readable by all like any package data."""
    from safetensors.torch import save_file

    clash = set(fields or {}) & set(META_KEYS)
    if clash:
        raise ValueError(f"artifact fields {sorted(clash)} would overwrite the metadata keys {META_KEYS}; rename them")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fp = fingerprint(tensors, config)
    meta = {"config": json.dumps(config), "fingerprint": fp, **(fields or {}), "extra": json.dumps(extra or {})}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # a shipped file: readable by all
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return fp


def read_info(path: str, what: str, make_hint: str, required: tuple[str, ...] = ()) -> ArtifactInfo:
    """The metadata of the ``what`` artifact at ``path`` (no tensors read).

    ``make_hint`` says how to make one (named when the file is missing); ``required`` lists the
    kind's own fields. A missing file, a file that is not safetensors, or one without tokray
    metadata each raise an error that says which."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path}; {make_hint}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types on a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is damaged or "
                         f"not a tokray {what}: {make_hint}") from e
    missing = [k for k in ("config", "fingerprint", *required) if k not in meta]
    if missing:
        raise ValueError(f"{path} is not a tokray {what} (no {'/'.join(missing)} in its safetensors metadata); "
                         f"{make_hint}")
    try:
        config, extra = json.loads(meta["config"]), json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the config or extra in its metadata is not JSON ({e}); the file is damaged") from e
    fields = {k: meta[k] for k in meta if k not in META_KEYS}
    return ArtifactInfo(path=path, config=config, fingerprint=meta["fingerprint"], extra=extra, fields=fields)


def load_tensors(info: ArtifactInfo) -> dict[str, torch.Tensor]:
    """The artifact's tensors, verified against its fingerprint."""
    from safetensors.torch import load_file

    tensors = load_file(info.path)
    if fingerprint(tensors, info.config) != info.fingerprint:
        raise ValueError(f"{info.path}: weights do not match the fingerprint {info.fingerprint} in its metadata; "
                         "the file is damaged (copy or rebuild it)")
    return tensors


def load_artifact(path: str, what: str, make_hint: str,
                  required: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], ArtifactInfo]:
    """(verified tensors, metadata) of the ``what`` artifact at ``path``."""
    info = read_info(path, what, make_hint, required)
    return load_tensors(info), info


def factory_args(config: dict) -> dict:
    """The config's ``model_args`` as a model factory takes them (JSON lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config["model_args"].items()}
