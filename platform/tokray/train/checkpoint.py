"""Training checkpoints: find them, read them, and check that a model and a dataset fit them.

A checkpoint is a directory with ``state.pt``: model, optimizer, (EMA), step, config (JSON) and
``data`` = the grid, codebook size, tokenizer fingerprint and class names of the dataset it was
trained on, so later jobs can refuse data or models it does not fit, naming both sides.
"""

from __future__ import annotations

import glob
import os

import torch

from tokray.config import TrainConfig
from tokray.storage.manifest import DatasetMeta


def data_summary(meta: DatasetMeta) -> dict:
    return {"kind": "tokens", "grid": list(meta.grid), "codebook_size": meta.codebook_size, "tokenizer": meta.tokenizer,
            "class_names": list(meta.class_names)}


def open_training_data(uri: str):
    """(summary dict, number of samples, the opened dataset) of a token or a pixel dataset."""
    import json

    from tokray.data.pixels import KIND as PIXELS, open_pixel_dataset
    from tokray.storage.dataset import open_dataset
    from tokray.storage.stores import open_store

    raw = open_store(uri).read_meta("manifest.json")
    if raw is not None and json.loads(raw).get("kind") == PIXELS:
        ds = open_pixel_dataset(uri)
        m = ds.meta
        return ({"kind": "pixels", "grid": [m.size, m.size], "codebook_size": 0, "tokenizer": f"jpeg:{m.size}px-q{m.quality}",
                 "class_names": list(m.class_names), "quality": m.quality}, m.num_samples, ds)
    ds = open_dataset(uri)
    return data_summary(ds.meta), len(ds), ds


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint_*`` directory under ``<run_dir>/ray/<name>/`` (or under run_dir itself)."""
    found = [p for pattern in ("ray/*/checkpoint_*/state.pt", "*/checkpoint_*/state.pt", "checkpoint_*/state.pt")
             for p in glob.glob(os.path.join(run_dir, pattern))]
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def resolve_checkpoint(path: str) -> str:
    """A ``state.pt``, a checkpoint directory or a run directory -> the ``state.pt`` to load."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, "state.pt")):
        return os.path.join(path, "state.pt")
    if os.path.isdir(path) and (latest := latest_checkpoint(path)):
        return os.path.join(latest, "state.pt")
    raise FileNotFoundError(f"no checkpoint at {path}: give a state.pt, a checkpoint_* directory or a run "
                            f"directory holding one (e.g. runs/cifar_mtm after `python jobs/pretrain.py`)")


def load_state(path: str) -> tuple[dict, TrainConfig, dict]:
    """(state, its config, its data summary) from a checkpoint path of any accepted form."""
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise ValueError(f"cannot read checkpoint {file}: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{file} is not a tokray training checkpoint (no model/config in it)")
    cfg = TrainConfig.from_json(state["config"])
    data = state.get("data") or _data_from_config(cfg)
    return state, cfg, data


def _data_from_config(cfg: TrainConfig) -> dict:
    """Checkpoints written before ``data`` was stored: read the dataset their config names."""
    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset

    return data_summary(open_dataset(cfg.data or default_tokens("train")).meta)


def require_fits_data(ckpt_data: dict, data: dict, ckpt_path: str, data_uri: str) -> None:
    """Grid and vocabulary (summaries of the checkpoint's data and of this data) must match."""
    want = (tuple(ckpt_data["grid"]), ckpt_data["codebook_size"])
    have = (tuple(data["grid"]), data["codebook_size"])
    if want != have:
        raise ValueError(f"dataset {data_uri} has a {have[0][0]}x{have[0][1]} grid of {have[1]} codes, but checkpoint "
                         f"{ckpt_path} was trained on a {want[0][0]}x{want[0][1]} grid of {want[1]} codes; use data "
                         f"made by the checkpoint's tokenizer ({ckpt_data.get('tokenizer', '?')})")


def encoder_weights(state: dict) -> dict:
    """The token-ViT weights inside a checkpoint: an MTM model's ``encoder.*`` or a classifier's own."""
    sd = state["model"]
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    return enc or dict(sd)


def load_encoder(model: torch.nn.Module, state: dict, model_name: str, ckpt_path: str, ckpt_model: str = "") -> dict:
    """Load a checkpoint's encoder into ``model`` strictly except for the classifier head.

    Returns {"dropped": checkpoint keys not used, "initialized": model keys left at their init};
    only ``head.*`` may be initialized. Any other missing key or any shape mismatch is an error
    naming the checkpoint's model and this one.
    """
    src = encoder_weights(state)
    own = model.state_dict()
    dropped = sorted(set(state["model"]) - {f"encoder.{k}" for k in own} - set(own))
    missing = sorted(k for k in own if k not in src)
    bad = [(k, list(src[k].shape), list(v.shape)) for k, v in own.items() if k in src and src[k].shape != v.shape]
    not_head = [k for k in missing if not k.startswith("head.")]
    if not_head or bad:
        theirs = f"checkpoint {ckpt_path} ({ckpt_model or 'model'}: {describe_weights(src)})"
        ours = f"{model_name} ({describe_weights(own)})"
        why = (f"{bad[0][0]} is {bad[0][1]} in the checkpoint and {bad[0][2]} in the model ({len(bad)} mismatched)"
               if bad else f"the checkpoint lacks {', '.join(not_head[:4])}{' ...' if len(not_head) > 4 else ''}")
        raise ValueError(f"{theirs} does not fit {ours}: {why}")
    head_from_ckpt = [k for k in own if k.startswith("head.") and k in src]
    weights = {k: src[k] for k in own if k in src and k not in head_from_ckpt}
    weights.update({k: own[k] for k in own if k.startswith("head.")})  # a fresh head for this task
    model.load_state_dict(weights, strict=True)
    return {"dropped": dropped + head_from_ckpt, "initialized": sorted(k for k in own if k.startswith("head."))}


def describe_weights(sd: dict) -> str:
    """'width 128, depth 4, 512 codes' from a token-ViT state dict (what decides whether it loads)."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    width = sd["pos_embed"].shape[-1] if "pos_embed" in sd else "?"
    codes = sd["patch_embed.embed.weight"].shape[0] if "patch_embed.embed.weight" in sd else "?"
    return f"width {width}, depth {depth}, {codes} codes"
