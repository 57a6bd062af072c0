"""The driver side of a training job (jobs/pretrain.py, jobs/finetune.py): recipe + flags -> one
frozen config, every check that can fail before a worker starts, then a Ray Train TorchTrainer
fed by Ray Data.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from tokray.config import TrainConfig
from tokray.recipes import describe_recipes, get_recipe

log = logging.getLogger("tokray.train.launch")


def add_train_args(p: argparse.ArgumentParser, task: str, default_recipe: str) -> None:
    p.add_argument("--recipe", default=default_recipe, help=f"default {default_recipe}; one of:\n{describe_recipes(task)}")
    p.add_argument("--model", help="override the recipe's model (see models.list_models())")
    p.add_argument("--data", help="token dataset URI (default: the embedded CIFAR-10 training tokens)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--num-workers", type=int, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    p.add_argument("--out", help="run directory (default: the recipe's, runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--smoke-test", action="store_true", help="the smoke recipe: seconds on CPU, a tiny model, 2 workers")
    p.add_argument("--trace-batches", action="store_true",
                   help="each worker appends the sample ids of every batch to <out>/trace/ (audits the data split)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N optimizer steps")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint before giving up")


def config_from_args(args: argparse.Namespace, task: str, smoke_recipe: str, extra: dict | None = None) -> TrainConfig:
    flags = {"model": args.model, "data": args.data, "epochs": args.epochs, "max_steps": args.max_steps,
             "batch_size": args.batch_size, "lr": args.lr, "num_workers": args.num_workers, "out": args.out,
             "ckpt_every": args.ckpt_every, "max_failures": args.max_failures, "trace_batches": args.trace_batches or None, **(extra or {})}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.gpu:
        overrides["use_gpu"] = True
    return get_recipe(smoke_recipe if args.smoke_test else args.recipe, task=task, **overrides)


def prepare(cfg: TrainConfig, resume: bool) -> tuple[TrainConfig, dict, str | None]:
    """Everything that can be wrong, checked on the driver: (final config, worker inputs, resume path)."""
    from tokray.assets import default_tokens
    from tokray.train.checkpoint import latest_checkpoint, load_encoder, load_state, open_training_data, require_fits_data
    from tokray.train.tasks import make_task

    if cfg.pretrain and not cfg.init:
        raise ValueError(f"recipe {cfg.recipe!r} fine-tunes an MTM checkpoint: run `python jobs/pretrain.py --recipe "
                         f"{cfg.pretrain}` first, then pass --init runs/{cfg.pretrain}")
    data_uri = cfg.data or default_tokens("train")
    data, num_samples, ds = open_training_data(data_uri)
    codebook = load_codebook(cfg, ds) if data["kind"] == "tokens" else None
    model = make_task(cfg, data, codebook).build()  # unknown models, grids the model cannot take, bad augment
    out = os.path.abspath(cfg.out)
    updates = {"out": out}
    eval_uri = cfg.eval_data or default_tokens("val")
    if cfg.task == "classify":
        ev = open_training_data(eval_uri)[0]
        if _shape(ev) != _shape(data):
            raise ValueError(f"validation data {eval_uri} ({_describe(ev)}) does not match training data {data_uri} "
                             f"({_describe(data)}); give --eval-data stored the same way")
    if cfg.init:
        state, init_cfg, init_data = load_state(cfg.init)
        init_path = os.path.abspath(cfg.init)
        require_fits_data(init_data, data, init_path, data_uri)
        report = load_encoder(model, state, cfg.model, init_path, init_cfg.model)
        log.info("fine-tuning from %s (step %s of recipe %s)", init_path, state.get("step"), init_cfg.recipe)
        log.info("checkpoint keys dropped (%d): %s", len(report["dropped"]), ", ".join(report["dropped"]) or "-")
        log.info("model keys newly initialized: %s", ", ".join(report["initialized"]))
        updates["init"] = init_path
        if cfg.pretrain and init_cfg.recipe != cfg.pretrain:
            log.warning("recipe %s expects an MTM checkpoint of recipe %s; --init is of recipe %s", cfg.recipe,
                        cfg.pretrain, init_cfg.recipe)
    elif cfg.task == "classify":
        log.info("no --init checkpoint: training %s from scratch", cfg.model)
    resume_from = latest_checkpoint(out) if resume else None
    if resume and resume_from is None:
        log.warning("--resume: no checkpoint under %s; starting from step 0", out)
    if resume_from:
        _, prev_cfg, prev_data = load_state(resume_from)
        if (prev_cfg.model, prev_cfg.model_args) != (cfg.model, cfg.model_args):
            raise ValueError(f"--resume: checkpoint {resume_from} holds {prev_cfg.model} {prev_cfg.model_args}, but this "
                             f"run builds {cfg.model} {cfg.model_args}; use another --out or the checkpoint's recipe")
        require_fits_data(prev_data, data, resume_from, data_uri)
    cfg = dataclasses.replace(cfg, **updates)
    inputs = {"config": cfg.to_json(), "data": data, "num_samples": num_samples, "resume_from": resume_from,
              "codebook": codebook, "data_uri": data_uri, "eval_uri": eval_uri}
    return cfg, inputs, resume_from


def _shape(d: dict) -> tuple:
    return d["kind"], tuple(d["grid"]), d["codebook_size"], d.get("quality"), list(d["class_names"])


def _describe(d: dict) -> str:
    what = f"{d['grid'][0]}px JPEG q{d['quality']}" if d["kind"] == "pixels" else \
        f"{d['grid'][0]}x{d['grid'][1]} grid, {d['codebook_size']} codes"
    return f"{d['kind']}: {what}, {len(d['class_names'])} classes"


def load_codebook(cfg: TrainConfig, ds):
    """The codebook [V, C] behind a dataset's ids, when the recipe augments tokens or feeds codebook vectors:
    the dataset's own ``codebook.safetensors`` (SeiT imports), else its tokenizer's (checked by fingerprint)."""
    if not (cfg.augment or cfg.codebook_stem):
        return None
    import safetensors.torch

    from tokray.assets import default_tokenizer
    from tokray.data.seit_import import CODEBOOK_FILE
    from tokray.data.tokenize import require_same_tokenizer
    from tokray.train.tokenizer import load_tokenizer

    if CODEBOOK_FILE in ds.manifest.files:
        return safetensors.torch.load(ds.read_file(CODEBOOK_FILE))["codebook"].float()
    tokenizer, info = load_tokenizer(cfg.tokenizer or default_tokenizer())
    require_same_tokenizer(ds.meta, info["fingerprint"], where=f"dataset {ds.uri}")
    return tokenizer.quantizer.codebook.detach().clone()


def _data_config():
    """Train split across workers (validation read whole by each); the same batches in the same order on every
    pass, wherever the blocks live, so a restore that skips an epoch's first batches skips the right ones."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options, enable_shard_locality=False)


def fit(cfg: TrainConfig, inputs: dict, callbacks: list | None = None):
    """Run the TorchTrainer (``callbacks``: Ray Train user callbacks, e.g. Tune's report callback); returns
    its Result. A non-finite loss on a worker re-raises as FloatingPointError."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from tokray.cli import init_ray
    from tokray.storage.raysource import read_ray_dataset
    from tokray.train.loop import train_loop_per_worker

    os.makedirs(cfg.out, exist_ok=True)
    print(cfg.to_json(), flush=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        f.write(cfg.to_json())
    init_ray()
    # token sets are small: read (and verify) once, then every epoch streams from the object store. Stores
    # keep samples in source order (often sorted by class): one seeded global shuffle here, while the CPUs
    # are free, and each epoch adds its own local shuffle; the order stays reproducible for --resume
    read = read_ray_dataset
    if inputs["data"]["kind"] == "pixels":
        from tokray.data.pixels import read_pixel_ray_dataset as read
    datasets = {"train": read(inputs["data_uri"]).random_shuffle(seed=cfg.seed).materialize()}
    if cfg.task == "classify":
        datasets["val"] = read(inputs["eval_uri"]).materialize()
    worker_inputs = {k: inputs[k] for k in ("config", "data", "num_samples", "resume_from", "codebook")}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=worker_inputs,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(name=cfg.recipe, storage_path=os.path.join(cfg.out, "ray"), callbacks=callbacks,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets=datasets, dataset_config=_data_config())
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as e:
        for failure in e.worker_failures.values():
            cause = getattr(failure, "cause", None) or failure
            line = next((ln for ln in str(cause).splitlines() if "non-finite" in ln), None)
            if line:  # the worker's message, without its traceback
                raise FloatingPointError(line.split("FloatingPointError:")[-1].strip()) from None
        raise
