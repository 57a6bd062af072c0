"""Train TokenAdapt (f, g) in-process from pixels and a tokenizer.

For an image x with tokens z = tokenizer(x), draw one geometric view A in normalized coordinates
(flip, affine group, random-resized crop; ``GeometrySpec``) and apply it to x (32x32 output) and
to f(z) (16x16 output for an 8x8 grid); the target is tokenizer(A(x)) and the loss is
CE(g(A(f(z))), target). SeiT++ publishes no training code for f and g: this procedure is our
reconstruction (method digest section 5.3). Progress is measured as token agreement
(``tokray.eval.agreement``) on held-out images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import models
from tokray.augment.geometry import GeometrySpec, warp
from tokray.augment.ops import embed
from tokray.augment.tokenadapt import load_tokenadapt, save_tokenadapt, tokenadapt_logits
from tokray.data.tokenizer import load_tokenizer, require_can, to_unit
from tokray.eval.agreement import agreement
from tokray.fit.tokenizer import load_split
from tokray.fit.common import FitConfig


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenAdaptConfig(FitConfig):
    tokenizer: str = ""  # a load_tokenizer spec (PATH.safetensors, diffusers:PATH); "" = the embedded CIFAR-10 one
    tokens: str = ""  # a token dataset: train for its ids (the pruned view when it was pruned from the tokenizer)
    model: str = "tokenadapt_cifar"
    steps: int = 2000
    lr: float = 2e-3
    weight_decay: float = 0.05
    # the training view A: flip, then the affine group, then a random-resized crop
    flip_prob: float = 0.5
    affine_prob: float = 0.5
    crop_prob: float = 0.5
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    eval_images: int = 1000  # validation images for the periodic agreement (the final one uses all)
    ckpt_every: int = 100

    positive = FitConfig.positive + ("eval_images",)

    def __post_init__(self):
        super().__post_init__()
        self.geometry()

    def geometry(self) -> GeometrySpec:
        return GeometrySpec(flip_prob=self.flip_prob, affine_prob=self.affine_prob, crop_prob=self.crop_prob,
                            crop_scale=tuple(self.crop_scale), crop_ratio=tuple(self.crop_ratio))



def load_pixels(cfg: TokenAdaptConfig, size: int):
    """Decoded train and validation pixels (uint8) of the source, split by the fixed seed (as for the tokenizer)."""
    return load_split(cfg, size)[1:]


def _encode_all(tokenizer, pixels: np.ndarray, batch: int = 0) -> torch.Tensor:
    batch = batch or max(1, 1000 * 32 * 32 // tokenizer.image_size ** 2)  # 1000 at 32x32, 15 at 256x256
    with torch.no_grad():
        return torch.cat([tokenizer.encode(to_unit(pixels[s:s + batch])).cpu() for s in range(0, len(pixels), batch)])


def _source_ids(cfg: TokenAdaptConfig, tokenizer, fingerprint: str, train_px: np.ndarray) -> torch.Tensor:
    """tokenizer(x) of every training image, cached in the run directory (a resume skips the work)."""
    path = os.path.join(cfg.out_dir, "source_ids.pt")
    key = json.dumps([fingerprint, os.path.basename(cfg.images.rstrip("/")), int(len(train_px)), cfg.val_per_class,
                      cfg.split_seed, cfg.max_images])
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["key"] == key:
            return state["ids"].long()
    t0 = time.time()
    ids = _encode_all(tokenizer, train_px)
    log.info("tokenized %d training images in %.1fs", len(train_px), time.time() - t0)
    torch.save({"key": key, "ids": ids.to(torch.int16 if tokenizer.codebook_size < 2**15 else torch.int32)},
               path + ".tmp")
    os.replace(path + ".tmp", path)
    return ids


def _table(res: dict) -> str:
    return ", ".join(f"{k} {v['naive']:.3f}->{v['tokenadapt']:.3f}" for k, v in res.items())


def train(cfg: TokenAdaptConfig, resume: bool = True, progress: bool = True) -> dict:
    """Train (resuming from ``<out>/last.pt``), save ``<out>/tokenadapt.safetensors``, report agreement."""
    from tqdm import tqdm

    if not cfg.tokenizer:
        from tokray.assets import default_tokenizer
        cfg = dataclasses.replace(cfg, tokenizer=default_tokenizer())
    tokenizer, tok_info = load_tokenizer(cfg.tokenizer, for_dataset=cfg.tokens or None)
    require_can(tokenizer, "encode", "TokenAdapt training (targets are tokenizer(A(x)))")
    log.info("tokenizer: %s", tokenizer.describe())
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    codebook = tokenizer.codebook
    model_args = {"vocab_size": int(codebook.shape[0]), "token_dim": int(codebook.shape[1]),
                  "grid": tuple(tokenizer.grid), "out_grid": tuple(tokenizer.grid), **cfg.model_args}
    model = models.create_model(cfg.model, **model_args)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    ckpt_path = os.path.join(cfg.out_dir, "last.pt")
    step, curve, seconds = 0, [], 0.0
    if resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["tokenizer"] != tok_info["fingerprint"]:
            raise ValueError(f"checkpoint {ckpt_path} was trained with tokenizer {state['tokenizer']}, this run uses "
                             f"{tok_info['fingerprint']}; use another --out or --no-resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, curve, seconds = int(state["step"]), json.loads(state["curve"]), float(state["seconds"])
        log.info("resumed from %s at step %d", ckpt_path, step)
    size = tokenizer.image_size
    train_px, val_px = load_pixels(cfg, size)
    source_ids = _source_ids(cfg, tokenizer, tok_info["fingerprint"], train_px)
    data = torch.from_numpy(train_px)
    eval_px = val_px[np.linspace(0, len(val_px) - 1, min(cfg.eval_images, len(val_px))).astype(int)]
    geometry = cfg.geometry()
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + step)
    model.train()
    t_start, seen = time.time(), 0
    bar = tqdm(total=cfg.steps, initial=step, desc="tokenadapt", unit="step", disable=not progress)
    while step < cfg.steps:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x = to_unit(data[idx])
        theta = geometry.sample(len(x), gen)
        with torch.no_grad():
            target = tokenizer.encode(warp(x, theta, (size, size)).clamp(-1, 1))
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        logits = tokenadapt_logits(model, embed(source_ids[idx], codebook), theta, tokenizer.grid)
        loss = F.cross_entropy(logits, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite TokenAdapt loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += len(x)
        elapsed = time.time() - t_start
        bar.update(1)
        acc = (logits.argmax(1) == target).float().mean().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", lr=f"{cfg.lr_at(step - 1):.2e}",
                        img_s=f"{seen / max(elapsed, 1e-9):.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            res = agreement(tokenizer, model, eval_px, psnr=False)
            curve.append({"step": step, "seconds": round(seconds + elapsed, 1), "loss": round(loss.item(), 4),
                          **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("naive", "tokenadapt")}})
            log.info("step %d: loss %.3f; agreement naive->TokenAdapt on %d held-out images: %s; %.0f img/s",
                     step, loss.item(), len(eval_px), _table(res), seen / max(elapsed, 1e-9))
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            tmp = ckpt_path + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "curve": json.dumps(curve),
                        "seconds": seconds + time.time() - t_start, "tokenizer": tok_info["fingerprint"]}, tmp)
            os.replace(tmp, ckpt_path)
    bar.close()
    total_seconds = seconds + time.time() - t_start
    model.eval()
    with torch.no_grad():  # measure exactly what the file will hold: float16 weights
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    final = agreement(tokenizer, model, val_px, psnr=False)  # PSNRs: jobs/evaluate_augment.py
    log.info("final agreement naive->TokenAdapt on %d held-out images: %s", len(val_px), _table(final))
    path = os.path.join(cfg.out_dir, "tokenadapt.safetensors")
    extra = {"images": os.path.basename(cfg.images.rstrip("/")), "steps": cfg.steps, "batch_size": cfg.batch_size,
             "train_seconds": round(total_seconds, 1), "geometry": dataclasses.asdict(geometry),
             "agreement": final, "val_images": int(len(val_px)), "curve": curve}
    fp = save_tokenadapt(model, cfg.model, {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()},
                         path, tok_info["fingerprint"], extra)
    load_tokenadapt(path, tok_info["fingerprint"])  # the file reads back and verifies
    return {"path": path, "fingerprint": fp, "tokenizer": tok_info["fingerprint"], "steps": step,
            "train_seconds": total_seconds, "val_images": int(len(val_px)), "bytes": os.path.getsize(path),
            "parameters": sum(p.numel() for p in model.parameters()), "agreement": final, "curve": curve}
