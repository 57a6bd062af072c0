"""Training checkpoints, in one place: save (from the worker loop), restore (a resumed or restarted
worker), find and read them, load an MTM encoder into a fine-tuning model, and check fits.

A checkpoint is a directory with ``state.pt``: model, optimizer, (EMA), step, config (JSON) and
``data`` = the DataSpec (``to_json``) of the dataset it was trained on, so later jobs can refuse
data or models it does not fit, naming both sides; ``config.json`` and ``metrics.json`` beside it.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile

import torch

from models.mtm import token_vit_keys
from models.token_vit import describe_weights
from tokray.config import TrainConfig
from tokray.data.spec import DataSpec

STATE_FILE = "state.pt"


def save_and_report(model, opt, ema, step: int, position, plan, metrics: dict, rank: int) -> None:
    """``ray.train.report`` of ``metrics`` with a checkpoint of this step and data position (a
    tokray.train.plan.DataPosition), written by rank 0 only: the state is replicated."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            config = plan.config.to_json()
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "config": config,
                     "data": plan.data.to_json(), "data_position": position.to_json()}
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            torch.save(state, os.path.join(d, STATE_FILE))
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(config)
            with open(os.path.join(d, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def restore(checkpoint, model, opt, ema):
    """Load a ``ray.train.Checkpoint`` into model, optimizer and EMA; returns (its step, its DataPosition or
    None for checkpoints written before positions were stored)."""
    from tokray.train.plan import DataPosition

    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if ema is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
    return int(state["step"]), DataPosition.from_json(state.get("data_position"))


def newest(*checkpoints):
    """The ``ray.train.Checkpoint`` of the latest step among those given (None ones skipped), or None.

    A restart gets Ray's latest *reported* checkpoint and ``--resume`` the newest one on disk; they can
    differ: rank 0 persists a checkpoint before the report that registers it, so a worker lost in
    between leaves a complete but unregistered one, which a new fit of the run must not go behind."""
    found = [c for c in checkpoints if c is not None]
    return max(found, key=checkpoint_step) if found else None


def checkpoint_step(checkpoint) -> int:
    """The step a ``ray.train.Checkpoint`` was written at (its metrics.json; its state.pt for older ones)."""
    try:  # one small file through the checkpoint's own filesystem: nothing else is fetched
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/metrics.json") as f:
            return int(json.loads(f.read())["step"])
    except (FileNotFoundError, KeyError, ValueError):
        with checkpoint.as_directory() as d:
            return int(torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)["step"])


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest ``checkpoint_*`` directory under ``<run_dir>/ray/<name>/`` (or under run_dir itself)."""
    found = [p for pattern in (f"ray/*/checkpoint_*/{STATE_FILE}", f"*/checkpoint_*/{STATE_FILE}",
                               f"checkpoint_*/{STATE_FILE}")
             for p in glob.glob(os.path.join(run_dir, pattern))]
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def resolve_checkpoint(path: str) -> str:
    """A ``state.pt``, a checkpoint directory or a run directory -> the ``state.pt`` to load."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return os.path.join(path, STATE_FILE)
    if os.path.isdir(path) and (latest := latest_checkpoint(path)):
        return os.path.join(latest, STATE_FILE)
    raise FileNotFoundError(f"no checkpoint at {path}: give a state.pt, a checkpoint_* directory or a run "
                            f"directory holding one (e.g. runs/cifar_mtm after `python jobs/pretrain.py`)")


def load_state(path: str) -> tuple[dict, TrainConfig, DataSpec]:
    """(state, its config, the DataSpec of its training data) from a checkpoint path of any accepted form."""
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, and the first line of why
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read checkpoint {file}: it is not a tokray checkpoint or it is damaged ({why})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{file} is not a tokray training checkpoint (no model/config in it)")
    cfg = TrainConfig.from_json(state["config"])
    spec = DataSpec.from_json(state["data"]) if state.get("data") else _spec_from_config(cfg)
    return state, cfg, spec


def _spec_from_config(cfg: TrainConfig) -> DataSpec:
    """Checkpoints written before ``data`` was stored: read the dataset their config names."""
    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset

    return DataSpec.from_manifest(open_dataset(cfg.data or default_tokens("train")).manifest)


def require_fits_data(ckpt_spec: DataSpec, spec: DataSpec, ckpt_path: str, data_uri: str) -> None:
    """The checkpoint's data and this data must be read the same way by one model: kind, then grid and
    vocabulary (tokens) or image size (pixels)."""
    if ckpt_spec.kind != spec.kind:
        raise ValueError(f"dataset {data_uri} holds {spec.kind}, but checkpoint {ckpt_path} was trained on "
                         f"{ckpt_spec.kind}; give a dataset of {ckpt_spec.kind} ({ckpt_spec.describe()})")
    if not spec.is_tokens:
        if spec.image_size != ckpt_spec.image_size:
            raise ValueError(f"dataset {data_uri} holds {spec.image_size}px images, but checkpoint {ckpt_path} was "
                             f"trained on {ckpt_spec.image_size}px; give images stored at {ckpt_spec.image_size}px")
        return
    want, have = (ckpt_spec.grid, ckpt_spec.codebook_size), (spec.grid, spec.codebook_size)
    if want != have:
        raise ValueError(f"dataset {data_uri} has a {have[0][0]}x{have[0][1]} grid of {have[1]} codes, but checkpoint "
                         f"{ckpt_path} was trained on a {want[0][0]}x{want[0][1]} grid of {want[1]} codes; use data "
                         f"made by the checkpoint's tokenizer ({ckpt_spec.tokenizer or '?'})")


def load_encoder(model: torch.nn.Module, state: dict, model_name: str, ckpt_path: str, ckpt_model: str = "") -> dict:
    """Load a checkpoint's token-ViT weights (an MTM encoder's or a classifier's) into ``model`` strictly
    except for the classifier head.

    Returns {"dropped": checkpoint keys not used, "initialized": model keys left at their init};
    only ``head.*`` may be initialized. Any other missing key or any shape mismatch is an error
    naming the checkpoint's model and this one.
    """
    sd = state["model"]
    keys = token_vit_keys(sd)
    src = {vit_key: sd[k] for k, vit_key in keys.items()}
    own = model.state_dict()
    dropped = [k for k in sd if k not in keys or keys[k] not in own]
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
    return {"dropped": sorted(dropped) + head_from_ckpt, "initialized": sorted(k for k in own if k.startswith("head."))}
