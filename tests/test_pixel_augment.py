"""Pixel trials augment like the token recipes: random-resized crop (the recipes' scale range), flip and
CutMix/Mixup, on the batches the model sees, from the worker's seeded generator."""

import numpy as np
import pytest
import torch

from tokray.augment.pixels import PixelAugment
from tokray.config import AugmentConfig
from tokray.data.spec import DataSpec
from tokray.recipes import get_recipe
from tokray.train.tasks import make_task

SPEC = DataSpec(kind="pixels", class_names=tuple("abcdefghij"), num_samples=64, image_size=32, quality=75)


def _batch(n=16):
    """Distinct images: a horizontal ramp (so a flip reverses it) plus a per-sample offset, labels 0..9."""
    ramp = torch.linspace(0, 200, 32).view(1, 1, 1, 32).expand(n, 3, 32, 32)
    offset = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) * 3
    return {"pixels": (ramp + offset).round().to(torch.uint8), "label": torch.arange(n) % 10}


class _Seen(torch.nn.Module):
    """Stands in for the model: keeps what it was fed."""

    def __init__(self):
        super().__init__()
        self.fed = []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.fed.append(x.detach().clone())
        return torch.zeros(len(x), 10) + self.w


def _fed(seed: int, task, batch):
    np.random.seed(seed)  # timm's Mixup draws from NumPy's global generator (the loop seeds it per rank)
    model = _Seen()
    loss, _ = task.loss(model, batch, torch.device("cpu"), torch.Generator().manual_seed(seed))
    return model.fed[0], loss


def test_pixel_recipe_crops_flips_and_mixes_the_batches_the_model_sees():
    cfg = get_recipe("cifar_pixels")
    token = get_recipe("cifar_seit").augment
    assert cfg.augment.rrc_scale == token.rrc_scale and cfg.augment.rrc_prob == 1.0  # the token recipes' crop range
    assert cfg.augment.flip_prob == 0.5 and cfg.cutmix == 1.0 and cfg.mixup > 0
    task = make_task(cfg, SPEC)
    batch = _batch()
    x = batch["pixels"].float() / 255

    geo, labels = task.augment(x.clone(), torch.Generator().manual_seed(0)), batch["label"]
    # crop: the ramp is stretched (per-row range shrinks for crops < full width) on most samples
    span = geo[:, 0, 16].amax(-1) - geo[:, 0, 16].amin(-1)
    full_span = x[:, 0, 16].amax(-1) - x[:, 0, 16].amin(-1)
    assert (span < full_span - 0.02).sum() >= len(x) // 2
    # flip: the ramp runs right-to-left on some samples, left-to-right on others
    slope = geo[:, 0, 16, -1] - geo[:, 0, 16, 0]
    assert (slope < 0).any() and (slope > 0).any()
    assert geo.min() >= 0 and geo.max() <= 1 and geo.shape == x.shape

    fed, loss = _fed(0, task, batch)
    assert fed.shape == (16, 3, 32, 32) and torch.isfinite(loss)
    assert not torch.allclose(fed, x)
    # mixing: soft targets with two classes per sample (CutMix or Mixup of the flipped batch), smoothing on
    np.random.seed(0)
    _, target = task.augmented(x.clone(), labels, torch.Generator().manual_seed(0))
    assert target.shape == (16, 10) and torch.allclose(target.sum(1), torch.ones(16))
    assert ((target > 0.05).sum(1) == 2).all()

    again, _ = _fed(0, task, batch)  # seeded like the token path: same seeds, same batch
    assert torch.equal(fed, again)
    other, _ = _fed(1, task, batch)
    assert not torch.equal(fed, other)


def test_pixel_augment_refuses_token_only_settings_and_evaluation_is_plain():
    with pytest.raises(ValueError, match=r"unset augment.noise_prob"):
        PixelAugment(AugmentConfig(noise_prob=0.5))
    cfg = get_recipe("cifar_pixels")
    assert make_task(cfg, SPEC, augment=False).augment is None
    x = torch.rand(4, 3, 32, 32)
    off = PixelAugment(AugmentConfig())  # nothing set: the images pass unchanged
    assert torch.equal(off(x, torch.Generator().manual_seed(0)), x)
