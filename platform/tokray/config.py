"""One frozen config per run: printed at start, saved as config.json and inside every checkpoint."""

from __future__ import annotations

import dataclasses
import json

TASKS = ("mtm", "classify")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    recipe: str
    task: str = "mtm"  # "mtm": masked token modeling (labels unused); "classify": supervised top-1
    data: str = ""  # token dataset URI; "" = the embedded CIFAR-10 training tokens
    eval_data: str = ""  # classify only: validation tokens; "" = the embedded CIFAR-10 validation split
    model: str = "mtm_tiny"
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)
    init: str = ""  # classify only: an MTM checkpoint whose encoder starts the model; "" = from scratch
    epochs: float = 3.0
    max_steps: int = 0  # > 0 caps the run (smoke tests)
    batch_size: int = 256  # global, split evenly over the workers
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    betas: tuple = (0.9, 0.95)
    layer_decay: float = 1.0  # < 1: block i of L gets lr * layer_decay**(L - i) (BEiT/MAE fine-tuning)
    mixup: float = 0.0  # classify: Mixup alpha (mixes code distributions), 0 = off
    cutmix: float = 0.0  # classify: CutMix alpha (pastes token boxes), 0 = off
    mix_switch_prob: float = 0.5  # with both on: chance of CutMix instead of Mixup per batch
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # classify: > 0 keeps an EMA of the weights and reports its top-1 too
    augment: dict = dataclasses.field(default_factory=dict, hash=False)  # tokray.augment AugmentConfig fields
    codebook_stem: bool = False  # SeiT: the token embedding is the tokenizer's codebook, frozen
    tokenizer: str = ""  # the tokenizer whose codebook augmentation uses; "" = the dataset's codebook file or the embedded one
    pretrain: str = ""  # classify: the MTM recipe whose checkpoint --init must come from ("" = none needed)
    num_workers: int = 2
    use_gpu: bool = False
    amp: bool = True  # bf16 autocast, on GPU only
    grad_accum: int = 1
    shuffle_buffer: int = 4096
    ckpt_every: int = 200
    log_every: int = 20
    max_failures: int = 2
    seed: int = 0
    trace_batches: bool = False  # each rank appends the sample ids of every batch to <out>/trace/ (tests, audits)
    out: str = "runs/pretrain"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        for name in ("batch_size", "num_workers", "grad_accum", "ckpt_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must divide evenly over num_workers {self.num_workers} "
                             f"x grad_accum {self.grad_accum}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.task == "mtm" and (self.init or self.pretrain):
            raise ValueError("init/pretrain (a checkpoint to fine-tune from) apply to task 'classify', not 'mtm'")
        if (self.mixup or self.cutmix) and (self.augment.get("mixup_alpha") or self.augment.get("cutmix_alpha")):
            raise ValueError("mix in one place: either mixup/cutmix (on ids, timm) or augment.mixup_alpha/cutmix_alpha")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        d["betas"] = tuple(d["betas"])
        return cls(**d)
