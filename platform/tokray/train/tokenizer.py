"""Train, evaluate, save and load the VQ tokenizer.

A trained tokenizer is one safetensors file: weights (after pruning to the codes used) plus
metadata holding its config and fingerprint. The fingerprint (sha256 of config + weights) is
what every token dataset records, so ids are never read with the wrong codebook.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time

import numpy as np
import torch

import models
from tokray.data.images import ImageSource, decode_many, validation_split
from tokray.train.schedule import warmup_cosine


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    images: str
    out_dir: str
    model: str = "vq_cifar_8x8"
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 100
    val_per_class: int = 500
    split_seed: int = 0
    seed: int = 0
    eval_every: int = 500
    ckpt_every: int = 250
    max_images: int = 0  # 0 = all training images

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def to_unit(pixels_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(pixels_uint8).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def psnr_db(recon: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR on the [0, 255] scale of images given in [-1, 1] (recon quantized like a saved image)."""
    r = ((recon.clamp(-1, 1) + 1) * 127.5).round()
    t = ((target + 1) * 127.5).round()
    mse = ((r - t) ** 2).mean().item()
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def entropy_bits(ids: np.ndarray) -> float:
    counts = np.bincount(np.asarray(ids).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def fingerprint(model: torch.nn.Module, config: dict) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_tokenizer(model, model_name: str, model_args: dict, path: str, extra: dict | None = None) -> str:
    from safetensors.torch import save_file

    config = {"model": model_name, "model_args": {**model_args, "codebook_size": model.codebook_size}}
    fp = fingerprint(model, config)
    meta = {"config": json.dumps(config), "fingerprint": fp, "extra": json.dumps(extra or {})}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=meta)
    os.chmod(tmp, 0o644)  # a shipped file: readable by all, like any package data
    os.replace(tmp, path)
    return fp


def load_tokenizer(path: str):
    """(model in eval mode, metadata dict with 'fingerprint', 'config', 'extra')."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}; train one with `python jobs/train_tokenizer.py`")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} is not a tokray tokenizer (no config in its safetensors metadata)")
    config = json.loads(meta["config"])
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in config["model_args"].items()}
    model = models.create_model(config["model"], **args)
    model.load_state_dict(load_file(path), strict=True)
    model.eval()
    info = {"fingerprint": meta["fingerprint"], "config": config, "extra": json.loads(meta.get("extra", "{}"))}
    if fingerprint(model, config) != info["fingerprint"]:
        raise ValueError(f"{path}: weights do not match the fingerprint in its metadata; the file is damaged")
    return model, info


def load_split(cfg: TokenizerConfig, size: int):
    """Decoded train and validation pixels (uint8) of the source, split by the fixed seed."""
    src = ImageSource(cfg.images)
    val = validation_split(src.labels, cfg.val_per_class, cfg.split_seed)
    train_idx, val_idx = np.flatnonzero(~val), np.flatnonzero(val)
    if cfg.max_images:
        train_idx = train_idx[: cfg.max_images]
        val_idx = val_idx[: max(16, cfg.max_images // 8)]
    t0 = time.time()
    train, _, bad_t = decode_many(src, train_idx, size)
    valp, _, bad_v = decode_many(src, val_idx, size)
    log.info("decoded %d train + %d validation images in %.1fs (%d skipped)", len(train), len(valp),
             time.time() - t0, len(bad_t) + len(bad_v))
    return src, train, valp


@torch.no_grad()
def evaluate(model, pixels: np.ndarray, batch: int = 500) -> dict:
    model.eval()
    psnrs, ids = [], []
    for s in range(0, len(pixels), batch):
        x = to_unit(pixels[s:s + batch])
        i = model.encode(x)
        psnrs.append((psnr_db(model.decode(i), x), len(x)))
        ids.append(i.numpy())
    model.train()
    ids = np.concatenate(ids)
    mse_weighted = sum(10 ** (-p / 10) * n for p, n in psnrs) / sum(n for _, n in psnrs)
    return {"psnr_db": -10 * math.log10(mse_weighted), "codes_used": int(len(np.unique(ids))),
            "bits_per_token": entropy_bits(ids)}


def lr_at(step: int, cfg: TokenizerConfig) -> float:
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup)


def train(cfg: TokenizerConfig, resume: bool = True, progress: bool = True) -> dict:
    from tqdm import tqdm

    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    model = models.create_model(cfg.model, **cfg.model_args).to(memory_format=torch.channels_last)
    src, train_px, val_px = load_split(cfg, model.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ckpt_path = os.path.join(cfg.out_dir, "last.pt")
    step, curve = 0, []
    if resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, curve = int(state["step"]), json.loads(state["curve"])
        log.info("resumed from %s at step %d", ckpt_path, step)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)
    data = torch.from_numpy(train_px)
    model.train()
    t0, seen = time.time(), 0
    bar = tqdm(total=cfg.steps, initial=step, desc="tokenizer", unit="step", disable=not progress)
    while step < cfg.steps:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x = to_unit(data[idx]).contiguous(memory_format=torch.channels_last)  # ~30% faster convs on CPU
        flip = torch.rand(len(x), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        out = model(x)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"non-finite tokenizer loss at step {step}")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        step += 1
        seen += len(x)
        bar.update(1)
        bar.set_postfix(loss=f"{out['rec_loss'].item():.4f}", img_s=f"{seen / (time.time() - t0):.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            m = evaluate(model, val_px)
            curve.append({"step": step, "seconds": round(time.time() - t0, 1), **m})
            log.info("step %d: val PSNR %.2f dB, %d codes used, %.2f bits/token, %.0f img/s", step,
                     m["psnr_db"], m["codes_used"], m["bits_per_token"], seen / (time.time() - t0))
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            tmp = ckpt_path + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "curve": json.dumps(curve)}, tmp)
            os.replace(tmp, ckpt_path)
    bar.close()
    return finalize(model, cfg, src, train_px, val_px, curve, seen / max(1e-9, time.time() - t0))


@torch.no_grad()
def finalize(model, cfg, src, train_px, val_px, curve, img_per_s) -> dict:
    """Prune to the codes the training images use, save, and report on the validation split."""
    model.eval()
    counts = torch.zeros(model.codebook_size, dtype=torch.long)
    for s in range(0, len(train_px), 1000):
        counts += torch.bincount(model.encode(to_unit(train_px[s:s + 1000])).flatten(), minlength=model.codebook_size)
    before = model.codebook_size
    model.prune_to_used(counts)
    final = evaluate(model, val_px)
    extra = {"images": os.path.basename(cfg.images.rstrip("/")), "steps": cfg.steps, "codes_before_prune": before,
             "val": final, "curve": curve, "split": {"val_per_class": cfg.val_per_class, "seed": cfg.split_seed}}
    path = os.path.join(cfg.out_dir, "tokenizer.safetensors")
    fp = save_tokenizer(model, cfg.model, cfg.model_args, path, extra)
    return {"path": path, "fingerprint": fp, "codes_before_prune": before, "train_img_per_s": img_per_s,
            **final, "curve": curve}
