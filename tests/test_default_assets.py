"""The embedded CIFAR-10 tokenizer and token set: found without arguments, consistent, small."""

import os

import numpy as np
import pytest

from conftest import ROOT
from tokray.assets import ASSETS, default_tokenizer, default_tokens
from tokray.storage.dataset import open_dataset
from tokray.data.tokenizer import load_tokenizer

CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-train.tar"


def test_default_tokenizer_matches_its_datasets():
    model, info = load_tokenizer(default_tokenizer())  # verifies the weights against the fingerprint
    assert model.grid == (8, 8) and info["fingerprint"] == "43cd99c722a56531"  # recorded in every shipped set
    for split, n in (("train", 40000), ("val", 5000)):
        ds = open_dataset(default_tokens(split))
        assert ds.meta.tokenizer == info["fingerprint"]
        assert ds.meta.codebook_size == model.codebook_size and ds.meta.grid == model.grid
        assert len(ds) == n and ds.verify() == []
        assert np.bincount(ds.labels()).tolist() == [n // 10] * 10


def test_splits_are_disjoint_and_cover_the_source():
    ids = [np.concatenate([b["sample_id"] for b in open_dataset(default_tokens(s)).iter_batches(8192)])
           for s in ("train", "val")]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(np.concatenate(ids)) == list(range(45000))


def test_shipped_bytes_and_storage_ratio():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS) for f in fs)
    assert total <= 12 * 10**6
    tokens = sum(open_dataset(default_tokens(s)).manifest.store_bytes for s in ("train", "val"))
    jpeg = sum(open_dataset(default_tokens(s)).meta.extra["jpeg_bytes"] for s in ("train", "val"))
    assert jpeg == 41_441_078  # the JPEG files of all 45,000 images
    assert tokens <= 0.08 * jpeg


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason="needs ../shared/datasets/cifar10-train.tar")
def test_stored_ids_are_what_the_tokenizer_gives():
    import torch

    from tokray.data.images import ImageSource, decode_image
    from tokray.data.tokenizer import to_unit

    model, _ = load_tokenizer(default_tokenizer())
    batch = next(open_dataset(default_tokens("val")).iter_batches(32))
    src = ImageSource(str(CIFAR_TAR))
    x = to_unit(np.stack([decode_image(src.read(int(i)), 32) for i in batch["sample_id"]]))
    with torch.no_grad():
        ids = model.encode(x.contiguous(memory_format=torch.channels_last)).numpy()
    assert (ids == batch["ids"]).mean() > 0.999  # (conv kernels may differ in the last bit across layouts)
    assert (batch["label"] == src.labels[batch["sample_id"]]).all()
