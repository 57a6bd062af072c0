"""What crosses between the driver and the Ray Train workers: a ``RunPlan`` down, a ``NonFiniteLoss`` up.

``prepare()`` (tokray.train.launch) checks everything that can fail before a worker starts and
returns one RunPlan; ``fit()`` hands that object to every worker (Ray pickles it), so workers read
typed fields instead of a JSON string and dicts. A worker that meets a non-finite loss raises
NonFiniteLoss; it pickles with its fields, so the driver finds it by type among the worker failures.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tokray.config import TrainConfig
from tokray.data.spec import DataSpec
from tokray.train.schedule import total_steps

if TYPE_CHECKING:  # (jobs import the driver for --help; torch loads when a run starts)
    import torch


@dataclasses.dataclass(frozen=True)
class RunPlan:
    config: TrainConfig  # final: absolute out and init paths
    data: DataSpec  # the training set
    data_uri: str
    eval_data: DataSpec | None = None  # classify: the validation set (same layout as ``data``)
    eval_uri: str = ""
    resume_from: str | None = None  # --resume: the checkpoint directory the workers start from
    codebook: torch.Tensor | None = dataclasses.field(default=None, compare=False)  # [V, C], augmentation / stem

    @property
    def num_samples(self) -> int:
        return self.data.num_samples

    @property
    def steps(self) -> tuple[int, int]:
        """(optimizer steps per epoch, steps in the run)."""
        return total_steps(self.config, self.num_samples)


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a run is in the global sample order (tokray.data.order): its epoch and the samples of it the whole
    run has consumed. Stored in every checkpoint; valid for any worker count."""

    epoch: int
    samples: int

    def advanced(self, global_batch: int, used_per_epoch: int) -> "DataPosition":
        """After one optimizer step of ``global_batch`` samples; the next epoch once the epoch's batches are used."""
        samples = self.samples + global_batch
        return DataPosition(self.epoch + 1, 0) if samples + global_batch > used_per_epoch else \
            DataPosition(self.epoch, samples)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "samples": self.samples}

    @classmethod
    def from_json(cls, d: dict | None) -> "DataPosition | None":
        return cls(int(d["epoch"]), int(d["samples"])) if d else None


class NonFiniteLoss(FloatingPointError):
    """A worker's loss became NaN or infinite: the run stops, naming the step (a user error: exit code 2)."""

    def __init__(self, step: int, value: float, task: str, lr: float):
        self.step, self.value, self.task, self.lr = int(step), float(value), task, float(lr)
        super().__init__(f"non-finite {task} loss ({self.value}) at step {self.step}; lower the lr (now {self.lr:.2e}) "
                         f"or check the data")

    def __reduce__(self):  # Exception pickles its message as the one argument; rebuild from the fields instead
        return type(self), (self.step, self.value, self.task, self.lr)


def find_non_finite_loss(error: BaseException) -> NonFiniteLoss | None:
    """The NonFiniteLoss behind a Ray Train failure: its worker failures and their causes, searched by type."""
    seen, todo = set(), [error, *getattr(error, "worker_failures", {}).values()]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NonFiniteLoss):  # (Ray's RayTaskError may subclass it: rebuild it without the traceback)
            return NonFiniteLoss(e.step, e.value, e.task, e.lr)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
