"""Named recipes: functions returning a complete config. The CLI only picks one and overrides a few fields."""

from __future__ import annotations

import dataclasses
from typing import Callable

from tokray.config import CLASSES_FROM_DATA, AugmentConfig, TrainConfig

_RECIPES: dict[str, Callable[[], TrainConfig]] = {}


def recipe(fn):
    _RECIPES[fn.__name__] = fn
    return fn


def list_recipes(task: str | None = None) -> list[str]:
    return sorted(n for n, fn in _RECIPES.items() if task is None or fn().task == task)


def describe_recipes(task: str | None = None) -> str:
    """'name: first docstring line' per recipe, for --help."""
    return "\n".join(f"  {n}: {(_RECIPES[n].__doc__ or '').strip().splitlines()[0]}" for n in list_recipes(task))


def get_recipe(name: str, task: str | None = None, **overrides) -> TrainConfig:
    if name not in list_recipes(task):
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes(task))}")
    cfg = _RECIPES[name]()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)} for recipe {name!r}")
    return dataclasses.replace(cfg, **overrides)


_SMOKE_WIDTH = {"embed_dim": 32, "depth": 1, "num_heads": 2}  # the smoke encoder, shared so smoke_ft loads smoke


@recipe
def cifar_mtm() -> TrainConfig:
    """MTM on the embedded CIFAR-10 tokens (8x8, 512 codes), width 128 / depth 4: ~12 min on 2 CPU cores."""
    return TrainConfig(recipe="cifar_mtm", model="mtm_tiny", epochs=3.0, batch_size=256, lr=1e-3,
                       warmup_steps=50, num_workers=2, ckpt_every=100, log_every=20, out="runs/cifar_mtm")


@recipe
def cifar_ft() -> TrainConfig:
    """Fine-tune token_vit_tiny on CIFAR-10 tokens (from --init, else from scratch): CutMix, smoothing, LLRD."""
    return TrainConfig(recipe="cifar_ft", task="classify", model="token_vit_tiny",
                       model_args={"drop_path_rate": 0.1}, epochs=5.0, batch_size=256, lr=2e-3, min_lr=1e-5,
                       weight_decay=0.05, warmup_steps=100, betas=(0.9, 0.999), layer_decay=0.75, cutmix=1.0,
                       label_smoothing=0.1, num_workers=2, ckpt_every=200, log_every=20, out="runs/cifar_ft")


@recipe
def smoke() -> TrainConfig:
    """Seconds on CPU: a tiny MTM model, 2 Ray workers, a few steps."""
    return TrainConfig(recipe="smoke", model="mtm_tiny",
                       model_args={**_SMOKE_WIDTH, "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
                       max_steps=6, batch_size=32, warmup_steps=2, num_workers=2, ckpt_every=3, log_every=2,
                       max_failures=0, out="runs/smoke")


@recipe
def smoke_ft() -> TrainConfig:
    """Seconds on CPU: fine-tune the smoke encoder (or a tiny one from scratch), 2 Ray workers, a few steps."""
    return TrainConfig(recipe="smoke_ft", task="classify", model="token_vit_tiny",
                       model_args={**_SMOKE_WIDTH, "drop_path_rate": 0.1}, max_steps=6, epochs=0.0, batch_size=32,
                       warmup_steps=2, layer_decay=0.75, cutmix=1.0, mixup=0.8, label_smoothing=0.1, ema_decay=0.9,
                       num_workers=2, ckpt_every=3, log_every=2, max_failures=0,
                       out="runs/smoke_ft")


# --- SeiT / SeiT++ (method digest §3, §4.2-4.3, §7). ImageNet: the papers' settings on 32x32 grids of
# 391 codes cropped to 28x28 (1,251 steps per epoch at batch 1024). CIFAR: the same components scaled
# to 8x8 grids (crops kept at the grid, milder crop scale, a few epochs), sized for 2 CPU cores.

_IMNET_STEPS = 1_281_167 // 1024
_SEIT_AUG = {"eda_replace_prob": 0.25, "eda_swap_prob": 0.25, "rrc_prob": 1.0, "rrc_scale": (0.08, 1.0),
             "noise_prob": 1.0, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
# SeiT++: Emb-Noise (0.75) or ColorAdapt (0.25) per iteration; half the batch through TokenAdapt
# (flip/affine/crop, Mixup 0.8 | CutMix 1.0 in f-space), the other half RRC + CutMix
_SEITPP_AUG = {"rrc_prob": 1.0, "rrc_scale": (0.08, 1.0), "noise_prob": 0.75, "coloradapt_prob": 0.25,
               "tokenadapt": True, "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}
_CIFAR_CROP = {"rrc_scale": (0.35, 1.0)}  # an 8x8 grid keeps little at 0.08 of its area


def _aug(**settings) -> AugmentConfig:
    """A recipe's augmentation; its soft targets get the classes of the data the run trains on."""
    return AugmentConfig(num_classes=CLASSES_FROM_DATA, **settings)


def _imagenet(**kw) -> TrainConfig:
    base = {"task": "classify", "model": "token_vit_base", "model_args": {"drop_path_rate": 0.1}, "batch_size": 1024,
            "weight_decay": 0.1, "betas": (0.9, 0.999), "num_workers": 8, "use_gpu": True, "ckpt_every": 2000,
            "log_every": 100}
    return TrainConfig(**{**base, **kw})


def _cifar(**kw) -> TrainConfig:
    base = {"task": "classify", "model": "token_vit_tiny", "model_args": {"drop_path_rate": 0.1}, "epochs": 5.0,
            "batch_size": 256, "lr": 2e-3, "min_lr": 1e-5, "weight_decay": 0.05, "betas": (0.9, 0.999),
            "warmup_steps": 100, "num_workers": 2, "ckpt_every": 200, "log_every": 20}
    return TrainConfig(**{**base, **kw})


@recipe
def seit() -> TrainConfig:
    """SeiT (ImageNet): Token-EDA + RRC 28 + Emb-Noise + CutMix, frozen codebook stem, ViT-B, 300 epochs, EMA."""
    return _imagenet(recipe="seit", codebook_stem=True, augment=_aug(**_SEIT_AUG, out_size=28), epochs=300,
                     lr=1.5e-3, min_lr=1e-5, warmup_steps=5 * _IMNET_STEPS, ema_decay=0.99996, out="runs/seit")


@recipe
def seit_mtm() -> TrainConfig:
    """SeiT + MTM (ImageNet): the SeiT augmentation fine-tuning an MTM encoder (--init runs/mtm_imagenet), 100 epochs."""
    return _imagenet(recipe="seit_mtm", augment=_aug(**_SEIT_AUG, out_size=28), epochs=100, lr=4e-3, min_lr=1e-6,
                     warmup_steps=5 * _IMNET_STEPS, layer_decay=0.65, pretrain="mtm_imagenet", out="runs/seit_mtm")


@recipe
def seitpp_nomtm() -> TrainConfig:
    """SeiT++ without MTM (ImageNet): SeiT + TokenAdapt + ColorAdapt, 300 epochs, EMA."""
    aug = _aug(**_SEITPP_AUG, eda_replace_prob=0.25, eda_swap_prob=0.25, out_size=28)
    return _imagenet(recipe="seitpp_nomtm", codebook_stem=True, augment=aug, epochs=300, lr=1.5e-3, min_lr=1e-5,
                     warmup_steps=30 * _IMNET_STEPS, ema_decay=0.99996, out="runs/seitpp_nomtm")


@recipe
def seitpp() -> TrainConfig:
    """SeiT++ (ImageNet): fine-tune the TokenAdapt-MTM encoder (--init runs/seitpp_mtm), 100 epochs, layer decay 0.65."""
    return _imagenet(recipe="seitpp", augment=_aug(**_SEITPP_AUG, out_size=28), epochs=100, lr=4e-3, min_lr=1e-6,
                     warmup_steps=5 * _IMNET_STEPS, layer_decay=0.65, pretrain="seitpp_mtm", out="runs/seitpp")


@recipe
def mtm_imagenet() -> TrainConfig:
    """MTM pre-training (ImageNet, ViT-B, 400 epochs) with RRC 0.2-1 on 28x28 crops, for seit_mtm."""
    return TrainConfig(recipe="mtm_imagenet", model="mtm_base", augment=_aug(rrc_prob=1.0, rrc_scale=(0.2, 1.0),
                       out_size=28), epochs=400, batch_size=4096, grad_accum=4, lr=2.4e-3, min_lr=0.0,
                       warmup_steps=40 * (1_281_167 // 4096), num_workers=8, use_gpu=True, ckpt_every=2000,
                       log_every=100, out="runs/mtm_imagenet")


@recipe
def seitpp_mtm() -> TrainConfig:
    """SeiT++ MTM pre-training (ImageNet): half the batch through TokenAdapt, the other half RRC 0.2-1, 400 epochs."""
    return dataclasses.replace(mtm_imagenet(), recipe="seitpp_mtm", out="runs/seitpp_mtm",
                               augment=_aug(rrc_prob=1.0, rrc_scale=(0.2, 1.0), tokenadapt=True, out_size=28))


@recipe
def cifar_seit() -> TrainConfig:
    """SeiT on CIFAR-10 tokens: Token-EDA + RRC + Emb-Noise + CutMix, frozen codebook stem, 5 epochs."""
    return _cifar(recipe="cifar_seit", codebook_stem=True, augment=_aug(**{**_SEIT_AUG, **_CIFAR_CROP}),
                  out="runs/cifar_seit")


@recipe
def cifar_seit_mtm() -> TrainConfig:
    """SeiT + MTM on CIFAR-10: the SeiT augmentation fine-tuning a cifar_mtm encoder (--init runs/cifar_mtm)."""
    return _cifar(recipe="cifar_seit_mtm", augment=_aug(**{**_SEIT_AUG, **_CIFAR_CROP}), layer_decay=0.75,
                  pretrain="cifar_mtm", out="runs/cifar_seit_mtm")


@recipe
def cifar_seitpp_nomtm() -> TrainConfig:
    """SeiT++ without MTM on CIFAR-10: SeiT + TokenAdapt + ColorAdapt, frozen codebook stem, 5 epochs."""
    aug = _aug(**{**_SEITPP_AUG, **_CIFAR_CROP}, eda_replace_prob=0.25, eda_swap_prob=0.25)
    return _cifar(recipe="cifar_seitpp_nomtm", codebook_stem=True, augment=aug, out="runs/cifar_seitpp_nomtm")


@recipe
def cifar_seitpp() -> TrainConfig:
    """SeiT++ on CIFAR-10: fine-tune a cifar_seitpp_mtm encoder (--init runs/cifar_seitpp_mtm) with TokenAdapt + ColorAdapt."""
    return _cifar(recipe="cifar_seitpp", augment=_aug(**{**_SEITPP_AUG, **_CIFAR_CROP}), layer_decay=0.75,
                  pretrain="cifar_seitpp_mtm", out="runs/cifar_seitpp")


@recipe
def cifar_seitpp_mtm() -> TrainConfig:
    """SeiT++ MTM on CIFAR-10: half the batch through TokenAdapt, the other half RRC 0.5-1, 3 epochs."""
    return dataclasses.replace(cifar_mtm(), recipe="cifar_seitpp_mtm", out="runs/cifar_seitpp_mtm",
                               augment=_aug(rrc_prob=1.0, rrc_scale=(0.5, 1.0), tokenadapt=True))


@recipe
def cifar_pixels() -> TrainConfig:
    """Pixel baseline for sweeps: stored JPEGs into pixel_vit_tiny (64 patches), RRC + flip + CutMix/Mixup like the token recipes."""
    # the token recipes' crop range and mixing (SeiT++: Mixup 0.8 | CutMix 1.0), on pixels
    aug = AugmentConfig(rrc_prob=1.0, rrc_scale=_CIFAR_CROP["rrc_scale"], flip_prob=0.5)
    return _cifar(recipe="cifar_pixels", model="pixel_vit_tiny", augment=aug, cutmix=1.0, mixup=0.8,
                  label_smoothing=0.1, out="runs/cifar_pixels")
