"""The Ray Train worker loop, shared by MTM pre-training and fine-tuning.

Each worker receives the driver's RunPlan (tokray.train.plan), reads its equal part of a Ray Data
stream of token (or pixel) batches, runs the task on its device and steps AdamW with per-step warmup
+ cosine (times each group's layer-decay scale). Checkpoints (tokray.train.checkpoint; every
``ckpt_every`` steps and at the end) hold model, optimizer, (EMA), step, config and the dataset's
DataSpec; the data position is the step within its epoch, so a restored run skips
the batches its epoch already used and continues the step count. Classification measures top-1 on
the (unsplit) validation stream at every epoch end, each rank scoring the samples whose id % world
is its rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch

from tokray.seeds import derive_seed
from tokray.train.plan import DataPosition, NonFiniteLoss, RunPlan
from tokray.train.schedule import lr_at

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where rank 0 logs besides TensorBoard (the driver's ``tracking_from_args``): params = the frozen config,
    flattened (``augment.noise_prob``); metrics = exactly what ``ray.train.report`` reports, at its steps."""

    mlflow_uri: str = ""  # MLflow tracking URI ("" = off)
    mlflow_experiment: str = "tokray"
    mlflow_experiment_id: str = ""  # made (or found) by the driver, so workers never race to create it
    mlflow_allow_file_store: bool = False  # the driver's MLFLOW_ALLOW_FILE_STORE (MLflow 3: file stores are opt-in)
    wandb: bool = False  # W&B (the worker reads WANDB_API_KEY from its environment)
    wandb_project: str = "tokray"


def flat_config(cfg) -> dict:
    """The config as one level of dotted keys (what MLflow and W&B show as params)."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{sub}": val for sub, val in v.items()} or {k: "{}"})
        else:
            out[k] = v
    return out


class _Trackers:
    """MLflow (Ray's ``setup_mlflow``) and W&B (Ray's ``setup_wandb``) on rank 0; each (re)start of the worker
    group opens one run, tagged with the run dir and its first step."""

    def __init__(self, tracking: Tracking | None, cfg, rank: int, start_step: int):
        self.mlflow = self.wandb = None
        if tracking is None or rank != 0:
            return
        params = flat_config(cfg)
        name = os.path.basename(cfg.out.rstrip("/")) or cfg.recipe
        tags = {"tokray.recipe": cfg.recipe, "tokray.out": cfg.out, "tokray.start_step": str(start_step)}
        if tracking.mlflow_uri:
            from ray.air.integrations.mlflow import setup_mlflow

            if tracking.mlflow_allow_file_store:  # what the driver allowed when it opened the store
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            self.mlflow = setup_mlflow(params, tracking_uri=tracking.mlflow_uri, run_name=name, tags=tags,
                                       experiment_id=tracking.mlflow_experiment_id or None,
                                       experiment_name=tracking.mlflow_experiment, create_experiment_if_not_exists=True)
            log.info("MLflow: run %s in experiment %r at %s", self.mlflow.active_run().info.run_id,
                     tracking.mlflow_experiment, tracking.mlflow_uri)
        if tracking.wandb:
            from ray.air.integrations.wandb import setup_wandb

            self.wandb = setup_wandb(params, project=tracking.wandb_project, name=name, tags=[cfg.recipe],
                                     rank_zero_only=False)

    def log(self, metrics: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


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
    """``config``: {"plan": the driver's RunPlan, "ingest": its tokray.data.ingest.Ingest, "tracking": a Tracking
    or None}."""
    import ray.data
    import ray.train
    import ray.train.torch

    from tokray.devices import bf16_autocast_pays
    from tokray.runtime import setup_logging
    from tokray.train.checkpoint import load_encoder, load_state, newest, restore, save_and_report
    from tokray.train.tasks import make_task

    setup_logging()
    plan: RunPlan = config["plan"]
    ingest = config["ingest"]
    cfg = plan.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    np.random.seed(derive_seed(cfg.seed, "numpy", rank) % 2**32)  # timm's Mixup draws from NumPy's global generator
    device = ray.train.torch.get_device()
    task = make_task(cfg, plan.data, plan.codebook)
    model = task.build()
    if cfg.init:  # the driver checked the fit and named the dropped keys
        load_encoder(model, load_state(cfg.init)[0], cfg.model, cfg.init)
    opt = torch.optim.AdamW(task.param_groups(model), lr=cfg.lr, betas=tuple(cfg.betas))
    ema = _make_ema(model, cfg.ema_decay)
    per_epoch, total = plan.steps
    order = ingest.order
    step, position = 0, DataPosition(0, 0)
    # a restart after a failure gets the run's latest reported checkpoint, --resume the newest on disk: the later
    ckpt = newest(ray.train.get_checkpoint(), ray.train.Checkpoint(plan.resume_from) if plan.resume_from else None)
    if ckpt:
        step, position = restore(ckpt, model, opt, ema)
        if position is None:  # a checkpoint from before positions were stored: the step within its epoch
            epoch, done = divmod(step, per_epoch)
            position = DataPosition(epoch, done * cfg.batch_size)
        if rank == 0:
            log.info("restored from checkpoint at step %d: epoch %d, %d samples of it consumed (%d workers now)",
                     step, position.epoch, position.samples, world)
    model.to(device)
    task.to(device)
    if ema is not None:
        ema.module.to(device)
    model = ray.train.torch.prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    amp = cfg.amp and bf16_autocast_pays(device)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "masks", rank, step))  # masks, augmentation
    val = ray.train.get_dataset_shard("val") if cfg.task == "classify" else None
    tb = _tensorboard(cfg.out) if rank == 0 else None
    ray.data.DataContext.get_current().enable_progress_bars = False  # the training log stays readable
    trackers = _Trackers(config.get("tracking"), cfg, rank, step)
    micro = cfg.batch_size // world // cfg.grad_accum
    trace = _batch_trace(cfg.out, rank, step) if cfg.trace_batches else None
    prog = _Progress()
    final_epoch = (total - 1) // order.steps_per_epoch
    while step < total:
        # this rank's slice of every global batch from the position on (nothing before it is read), through
        # the epochs one stream covers: epoch boundaries fall between batches (epochs are whole global batches)
        stream = ingest.dataset(position.epoch, position.samples, rank, world,
                                ingest.stream_end(position.epoch, final_epoch))
        batches = task.iter_batches(stream, micro, drop_last=True)
        t0, stream_start_step = time.perf_counter(), step
        for i, batch in enumerate(batches):
            if step >= total:
                break
            prog.wait += time.perf_counter() - t0
            if trace is not None:
                trace.write(json.dumps({"step": step, "epoch": position.epoch, "position": position.samples,
                                        "rank": rank, "world": world, "pid": os.getpid(),
                                        "sample_ids": batch["sample_id"].tolist()}) + "\n")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, extra = task.loss(model, batch, device, gen)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(step, loss.item(), cfg.task, opt.param_groups[0]["lr"])
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
            position = position.advanced(cfg.batch_size, order.used_per_epoch)
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
            val_due = step % cfg.val_every == 0 if cfg.val_every else position.samples == 0
            if val is not None and (val_due or step == total):
                score = lambda m, b: task.top1(m, b, device, rank, world)  # noqa: E731
                metrics.update(_validate(raw, ema, lambda: task.iter_batches(val, micro), score))
                if rank == 0:
                    log.info("epoch %.2f: val top-1 %.2f%%%s", step / per_epoch, metrics["val_top1"],
                             f" (EMA {metrics['val_top1_ema']:.2f}%)" if "val_top1_ema" in metrics else "")
            _write_tensorboard(tb, metrics, step, logged)
            if step % cfg.ckpt_every == 0 or step == total or "val_top1" in metrics:
                save_and_report(raw, opt, ema, step, position, plan, metrics, rank)
                trackers.log(metrics, step)
            elif logged:
                ray.train.report(metrics)
                trackers.log(metrics, step)
            t0 = time.perf_counter()
        if step == stream_start_step:  # would loop forever: the order promised batches the stream did not give
            raise RuntimeError(f"rank {rank}: epoch {position.epoch} from sample {position.samples} gave no batch of "
                               f"{micro}; the dataset at {ingest.uri} changed under the run?")
    for f in (tb, trace):
        if f is not None:
            f.close()
    trackers.close()


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

