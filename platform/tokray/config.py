"""One frozen config per run: printed at start, saved as config.json and inside every checkpoint."""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    recipe: str
    data: str = ""  # token dataset URI; "" = the embedded CIFAR-10 training tokens
    model: str = "mtm_tiny"
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)
    epochs: float = 3.0
    max_steps: int = 0  # > 0 caps the run (smoke tests)
    batch_size: int = 256  # global, split evenly over the workers
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    betas: tuple = (0.9, 0.95)
    num_workers: int = 2
    use_gpu: bool = False
    amp: bool = True  # bf16 autocast, on GPU only
    grad_accum: int = 1
    shuffle_buffer: int = 4096
    ckpt_every: int = 200
    log_every: int = 20
    max_failures: int = 2
    seed: int = 0
    out: str = "runs/pretrain"

    def __post_init__(self):
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PretrainConfig":
        d = json.loads(text)
        d["betas"] = tuple(d["betas"])
        return cls(**d)
