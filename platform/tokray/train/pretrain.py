"""MTM pre-training on Ray Train: each worker reads its equal part of a Ray Data stream of token
batches, runs the MTM model on its device and steps AdamW with warmup + cosine.

Checkpoints (every ``ckpt_every`` steps and at the end) hold model, optimizer, step, the data
position (batches done in the current epoch) and the config; a restored run skips the batches
its epoch already used and continues the step count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import torch

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings of position/cls/mask (1-d or named tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token", "decoder_pos"))
         else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def total_steps(cfg, num_samples: int) -> tuple[int, int]:
    per_epoch = max(1, num_samples // cfg.batch_size)
    total = int(cfg.epochs * per_epoch) if cfg.epochs > 0 else cfg.max_steps
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    import models
    from tokray.cli import setup_logging
    from tokray.config import PretrainConfig
    from tokray.data.stream import iter_torch_batches

    setup_logging()
    cfg = PretrainConfig.from_json(config["config"])
    grid, vocab, num_samples = tuple(config["grid"]), config["vocab_size"], config["num_samples"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = models.create_model(cfg.model, grid=grid, vocab_size=vocab, **cfg.model_args)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    per_epoch, total = total_steps(cfg, num_samples)
    step = 0
    # a restart after a failure gets the run's latest checkpoint; --resume names one explicitly
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint(config["resume_from"]) if config.get("resume_from") else None)
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        if rank == 0:
            log.info("restored from checkpoint at step %d", step)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    amp = cfg.amp and device.type == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank * 104729 + step)  # masks: (seed, rank, step)
    shard = ray.train.get_dataset_shard("train")
    micro = cfg.batch_size // world // cfg.grad_accum
    t_start, seen, wait, t_log = time.perf_counter(), 0, 0.0, time.perf_counter()
    first_batch_s = None
    while step < total:
        epoch, done_in_epoch = divmod(step, per_epoch)
        batches = iter_torch_batches(shard, grid, micro, drop_last=True, shuffle_buffer=cfg.shuffle_buffer or None,
                                     seed=cfg.seed * 1000 + epoch * 10 + rank)
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            if i // cfg.grad_accum < done_in_epoch:  # resume: this epoch's first batches are done
                t0 = time.perf_counter()
                continue
            if step >= total or i // cfg.grad_accum >= per_epoch:
                break
            wait += time.perf_counter() - t0
            ids = batch["ids"].to(device, non_blocking=True)  # uint16 on the wire, int64 only here
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(ids, generator=gen)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite MTM loss {loss.item()} at step {step}; lower the lr or check the data")
            (loss / cfg.grad_accum).backward()
            seen += len(ids) * world
            if (i + 1) % cfg.grad_accum:
                t0 = time.perf_counter()
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t_start  # timed apart: includes startup
                t_start, seen, wait = time.perf_counter(), 0, 0.0
            metrics = {"step": step, "epoch": step / per_epoch, "loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                       "mask_ratio": float(out["mask_ratio"])}
            if step % cfg.log_every == 0 or step == total:
                elapsed = max(1e-9, time.perf_counter() - t_start)
                metrics.update(samples_per_s=seen / elapsed, data_wait_pct=100 * wait / elapsed,
                               first_batch_s=first_batch_s)
                if rank == 0:
                    eta = (total - step) * elapsed / max(1, seen / cfg.batch_size)
                    log.info("step %d/%d loss %.4f lr %.2e %.0f samples/s data-wait %.1f%% ETA %.0fs",
                             step, total, metrics["loss"], metrics["lr"], metrics["samples_per_s"],
                             metrics["data_wait_pct"], eta)
            if step % cfg.ckpt_every == 0 or step == total:
                _report_with_checkpoint(raw, opt, step, cfg, metrics, rank)
            elif step % cfg.log_every == 0:
                ray.train.report(metrics)
            t0 = time.perf_counter()


def _report_with_checkpoint(model, opt, step, cfg, metrics, rank) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:  # one copy of the (replicated) state
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "config": cfg.to_json()}, os.path.join(d, "state.pt"))
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(cfg.to_json())
            with open(os.path.join(d, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
