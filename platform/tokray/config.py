"""One frozen config per run: printed at start, saved as config.json and inside every checkpoint.

``TrainConfig`` is the run; ``AugmentConfig`` (a field of it) every setting of its token augmentation,
validated here so that a recipe with a bad setting fails when it is built, before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
import json

TASKS = ("mtm", "classify")
INGEST_MODES = ("auto", "stream", "materialize")  # tokray.data.ingest
RANK_SPLITS = ("interleaved", "storage")  # tokray.data.order
# AugmentConfig.num_classes in a recipe: the classes of the dataset the run trains on, set by its task
CLASSES_FROM_DATA = -1


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Every setting of the token augmentation of a run (defaults: everything off)."""

    # Token-EDA (SeiT): per sample, synonym replacement with eda_replace_prob, patch swap with
    # eda_swap_prob, else nothing
    eda_replace_prob: float = 0.0
    eda_swap_prob: float = 0.0
    eda_synonyms: int = 5  # synonyms per code: its most cosine-similar codes
    eda_replace_token_prob: float = 0.25  # share of a chosen sample's tokens replaced
    eda_swap_scale: float = 0.25  # swapped square side = int(min(h, w) * U(0, scale)) tokens
    # colour, chosen per iteration: Emb-Noise with noise_prob, ColorAdapt with coloradapt_prob
    noise_prob: float = 0.0
    noise_fraction: float = 0.5  # share of the samples that get noise
    # Emb-Noise scales are in codebook units: the codes are l2-normalised, one channel has std ~0.17
    # (C = 32); on the CIFAR tokenizer 0.1/0.1 changes ~1/3 of a noised sample's tokens, SeiT's 1.0 all
    noise_offset_std: float = 0.1  # per-channel offset, shared by all positions
    noise_std: float = 0.1  # i.i.d. per-position noise
    coloradapt_prob: float = 0.0
    coloradapt_fraction: float = 0.5
    # geometry of the base path (on the embedding map, bicubic, then requantized)
    rrc_prob: float = 0.0  # random-resized crop (SeiT: 1.0); also the crop of the TokenAdapt path
    rrc_scale: tuple = (0.08, 1.0)
    rrc_ratio: tuple = (3 / 4, 4 / 3)
    flip_prob: float = 0.0  # naive flip of the base path (SeiT++ flips only through TokenAdapt)
    out_size: int = 0  # side of the output grid; 0 = the input grid
    # TokenAdapt: the last B//2 samples go through f -> A -> g
    tokenadapt: bool = False
    tokenadapt_path: str = ""  # "" = the shipped CIFAR-10 weights
    tokenadapt_flip_prob: float = 0.5
    tokenadapt_affine_prob: float = 0.5  # rotate/translate/shear group (each op p = 0.5)
    # mixing and targets (need labels): CutMix on both paths, Mixup in f-space (TokenAdapt path)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_switch_prob: float = 0.5  # with both on: CutMix with this probability, else Mixup
    label_smoothing: float = 0.0
    num_classes: int = 0  # width of the soft targets; CLASSES_FROM_DATA: the training task sets the dataset's

    def __post_init__(self):
        probs = ("eda_replace_prob", "eda_swap_prob", "eda_replace_token_prob", "noise_prob", "noise_fraction",
                 "coloradapt_prob", "coloradapt_fraction", "rrc_prob", "flip_prob", "tokenadapt_flip_prob",
                 "tokenadapt_affine_prob", "mix_switch_prob", "label_smoothing")
        for name in probs:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.eda_replace_prob + self.eda_swap_prob > 1.0:
            raise ValueError(f"augment.eda_replace_prob + eda_swap_prob must be <= 1 (one choice per sample), got "
                             f"{self.eda_replace_prob} + {self.eda_swap_prob}")
        if self.noise_prob + self.coloradapt_prob > 1.0:
            raise ValueError(f"augment.noise_prob + coloradapt_prob must be <= 1 (one choice per iteration), got "
                             f"{self.noise_prob} + {self.coloradapt_prob}")
        for name in ("noise_offset_std", "noise_std", "mixup_alpha", "cutmix_alpha", "eda_swap_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.out_size < 0:
            raise ValueError(f"augment.out_size must be >= 0 (0 = keep the grid), got {self.out_size}")
        if self.eda_synonyms < 1:
            raise ValueError(f"augment.eda_synonyms must be >= 1, got {self.eda_synonyms}")
        if self.num_classes < CLASSES_FROM_DATA:
            raise ValueError(f"augment.num_classes must be >= 0 (or CLASSES_FROM_DATA), got {self.num_classes}")
        if self.mixing and self.num_classes == 0:
            raise ValueError("augment.num_classes must be set (> 0; in a recipe CLASSES_FROM_DATA) when mixup_alpha "
                             "or cutmix_alpha is on")
        if self.mixup_alpha > 0 and not self.tokenadapt:
            raise ValueError("augment.mixup_alpha needs tokenadapt=True: SeiT++ mixes in TokenAdapt's f-space; mixed "
                             "embeddings re-quantize to tokens of neither image. Use cutmix_alpha for the base path")
        _check_pair("augment.rrc_scale", self.rrc_scale, 1e-6, 1.0)  # the crop rule's (min, max) area
        _check_pair("augment.rrc_ratio", self.rrc_ratio, 1e-6)  # and aspect ratio
        object.__setattr__(self, "rrc_scale", tuple(self.rrc_scale))
        object.__setattr__(self, "rrc_ratio", tuple(self.rrc_ratio))

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def enabled(self) -> bool:
        """Whether any setting differs from the all-off defaults (the run then needs the codebook)."""
        return any(getattr(self, f.name) != f.default for f in dataclasses.fields(self) if f.name != "num_classes")


def _check_pair(name: str, pair, lo: float, hi: float | None = None) -> None:
    if len(pair) != 2 or not lo <= pair[0] <= pair[1] or (hi is not None and pair[1] > hi):
        bound = f" <= {hi}" if hi is not None else ""
        raise ValueError(f"{name} must be (min, max) with {lo} <= min <= max{bound}, got {tuple(pair)}")


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
    val_every: int = 0  # classify: validate every N steps (and at the end); 0 = at the end of every epoch
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)  # token augmentation (default: off)
    codebook_stem: bool = False  # SeiT: the token embedding is the tokenizer's codebook, frozen
    tokenizer: str = ""  # the tokenizer whose codebook augmentation uses; "" = the dataset's codebook file or the embedded one
    pretrain: str = ""  # classify: the MTM recipe whose checkpoint --init must come from ("" = none needed)
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu: a fraction packs several runs (sweep trials) on one GPU
    amp: bool = True  # bf16 autocast on GPUs and on CPUs with native bf16 (tokray.devices.bf16_autocast_pays)
    grad_accum: int = 1
    cpus_per_worker: float = 1.0  # CPUs each Ray Train worker reserves (fractions pack several on a core)
    ingest: str = "auto"  # stream | materialize | auto (materialize when the set fits materialize_fraction)
    materialize_fraction: float = 0.25  # auto: the share of the cluster's object store a materialized set may use
    shuffle_window: int = 262_144  # samples shuffled together (whole shards; all of a smaller set)
    rank_split: str = "interleaved"  # which rank takes which samples of a global batch (tokray.data.order)
    ckpt_every: int = 200
    log_every: int = 20
    max_failures: int = 2
    seed: int = 0
    trace_batches: bool = False  # each rank appends the sample ids of every batch to <out>/trace/ (tests, audits)
    out: str = "runs/pretrain"

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}")
        for name in ("batch_size", "num_workers", "grad_accum", "ckpt_every", "log_every", "shuffle_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must divide evenly over num_workers {self.num_workers} "
                             f"x grad_accum {self.grad_accum}")
        if self.ingest not in INGEST_MODES:
            raise ValueError(f"ingest {self.ingest!r}: choose one of {', '.join(INGEST_MODES)}")
        if self.rank_split not in RANK_SPLITS:
            raise ValueError(f"rank_split {self.rank_split!r}: choose one of {', '.join(RANK_SPLITS)}")
        if not 0 < self.materialize_fraction <= 1:
            raise ValueError(f"materialize_fraction must be in (0, 1], got {self.materialize_fraction}")
        if not self.gpus_per_worker > 0 or (self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer()):
            raise ValueError(f"gpus_per_worker must be a fraction in (0, 1] or a whole number, got {self.gpus_per_worker}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if not math.isfinite(self.epochs) or self.epochs < 0:
            raise ValueError(f"epochs must be a finite number >= 0, got {self.epochs}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0 = no cap), got {self.max_steps}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0 = every epoch end), got {self.val_every}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        for name in ("lr", "min_lr", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if "://" in self.out and not self.out.startswith("file://"):
            raise ValueError(f"--out {self.out!r}: run directories are local paths (on a cluster, one every node "
                             "mounts); write the checkpoints there and copy them to object storage afterwards")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.task == "mtm" and (self.init or self.pretrain):
            raise ValueError("init/pretrain (a checkpoint to fine-tune from) apply to task 'classify', not 'mtm'")
        if not isinstance(self.augment, AugmentConfig):
            raise ValueError(f"config field augment must be an AugmentConfig, got {type(self.augment).__name__}; "
                             f"build it with tokray.config.AugmentConfig(...)")
        if (self.mixup or self.cutmix) and self.augment.mixing:
            raise ValueError("mix in one place: either mixup/cutmix (on ids, timm) or augment.mixup_alpha/cutmix_alpha")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        d["betas"] = tuple(d["betas"])
        d.pop("shuffle_buffer", None)  # configs before the global sample order (tokray.data.order)
        # configs written before augment was typed hold only the fields they set, and no num_classes
        d["augment"] = AugmentConfig(**{"num_classes": CLASSES_FROM_DATA, **(d.get("augment") or {})})
        return cls(**d)
