"""Train the VQ tokenizer in-process: resumable, evaluated on the fixed validation split, pruned and saved.

The result is one tokenizer file (``tokray.data.tokenizer.save_tokenizer``) whose metadata holds
the validation PSNR, codes used and the training curve.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch

import models
from tokray.data.images import ImageSource, decode_many
from tokray.data.splits import split_indices
from tokray.data.tokenizer import save_tokenizer, to_unit
from tokray.eval.metrics import entropy_bits, psnr_from_sse, squared_error_255
from tokray.fit.common import FitConfig


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(FitConfig):
    model: str = "vq_cifar_8x8"
    steps: int = 3000
    batch_size: int = 128
    min_lr: float = 5e-5


def load_split(cfg: TokenizerConfig, size: int):
    """Decoded train and validation pixels (uint8) of the source, split by the fixed seed."""
    src = ImageSource(cfg.images)
    # a capped run (smoke tests) keeps a proportional, but not tiny, validation set
    val_cap = max(16, cfg.max_images // 8) if cfg.max_images else 0
    train_idx = split_indices(src.labels, "train", cfg.val_per_class, cfg.split_seed, cfg.max_images)
    val_idx = split_indices(src.labels, "val", cfg.val_per_class, cfg.split_seed, val_cap)
    t0 = time.time()
    train, _, bad_t = decode_many(src, train_idx, size)
    valp, _, bad_v = decode_many(src, val_idx, size)
    log.info("decoded %d train + %d validation images in %.1fs (%d skipped)", len(train), len(valp),
             time.time() - t0, len(bad_t) + len(bad_v))
    return src, train, valp


@torch.no_grad()
def evaluate(model, pixels: np.ndarray, batch: int = 500) -> dict:
    """Validation PSNR (dB), codes used and bits/token of ``model`` on uint8 ``pixels``."""
    model.eval()
    sse, count, ids = 0.0, 0, []
    for s in range(0, len(pixels), batch):
        x = to_unit(pixels[s:s + batch])
        i = model.encode(x)
        sse += squared_error_255(model.decode(i), x)
        count += x.numel()
        ids.append(i.numpy())
    model.train()
    ids = np.concatenate(ids)
    return {"psnr_db": psnr_from_sse(sse, count), "codes_used": int(len(np.unique(ids))),
            "bits_per_token": entropy_bits(ids)}



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
            g["lr"] = cfg.lr_at(step)
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
