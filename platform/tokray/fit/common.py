"""What the in-process trainers of shipped artifacts (the VQ tokenizer, TokenAdapt) share: one frozen
config base (the image source and its fixed split, the run directory, the schedule, checkpoints), its
checks, the warmup + cosine lr, and the command-line flags that set it."""

from __future__ import annotations

import argparse
import dataclasses
import json

from tokray.train.schedule import warmup_cosine


@dataclasses.dataclass(frozen=True)
class FitConfig:
    images: str
    out_dir: str
    model: str = ""
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 100
    val_per_class: int = 500
    split_seed: int = 0
    seed: int = 0
    eval_every: int = 500
    ckpt_every: int = 250
    max_images: int = 0  # 0 = all training images

    positive = ("steps", "batch_size", "eval_every", "ckpt_every")  # fields that must be > 0

    def __post_init__(self):
        for name in self.positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.steps, self.lr, self.min_lr, self.warmup)


def add_fit_args(p: argparse.ArgumentParser, cfg_type: type, out: str, model_help: str) -> None:
    """The flags every in-process trainer takes, with ``cfg_type``'s defaults."""
    p.add_argument("--images", required=True, help="image source: a tar, a folder or an s3:// prefix")
    p.add_argument("--out", default=out, help="run directory (checkpoint, config, result)")
    p.add_argument("--model", default=cfg_type.model, help=model_help)
    p.add_argument("--model-args", default="{}", help='JSON overrides of the model\'s arguments, e.g. \'{"dim": 64}\'')
    for flag in ("steps", "batch_size", "lr", "eval_every", "val_per_class", "max_images", "seed"):
        default = getattr(cfg_type, flag)
        p.add_argument(f"--{flag.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--no-resume", action="store_true")


def fit_fields(args: argparse.Namespace) -> dict:
    """The config fields the flags of ``add_fit_args`` set."""
    return {"images": args.images, "out_dir": args.out, "model": args.model, "model_args": json.loads(args.model_args),
            **{k: getattr(args, k) for k in ("steps", "batch_size", "lr", "eval_every", "val_per_class", "max_images",
                                             "seed")}}
