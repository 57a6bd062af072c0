"""Every CIFAR recipe builds its model and augmentation from the embedded data and takes a training step;
the ImageNet recipes are complete configs; recipe constraints fail with clear errors."""

import dataclasses

import pytest
import torch

from tokray.config import TrainConfig
from tokray.recipes import get_recipe, list_recipes
from tokray.train.tasks import make_task


@pytest.fixture(scope="module")
def embedded():
    from tokray.assets import default_tokens
    from tokray.data.spec import DataSpec
    from tokray.storage.dataset import open_dataset

    ds = open_dataset(default_tokens("val"))
    batch = next(ds.iter_batches(16))
    return ds, DataSpec.from_manifest(ds.manifest), batch


@pytest.mark.parametrize("name", [n for n in list_recipes() if n.startswith("cifar_") and n != "cifar_pixels"])
def test_cifar_recipe_takes_a_finite_step(name, embedded):
    from tokray.train.launch import load_codebook

    ds, spec, batch = embedded
    cfg = get_recipe(name)
    task = make_task(cfg, spec, load_codebook(cfg, ds))
    if cfg.augment.mixing:  # soft targets as wide as the data's classes (the recipe leaves it to the data)
        assert task.augment.cfg.num_classes == spec.num_classes == 10
    model = task.build()
    gen = torch.Generator().manual_seed(0)
    batch = {"ids": torch.from_numpy(batch["ids"].astype("int64")), "label": torch.from_numpy(batch["label"].astype("int64"))}
    loss, _ = task.loss(model, batch, torch.device("cpu"), gen)
    assert torch.isfinite(loss), name
    loss.backward()
    if cfg.codebook_stem:  # SeiT: the stem sees the codebook itself, frozen
        emb = model.patch_embed.embed.weight
        assert not emb.requires_grad and torch.equal(emb, task.codebook)
    if cfg.task == "classify":
        assert model(task.eval_view(batch["ids"])).shape == (16, 10)


@pytest.mark.parametrize("name", ["seit", "seit_mtm", "seitpp_nomtm", "seitpp", "mtm_imagenet", "seitpp_mtm"])
def test_imagenet_recipes_hold_the_papers_settings(name):
    cfg = get_recipe(name)
    assert cfg.augment.out_size == 28 and cfg.use_gpu
    if name in ("seitpp", "seitpp_nomtm", "seitpp_mtm"):
        assert cfg.augment.tokenadapt
    if name == "seitpp":
        assert (cfg.layer_decay, cfg.lr, cfg.epochs, cfg.augment.coloradapt_prob) == (0.65, 4e-3, 100, 0.25)
    if name == "seit":
        assert cfg.codebook_stem and cfg.epochs == 300 and cfg.augment.eda_replace_prob == 0.25


def test_recipe_that_needs_an_mtm_checkpoint_says_which():
    from tokray.train.launch import prepare

    with pytest.raises(ValueError, match=r"python jobs/pretrain.py --recipe cifar_seitpp_mtm"):
        prepare(get_recipe("cifar_seitpp"), resume=False)


def test_mixing_in_two_places_is_refused():
    with pytest.raises(ValueError, match="mix in one place"):
        dataclasses.replace(get_recipe("cifar_seit"), cutmix=1.0)
    with pytest.raises(ValueError, match="unknown task"):
        TrainConfig(recipe="x", task="detect")


def test_config_json_round_trips_with_a_typed_augment_and_reads_old_partial_dicts():
    import json

    from tokray.config import CLASSES_FROM_DATA, AugmentConfig

    cfg = get_recipe("cifar_seitpp_nomtm")
    assert isinstance(cfg.augment, AugmentConfig) and cfg.augment.enabled and cfg.augment.mixing
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    old = json.loads(cfg.to_json())  # written before augment was typed: only the fields a recipe set
    old["augment"] = {"rrc_prob": 1.0, "rrc_scale": [0.35, 1.0], "cutmix_alpha": 1.0}
    aug = TrainConfig.from_json(json.dumps(old)).augment
    assert aug == AugmentConfig(rrc_prob=1.0, rrc_scale=(0.35, 1.0), cutmix_alpha=1.0, num_classes=CLASSES_FROM_DATA)
    assert not get_recipe("cifar_ft").augment.enabled
    with pytest.raises(ValueError, match="augment.rrc_scale"):
        AugmentConfig(rrc_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="config field augment must be an AugmentConfig"):
        TrainConfig(recipe="x", augment={"rrc_prob": 1.0})
