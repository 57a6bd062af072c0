"""The Ray Train worker loop, shared by MTM pre-training and fine-tuning.

Each worker reads its equal part of a Ray Data stream of token batches, runs the task on its
device and steps AdamW with per-step warmup + cosine (times each group's layer-decay scale).
Checkpoints (every ``ckpt_every`` steps and at the end) hold model, optimizer, (EMA), step, config
and the dataset summary; the data position is the step within its epoch, so a restored run skips
the batches its epoch already used and continues the step count. Classification measures top-1 on
the (unsplit) validation stream at every epoch end, each rank taking every world-th batch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import numpy as np
import torch

from tokray.train.schedule import warmup_cosine

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, cfg) -> float:
    return warmup_cosine(step, total, cfg.lr, cfg.min_lr, cfg.warmup_steps)


def total_steps(cfg, num_samples: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps in the run)."""
    per_epoch = max(1, num_samples // cfg.batch_size)
    total = int(cfg.epochs * per_epoch) if cfg.epochs > 0 else cfg.max_steps
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


class _Progress:
    """Throughput, data-wait share and ETA since the first step (which also pays for start-up)."""

    def __init__(self):
        self.t_start, self.seen, self.wait, self.first_step_s = time.perf_counter(), 0, 0.0, None

    def stepped(self):
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.t_start
            self.t_start, self.seen, self.wait = time.perf_counter(), 0, 0.0

    def figures(self, step: int, total: int, batch_size: int) -> dict:
        elapsed = max(1e-9, time.perf_counter() - self.t_start)
        return {"samples_per_s": self.seen / elapsed, "data_wait_pct": 100 * self.wait / elapsed,
                "first_step_s": self.first_step_s,
                "eta_s": (total - step) * elapsed / max(1e-9, self.seen / batch_size)}


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from tokray.cli import setup_logging
    from tokray.config import TrainConfig
    from tokray.train.checkpoint import load_encoder, load_state
    from tokray.train.tasks import eval_view, make_task, top1

    setup_logging()
    cfg = TrainConfig.from_json(config["config"])
    data, num_samples = config["data"], config["num_samples"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed * 1000 + rank)  # timm's Mixup draws from NumPy's global generator
    device = ray.train.torch.get_device()
    task = make_task(cfg, data, config.get("codebook"))
    model = task.build()
    if cfg.init:  # the driver checked the fit and named the dropped keys
        load_encoder(model, load_state(cfg.init)[0], cfg.model, cfg.init)
    opt = torch.optim.AdamW(task.param_groups(model), lr=cfg.lr, betas=tuple(cfg.betas))
    ema = _make_ema(model, cfg.ema_decay)
    per_epoch, total = total_steps(cfg, num_samples)
    step = 0
    # a restart after a failure gets the run's latest checkpoint; --resume names one explicitly
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint(config["resume_from"]) if config.get("resume_from") else None)
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        step = int(state["step"])
        if rank == 0:
            log.info("restored from checkpoint at step %d", step)
    model.to(device)
    task.to(device)
    if ema is not None:
        ema.module.to(device)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    amp = cfg.amp and device.type == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank * 104729 + step)  # masks: (seed, rank, step)
    shard = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val") if cfg.task == "classify" else None
    tb = _tensorboard(cfg.out) if rank == 0 else None
    micro = cfg.batch_size // world // cfg.grad_accum
    trace = _batch_trace(cfg.out, rank, step) if cfg.trace_batches else None
    prog = _Progress()
    while step < total:
        epoch, done_in_epoch = divmod(step, per_epoch)
        batches = task.iter_batches(shard, micro, drop_last=True, shuffle_buffer=cfg.shuffle_buffer or None,
                                    seed=cfg.seed * 1000 + epoch * 10 + rank)
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            if i // cfg.grad_accum < done_in_epoch:  # resume: this epoch's first batches are done
                t0 = time.perf_counter()
                continue
            if step >= total or i // cfg.grad_accum >= per_epoch:
                break
            prog.wait += time.perf_counter() - t0
            if trace is not None:
                trace.write(json.dumps({"step": step, "epoch": epoch, "rank": rank, "world": world,
                                        "sample_ids": batch["sample_id"].tolist()}) + "\n")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, extra = task.loss(model, batch, device, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite {cfg.task} loss ({loss.item()}) at step {step}; "
                                         f"lower the lr (now {opt.param_groups[0]['lr']:.2e}) or check the data")
            (loss / cfg.grad_accum).backward()
            prog.seen += len(batch["label"]) * world
            if (i + 1) % cfg.grad_accum:
                t0 = time.perf_counter()
                continue
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(raw, step=step)
            prog.stepped()
            metrics = {"step": step, "epoch": step / per_epoch, "loss": loss.item(), "lr": lr, **extra}
            logged = step % cfg.log_every == 0 or step == total
            if logged:
                metrics.update(prog.figures(step, total, cfg.batch_size))
                if rank == 0:
                    log.info("step %d/%d loss %.4f lr %.2e %.0f samples/s data-wait %.1f%% ETA %.0fs", step, total,
                             metrics["loss"], lr, metrics["samples_per_s"], metrics["data_wait_pct"], metrics["eta_s"])
            if val is not None and (step % per_epoch == 0 or step == total):
                view = (lambda x: eval_view(cfg, x)) if task.input_key == "ids" else None
                score = lambda m, b: top1(m, b, device, rank, world, view=view, key=task.input_key)  # noqa: E731
                metrics.update(_validate(raw, ema, lambda: task.iter_batches(val, micro), score))
                if rank == 0:
                    log.info("epoch %.2f: val top-1 %.2f%%%s", step / per_epoch, metrics["val_top1"],
                             f" (EMA {metrics['val_top1_ema']:.2f}%)" if "val_top1_ema" in metrics else "")
            _write_tensorboard(tb, metrics, step, logged)
            if step % cfg.ckpt_every == 0 or step == total or "val_top1" in metrics:
                _report_with_checkpoint(raw, opt, ema, step, config, metrics, rank)
            elif logged:
                ray.train.report(metrics)
            t0 = time.perf_counter()
    for f in (tb, trace):
        if f is not None:
            f.close()


def _batch_trace(out: str, rank: int, step: int):
    """<out>/trace/rank<r>-from<step>.jsonl, line-buffered: one file per rank and (re)start."""
    import ray

    os.makedirs(os.path.join(out, "trace"), exist_ok=True)
    node = ray.get_runtime_context().get_node_id()[:8]
    return open(os.path.join(out, "trace", f"rank{rank}-from{step}-{node}.jsonl"), "a", buffering=1)


def _make_ema(model, decay: float):
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def _validate(model, ema, val_batches, score) -> dict:
    """val_batches() -> a fresh pass over the validation stream."""
    out = {}
    for key, m in (("val_top1", model), ("val_top1_ema", ema.module if ema is not None else None)):
        if m is not None:
            correct, seen = score(m, val_batches())
            out[key], out["val_samples"] = 100.0 * correct / max(1, seen), seen
    return out


def _tensorboard(out: str):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(out, "tb"))


def _write_tensorboard(tb, metrics: dict, step: int, logged: bool) -> None:
    if tb is None:
        return
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and k != "step" and (logged or k.startswith("val_")):
            tb.add_scalar(k if k.startswith("val_") else f"train/{k}", v, step)
    if logged:
        tb.flush()


def _report_with_checkpoint(model, opt, ema, step, config, metrics, rank) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:  # one copy of the (replicated) state
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "config": config["config"],
                     "data": config["data"]}
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            torch.save(state, os.path.join(d, "state.pt"))
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(config["config"])
            with open(os.path.join(d, "metrics.json"), "w") as f:
                json.dump(metrics, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
