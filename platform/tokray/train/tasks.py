"""What a training step computes, per task: MTM pre-training or supervised classification.

A task builds its model from the config and the dataset's DataSpec, owns its data (batch key, torch
stream, device transfer, evaluation view), makes the optimizer's parameter groups, turns a batch
into a loss, and measures top-1 on a validation stream. The training loop (tokray.train.loop) is
the same for every task; evaluation (tokray.eval.classify) uses the same views.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

import models
from tokray.config import TrainConfig
from tokray.data.spec import DataSpec

log = logging.getLogger(__name__)

_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "decoder_pos")


def plain_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and position/cls/mask tokens (1-d or named)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(_NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def model_grid(cfg: TrainConfig, spec: DataSpec) -> tuple[int, int]:
    """The grid the model sees: the dataset's, or the augmentation's output crop (SeiT: 32x32 -> 28x28)."""
    out = cfg.augment.out_size
    return (out, out) if out else spec.grid


class _Task:
    """Shared by every task: the data it reads (its batch key, the stream, the move to the device), the
    model from the config, the token augmentation (if any) on the device and top-1 on a validation stream."""

    input_key = "ids"

    def __init__(self, cfg: TrainConfig, spec: DataSpec, codebook: torch.Tensor | None = None, augment: bool = True):
        self.cfg, self.spec, self.codebook = cfg, spec, codebook
        self.num_classes = spec.num_classes
        self.augment = self._make_augment() if augment else None

    def _make_augment(self):
        """The token augmentation of the recipe (None when it sets none)."""
        if not self.cfg.augment.enabled:
            return None
        from tokray.augment.pipeline import build_token_augment

        if self.codebook is None:
            raise ValueError(f"recipe {self.cfg.recipe!r} augments tokens and needs the tokenizer's codebook")
        aug = dataclasses.replace(self.cfg.augment, num_classes=self.num_classes)  # soft targets: the data's classes
        return build_token_augment(aug, self.codebook, self.spec.tokenizer)

    def _create(self, **extra) -> torch.nn.Module:
        model = models.create_model(self.cfg.model, grid=model_grid(self.cfg, self.spec),
                                    vocab_size=self.spec.codebook_size, **extra, **self.cfg.model_args)
        if self.cfg.codebook_stem:  # SeiT feeds the frozen codebook vectors (a checkpoint carries them too)
            embed = model.patch_embed.embed if hasattr(model, "patch_embed") else model.encoder.patch_embed.embed
            if self.codebook is not None:
                if tuple(self.codebook.shape) != tuple(embed.weight.shape):
                    raise ValueError(f"codebook_stem: the codebook {tuple(self.codebook.shape)} must match the token "
                                     f"embedding {tuple(embed.weight.shape)} (set model_args token_dim to its width)")
                with torch.no_grad():
                    embed.weight.copy_(self.codebook)
            embed.weight.requires_grad_(False)
        return model

    def iter_batches(self, data_iter, batch_size: int, **kw):
        """Torch batches of this task's data from a Ray Dataset or DataIterator (ids stay uint16)."""
        from tokray.data.stream import iter_torch_batches

        return iter_torch_batches(data_iter, self.spec, batch_size, **kw)

    def inputs(self, batch: dict, device) -> torch.Tensor:
        """The model input of a batch, on ``device`` (still in its stored dtype)."""
        return batch[self.input_key].to(device, non_blocking=True)

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """What evaluation feeds the model: the central crop of the training view's size."""
        from tokray.augment.geometry import center_crop_ids

        return center_crop_ids(x, self.cfg.augment.out_size)

    def top1(self, model: torch.nn.Module, batches, device, rank: int = 0, world: int = 1) -> tuple[int, int]:
        """(correct, seen) of ``model`` over ``batches`` of this task's data, through its evaluation view."""
        return top1(model, batches, device, rank, world, view=self.eval_view, key=self.input_key)

    def to(self, device) -> "_Task":
        if self.augment is not None:
            self.augment.to(device)
        return self

    def augmented(self, ids, labels, generator):
        return self.augment(ids, labels, generator) if self.augment is not None else (ids, labels)


class MTMTask(_Task):
    name = "mtm"

    def build(self) -> torch.nn.Module:
        return self._create()

    def param_groups(self, model) -> list[dict]:
        return plain_param_groups(model, self.cfg.weight_decay)

    def loss(self, model, batch: dict, device, generator) -> tuple[torch.Tensor, dict]:
        ids, _ = self.augmented(self.inputs(batch, device), None, generator)
        out = model(ids, generator=generator)  # uint16 -> int64 inside
        return out["loss"], {"mask_ratio": float(out["mask_ratio"])}


class ClassifyTask(_Task):
    """Supervised top-1 on token ids: CutMix pastes token boxes; Mixup mixes one-hot code distributions
    (timm), unless the token augmentation mixes (SeiT/SeiT++ recipes)."""

    name = "classify"

    def __init__(self, cfg: TrainConfig, spec: DataSpec, codebook: torch.Tensor | None = None, augment: bool = True):
        super().__init__(cfg, spec, codebook, augment)
        self.mixer = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            self.mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, switch_prob=cfg.mix_switch_prob,
                               label_smoothing=cfg.label_smoothing, num_classes=self.num_classes)

    def _require_classes(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"classification needs a dataset with class names; this one has {self.num_classes}")

    def build(self) -> torch.nn.Module:
        self._require_classes()
        return self._create(num_classes=self.num_classes)

    def param_groups(self, model) -> list[dict]:
        if self.cfg.layer_decay >= 1:
            return plain_param_groups(model, self.cfg.weight_decay)
        from timm.optim import param_groups_layer_decay

        # timm's ViT group_matcher: the token embedding + stem are layer 0, block i is layer i + 1
        return param_groups_layer_decay(model, self.cfg.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                        layer_decay=self.cfg.layer_decay)

    def loss(self, model, batch: dict, device, generator) -> tuple[torch.Tensor, dict]:
        ids = self.inputs(batch, device).long()
        labels = batch["label"].to(device, non_blocking=True)
        ids, target = self.augmented(ids, labels, generator)
        if target.ndim == 2:  # the augmentation mixed: soft targets, smoothing included
            return _soft_cross_entropy(model(ids), target), {}
        if self.mixer is None:
            return F.cross_entropy(model(ids), labels, label_smoothing=self.cfg.label_smoothing), {}
        x = F.one_hot(ids, self.spec.codebook_size).permute(0, 3, 1, 2).float() if self.cfg.mixup > 0 else ids[:, None]
        x, target = self.mixer(x, labels)
        return _soft_cross_entropy(model(x if self.cfg.mixup > 0 else x[:, 0]), target), {}


class PixelClassifyTask(ClassifyTask):
    """The pixel baseline: stored JPEGs (decoded in the data stream) into a pixel ViT with the token model's
    width, depth and sequence length; the recipe's random-resized crop and flip (``augment.rrc_*``,
    ``augment.flip_prob``: tokray.augment.pixels, on the device, from the worker's generator), then the same
    timm CutMix/Mixup and smoothing as the token path."""

    input_key = "pixels"

    def _make_augment(self):
        from tokray.augment.pixels import PixelAugment

        return PixelAugment(self.cfg.augment)  # refuses token-only settings (the driver builds the task first)

    def build(self) -> torch.nn.Module:
        self._require_classes()
        return models.create_model(self.cfg.model, img_size=self.spec.image_size, num_classes=self.num_classes,
                                   **self.cfg.model_args)

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the whole stored image, as in training (uint8: the model normalizes)

    def to(self, device) -> "PixelClassifyTask":
        return self  # (the augmentation holds no tensors)

    def augmented(self, x, labels, generator):
        """(images, targets): crop + flip, then CutMix/Mixup (soft targets) when the recipe mixes."""
        if self.augment is not None:
            x = self.augment(x, generator)
        return self.mixer(x, labels) if self.mixer is not None else (x, labels)

    def loss(self, model, batch: dict, device, generator) -> tuple[torch.Tensor, dict]:
        x = self.inputs(batch, device).float() / 255.0
        x, target = self.augmented(x, batch["label"].to(device, non_blocking=True), generator)
        if target.ndim == 2:
            return _soft_cross_entropy(model(x), target), {}
        return F.cross_entropy(model(x), target, label_smoothing=self.cfg.label_smoothing), {}


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def make_task(cfg: TrainConfig, spec: DataSpec, codebook: torch.Tensor | None = None, augment: bool = True) -> _Task:
    """The task of ``cfg`` on data described by ``spec``; ``augment=False`` skips the token augmentation
    (evaluation: the model alone)."""
    if not spec.is_tokens:
        if cfg.task != "classify":
            raise ValueError(f"recipe {cfg.recipe!r} ({cfg.task}) needs token data; pixel datasets train classifiers only")
        return PixelClassifyTask(cfg, spec, None, augment)
    return {"mtm": MTMTask, "classify": ClassifyTask}[cfg.task](cfg, spec, codebook, augment)


@torch.no_grad()
def top1(model: torch.nn.Module, batches, device, rank: int = 0, world: int = 1, view=None,
         key: str = "ids") -> tuple[int, int]:
    """(correct, seen) over every sample of ``batches``, summed over ranks; ``view`` maps a batch's ids to
    what the model takes (e.g. the central crop)."""
    correct, seen = rank_top1(model, batches, device, rank, world, view, key)
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([correct, seen], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        correct, seen = int(t[0]), int(t[1])
    return correct, seen


@torch.no_grad()
def rank_top1(model: torch.nn.Module, batches, device, rank: int = 0, world: int = 1, view=None,
              key: str = "ids") -> tuple[int, int]:
    """This rank's (correct, seen): the samples whose sample_id % world == rank. Every rank reads the
    whole stream, and the stream's batch order differs between ranks, so the split is by sample, not
    by batch position (that once counted the last partial batch on both ranks: 4,992 of 5,000)."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    for batch in batches:
        mine = slice(None) if world == 1 else (batch["sample_id"] % world == rank)
        labels = batch["label"][mine]
        if not len(labels):
            continue
        x = batch[key][mine].to(device, non_blocking=True)
        logits = model(view(x) if view is not None else x)
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        seen += len(labels)
    model.train(was_training)
    return correct, seen
