"""The driver side of a training job (jobs/pretrain.py, jobs/finetune.py): recipe + flags -> one
frozen config; ``prepare`` runs every check that can fail before a worker starts and returns a
RunPlan; ``fit`` runs it on a Ray Train TorchTrainer fed by Ray Data.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil

from tokray.config import TrainConfig
from tokray.data.spec import DataSpec
from tokray.recipes import describe_recipes, get_recipe
from tokray.train.plan import RunPlan, find_non_finite_loss

log = logging.getLogger(__name__)


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
    p.add_argument("--ingest", choices=("auto", "stream", "materialize"),
                   help="how workers read the training set: stream it from the store each epoch (bounded memory), "
                        "materialize it once in Ray's object store, or auto (materialize when it fits "
                        "materialize_fraction of the object store); the sample order is the same in both")
    p.add_argument("--out", help="run directory (default: the recipe's, runs/<recipe>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds checkpoints (they are deleted)")
    p.add_argument("--smoke-test", action="store_true", help="the smoke recipe: seconds on CPU, a tiny model, 2 workers")
    p.add_argument("--trace-batches", action="store_true",
                   help="each worker appends the sample ids of every batch to <out>/trace/ (audits the data split)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N optimizer steps")
    p.add_argument("--max-failures", type=int, help="worker-group restarts from the latest checkpoint before giving up")
    add_override_args(p)
    add_tracking_args(p)


def add_override_args(p: argparse.ArgumentParser) -> None:
    """--config FILE.yaml and --set KEY=VALUE: any TrainConfig / AugmentConfig field (tokray.overrides)."""
    p.add_argument("--config", action="append", default=[], metavar="FILE.yaml", dest="config_files",
                   help="YAML mapping of config overrides (nested augment: / model_args: mappings, or dotted keys; a "
                        "saved config.json works too); repeatable, later files win")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="set one config field: a TrainConfig field (lr=1e-3), augment.<field> "
                        "(augment.coloradapt_prob=0.5) or model_args.<key> (model_args.embed_dim=64); values are "
                        "YAML (lists: rrc_scale=[0.35,1.0]); repeatable. Precedence: recipe < --config < the named "
                        "flags above < --set")


def add_tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow", metavar="URI",
                   help="also log params (the config) and metrics to MLflow at this tracking URI "
                        "(sqlite:////abs/mlflow.db, http://host:5000; file:///abs/mlruns with "
                        "MLFLOW_ALLOW_FILE_STORE=true), through Ray's setup_mlflow; experiment $MLFLOW_EXPERIMENT_NAME or 'tokray'. "
                        "W&B: set WANDB_API_KEY (project $WANDB_PROJECT or 'tokray')")


def config_from_args(args: argparse.Namespace, task: str, smoke_recipe: str, extra: dict | None = None) -> TrainConfig:
    """The recipe, then --config files, then the named flags (and ``extra``: a job's own), then --set, applied at
    once and validated as a whole."""
    from tokray.overrides import apply_overrides, load_config_file, parse_set

    flags = {"model": args.model, "data": args.data, "epochs": args.epochs, "max_steps": args.max_steps,
             "batch_size": args.batch_size, "lr": args.lr, "num_workers": args.num_workers, "out": args.out,
             "ckpt_every": args.ckpt_every, "max_failures": args.max_failures,
             "trace_batches": args.trace_batches or None, "ingest": getattr(args, "ingest", None),
             "use_gpu": args.gpu or None, **(extra or {})}
    overrides = [o for path in getattr(args, "config_files", None) or () for o in load_config_file(path)]
    overrides += [(k, v, "flags") for k, v in flags.items() if v is not None]
    overrides += parse_set(getattr(args, "overrides", None) or ())
    cfg = get_recipe(smoke_recipe if args.smoke_test else args.recipe, task=task)
    return apply_overrides(cfg, overrides)


def tracking_from_args(args: argparse.Namespace):
    """What the workers log to beside TensorBoard (tokray.train.loop.Tracking), or None: --mlflow URI, and W&B
    when WANDB_API_KEY is set (and wandb installed)."""
    from tokray.train.loop import Tracking

    mlflow_uri = getattr(args, "mlflow", None) or ""
    wandb = bool(os.environ.get("WANDB_API_KEY"))
    if wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            log.warning("WANDB_API_KEY is set but wandb is not installed (pip install wandb): not logging to W&B")
            wandb = False
    if mlflow_uri and "://" not in mlflow_uri:  # a local path: MLflow's file store wants it absolute
        mlflow_uri = "file://" + os.path.abspath(mlflow_uri)
    if not (mlflow_uri or wandb):
        return None
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "tokray"
    return Tracking(mlflow_uri=mlflow_uri, mlflow_experiment=experiment,
                    mlflow_experiment_id=_mlflow_experiment(mlflow_uri, experiment) if mlflow_uri else "",
                    mlflow_allow_file_store=os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"),
                    wandb=wandb, wandb_project=os.environ.get("WANDB_PROJECT") or "tokray")


def _mlflow_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` at ``uri``, created if new: the store is reached (and refused) here, on the
    driver, before any worker starts."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else client.create_experiment(name)
    except Exception as e:  # MlflowException, connection and sqlalchemy errors: one line naming the URI
        why = " ".join(str(e).split())[:300]
        hint = (" MLflow 3 keeps file stores read-only by default: use a database store (--mlflow sqlite:////abs/"
                "mlflow.db) or set MLFLOW_ALLOW_FILE_STORE=true." if uri.startswith("file:") else "")
        raise ValueError(f"--mlflow {uri}: cannot open the tracking store ({type(e).__name__}: {why}).{hint}") from None


def claim_run_dir(out: str, resume: bool, overwrite: bool) -> None:
    """A run directory holding checkpoints is continued (--resume) or restarted (--overwrite), never reused
    silently: Ray Train would restore its last run and report the old result."""
    from tokray.train.checkpoint import latest_checkpoint

    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it; pass one of them")
    held = latest_checkpoint(out) or (os.path.isdir(os.path.join(out, "ray")) and os.listdir(os.path.join(out, "ray")))
    if held and overwrite:
        for sub in ("ray", "trace", "tb"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        log.info("--overwrite: removed the earlier run's checkpoints, traces and events under %s", out)
    elif held and not resume:
        raise FileExistsError(f"{out} already holds a training run ({latest_checkpoint(out) or 'its Ray state'}); pass "
                              "--resume to continue it, --overwrite to start again, or another --out")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror or e}); choose a writable directory") from None


def prepare(cfg: TrainConfig, resume: bool, overwrite: bool = False) -> RunPlan:
    """Everything that can be wrong, checked on the driver, before a worker starts: the datasets (each
    manifest read once), the model (built once: unknown models, grids it cannot take, bad augmentation),
    the --init checkpoint (loaded into it) and the --resume point. Returns the plan the workers run."""
    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset
    from tokray.train.checkpoint import latest_checkpoint, load_encoder, load_state, require_fits_data
    from tokray.train.tasks import make_task

    if cfg.pretrain and not cfg.init:
        raise ValueError(f"recipe {cfg.recipe!r} fine-tunes an MTM checkpoint: run `python jobs/pretrain.py --recipe "
                         f"{cfg.pretrain}` first, then pass --init runs/{cfg.pretrain}")
    data_uri = cfg.data or default_tokens("train")
    ds = open_dataset(data_uri)
    spec = DataSpec.from_manifest(ds.manifest)
    require_model_for_task(cfg)
    codebook = load_codebook(cfg, ds) if spec.is_tokens else None
    model = make_task(cfg, spec, codebook).build()
    if spec.num_samples < cfg.batch_size:  # an epoch of no full batch would never end
        raise ValueError(f"dataset {data_uri} has {spec.num_samples} samples, fewer than one batch of {cfg.batch_size}; "
                         "give more data or a smaller --batch-size")
    out = os.path.abspath(cfg.out)
    claim_run_dir(out, resume, overwrite)
    updates = {"out": out}
    eval_uri, eval_spec = "", None
    if cfg.task == "classify":
        eval_uri = cfg.eval_data or default_tokens("val")
        eval_spec = DataSpec.from_manifest(open_dataset(eval_uri).manifest)
        if eval_spec.layout() != spec.layout():
            raise ValueError(f"validation data {eval_uri} ({eval_spec.describe()}) does not match training data "
                             f"{data_uri} ({spec.describe()}); give --eval-data stored the same way")
    if cfg.init:
        state, init_cfg, init_spec = load_state(cfg.init)
        init_path = os.path.abspath(cfg.init)
        require_fits_data(init_spec, spec, init_path, data_uri)
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
        _, prev_cfg, prev_spec = load_state(resume_from)
        if (prev_cfg.model, prev_cfg.model_args) != (cfg.model, cfg.model_args):
            raise ValueError(f"--resume: checkpoint {resume_from} holds {prev_cfg.model} {prev_cfg.model_args}, but this "
                             f"run builds {cfg.model} {cfg.model_args}; use another --out or the checkpoint's recipe")
        require_fits_data(prev_spec, spec, resume_from, data_uri)
    return RunPlan(config=dataclasses.replace(cfg, **updates), data=spec, data_uri=data_uri, eval_data=eval_spec,
                   eval_uri=eval_uri, resume_from=resume_from, codebook=codebook)


def require_model_for_task(cfg: TrainConfig) -> None:
    """MTM trains an ``mtm_*`` model (encoder + decoder); classification any other."""
    import models

    mtm = cfg.model.startswith("mtm_")
    if (cfg.task == "mtm") != mtm:
        fitting = [m for m in models.list_models() if m.startswith("mtm_") == (cfg.task == "mtm")
                   and not m.startswith(("vq_", "tokenadapt"))]
        raise ValueError(f"model {cfg.model!r} does not fit task {cfg.task!r} (recipe {cfg.recipe}); choose one of: "
                         f"{', '.join(fitting)}")


def load_codebook(cfg: TrainConfig, ds):
    """The codebook [V, C] behind a token dataset's ids, when the recipe augments tokens or feeds codebook
    vectors: the dataset's own ``codebook.safetensors`` (SeiT imports), else its tokenizer's (checked by
    fingerprint)."""
    if not (cfg.augment.enabled or cfg.codebook_stem):
        return None
    import safetensors.torch

    from tokray.assets import default_tokenizer
    from tokray.data.seit_import import CODEBOOK_FILE
    from tokray.data.tokenizer import load_tokenizer, require_same_tokenizer

    if CODEBOOK_FILE in ds.manifest.files:
        return safetensors.torch.load(ds.read_file(CODEBOOK_FILE))["codebook"].float()
    tokenizer, info = load_tokenizer(cfg.tokenizer or default_tokenizer())
    require_same_tokenizer(ds.manifest.meta, info["fingerprint"], where=f"dataset {ds.uri}")
    return tokenizer.quantizer.codebook.detach().clone()


def root_cause(e: BaseException) -> BaseException:
    """The first error of ours (or a user error) inside Ray's wrappers (RayTaskError, UserCodeException)."""
    from tokray.storage.stores import ShardChecksumError, StoreUnavailableError, StoreWriteError

    # ValueError: e.g. a shard that does not match its manifest (an edited codebook_size or grid)
    ours = (ShardChecksumError, StoreUnavailableError, StoreWriteError, FileNotFoundError, ValueError)
    seen, todo = set(), [e]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(err, ours) and not hasattr(err, "cause"):
            return err
        todo += [cause, err.__cause__, err.__context__]
    return e


def fit(plan: RunPlan, callbacks: list | None = None, tracking=None):
    """Run the plan on a Ray Train TorchTrainer (``callbacks``: Ray Train user callbacks, e.g. Tune's report
    callback; ``tracking``: a ``tokray.train.loop.Tracking``, MLflow / W&B beside TensorBoard, logged by rank 0
    through Ray's setup functions); returns its Result. A non-finite loss on a worker re-raises here as its
    NonFiniteLoss."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from tokray.data.ingest import plan_ingest
    from tokray.runtime import init_ray
    from tokray.storage.raysource import read_ray_dataset
    from tokray.train.loop import train_loop_per_worker

    cfg = plan.config
    os.makedirs(cfg.out, exist_ok=True)
    print(cfg.to_json(), flush=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        f.write(cfg.to_json())
    init_ray()
    # Ray Data's progress bars would interleave with the training log; the datasets (and the split coordinator
    # feeding the workers) carry this context
    ray.data.DataContext.get_current().enable_progress_bars = False
    # the training set: each rank reads its slice of the global sample order (tokray.data.ingest), streamed
    # or from the object store; validation is read whole by every rank (each scores its share of the sample ids)
    try:
        ingest = plan_ingest(plan.data_uri, cfg, os.path.join(cfg.out, "trace", "reads") if cfg.trace_batches else "")
        datasets = {"val": read_ray_dataset(plan.eval_uri).materialize()} if plan.eval_data is not None else {}
    except Exception as e:  # a read task's error (e.g. a corrupt shard) as itself, not Ray's wrapped traceback
        raise root_cause(e) from None
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"plan": plan, "ingest": ingest, "tracking": tracking},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=cfg.recipe, storage_path=os.path.join(cfg.out, "ray"), callbacks=callbacks,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]))
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as e:
        non_finite = find_non_finite_loss(e)
        if non_finite is not None:  # the worker's own error, without Ray's wrapping and tracebacks
            raise non_finite from None
        raise
