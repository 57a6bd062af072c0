"""Pixel baselines at matched storage: JPEG shards on any store, the pixel ViT, corruptions."""

import numpy as np
import pytest
import torch

from conftest import flip_byte, write_image_folder
from tokray.data.images import ImageSource, decode_image
from tokray.data.splits import validation_split
from tokray.data.pixels import match_budget, write_pixel_dataset
from tokray.data.stream import PixelBatchCollate
from tokray.eval.corrupt import CORRUPTIONS, corrupt
from tokray.storage.dataset import open_dataset
from tokray.storage.raysource import ShardDatasource
from tokray.storage.stores import ShardChecksumError

CLASSES = ("cat", "dog", "ship")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """30 smooth-with-texture 40x40 PNGs laid out <root>/<class>/<file> (resized to the target size)."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"), CLASSES, per_class=10, size=40)


def _dir_bytes(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_write_read_local(images, tmp_path):
    src = ImageSource(images)
    out = write_pixel_dataset(images, str(tmp_path / "px"), size=16, quality=90, split="all", shard_rows=8)
    ds = open_dataset(tmp_path / "px")
    assert out["samples"] == len(ds) == 30 and out["shards"] == 4
    assert sorted(p.name for p in (tmp_path / "px").iterdir()) == ["manifest.json"] + [
        f"shard-0000{i}.parquet" for i in range(4)]  # no progress or temp files left
    assert ds.manifest.store_bytes == out["store_bytes"] == _dir_bytes(tmp_path / "px")  # manifest included
    assert ds.meta.size == 16 and ds.meta.quality == 90 and ds.meta.class_names == CLASSES

    batches = list(ds.iter_batches(batch_size=7))
    pixels = np.concatenate([b["pixels"] for b in batches])
    sids = np.concatenate([b["sample_id"] for b in batches])
    assert pixels.shape == (30, 16, 16, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(sids, np.arange(30))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), src.labels)
    want = np.stack([decode_image(src.read(i), 16) for i in range(30)])  # tokenization's resize
    assert np.abs(pixels.astype(int) - want).mean() < 8  # q90 JPEG of the same pixels
    raw = ds.read_shard(0).column("jpeg").to_pylist()
    assert isinstance(raw[0], bytes) and raw[0][:2] == b"\xff\xd8"

    batch = PixelBatchCollate(16)(ds.read_shard(1))
    assert batch["pixels"].shape == (8, 3, 16, 16) and batch["pixels"].dtype == torch.uint8
    assert batch["label"].dtype == batch["sample_id"].dtype == torch.int64
    np.testing.assert_array_equal(batch["pixels"].permute(0, 2, 3, 1).numpy(), pixels[8:16])

    # the Ray Data read tasks, run in-process: same rows, all shards
    tasks = ShardDatasource(str(tmp_path / "px")).get_read_tasks(2)
    tables = [t for task in tasks for t in task()]
    assert sorted(sum((t.column("sample_id").to_pylist() for t in tables), [])) == list(range(30))


def test_splits_and_bytes_follow_settings(images, tmp_path):
    val = validation_split(ImageSource(images).labels)
    tr = write_pixel_dataset(images, str(tmp_path / "tr"), size=16, quality=90, split="train")
    va = write_pixel_dataset(images, str(tmp_path / "va"), size=16, quality=90, split="val")
    tr_ids = np.concatenate([b["sample_id"] for b in open_dataset(tmp_path / "tr").iter_batches()])
    va_ids = np.concatenate([b["sample_id"] for b in open_dataset(tmp_path / "va").iter_batches()])
    np.testing.assert_array_equal(va_ids, np.flatnonzero(val))
    np.testing.assert_array_equal(tr_ids, np.flatnonzero(~val))
    assert tr["samples"] + va["samples"] == 30

    low = write_pixel_dataset(images, str(tmp_path / "q10"), size=16, quality=10, split="train")
    small = write_pixel_dataset(images, str(tmp_path / "s8"), size=8, quality=90, split="train")
    assert low["store_bytes"] < tr["store_bytes"] and small["store_bytes"] < tr["store_bytes"]
    assert low["bytes_per_image"] == pytest.approx(low["store_bytes"] / low["samples"])


def test_corrupt_shard_named(images, tmp_path):
    uri = str(tmp_path / "px")
    write_pixel_dataset(images, uri, size=8, quality=75, split="all", shard_rows=10)
    flip_byte(tmp_path / "px" / "shard-00001.parquet", 60)
    ds = open_dataset(uri)
    ds.read_shard(0)  # intact shards still read
    with pytest.raises(ShardChecksumError, match=r"shard-00001.parquet.*jobs/dataset.py verify") as err:
        list(ds.iter_batches())  # the dataset CLI checks pixel datasets too
    import pickle

    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)
    assert [p.split(":")[0] for p in ds.verify()] == ["shard-00001.parquet"]
    task = ShardDatasource(uri, shard_indices=[1]).get_read_tasks(1)[0]
    with pytest.raises(ShardChecksumError, match="shard-00001.parquet"):
        list(task())


def test_interrupted_write_resumes(images, tmp_path):
    uri = str(tmp_path / "px")
    done = []

    def stop_after_two(n):
        done.append(n)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_pixel_dataset(images, uri, size=8, quality=50, split="all", shard_rows=8, progress=stop_after_two)
    with pytest.raises(FileNotFoundError, match="rerun the same"):
        open_dataset(uri)
    with pytest.raises(ValueError, match="other settings"):
        write_pixel_dataset(images, uri, size=8, quality=60, split="all", shard_rows=8)
    flip_byte(tmp_path / "px" / "shard-00001.parquet", 60)  # a damaged finished shard is rewritten
    out = write_pixel_dataset(images, uri, size=8, quality=50, split="all", shard_rows=8)
    assert (out["shards_skipped"], out["shards_written"]) == (1, 3)
    fresh = write_pixel_dataset(images, str(tmp_path / "fresh"), size=8, quality=50, split="all", shard_rows=8)
    assert open_dataset(uri).manifest.shards == open_dataset(tmp_path / "fresh").manifest.shards
    assert out["store_bytes"] == fresh["store_bytes"] == _dir_bytes(tmp_path / "px")

    with pytest.raises(FileExistsError, match="overwrite"):
        write_pixel_dataset(images, uri, size=8, quality=50, split="all")
    assert write_pixel_dataset(images, uri, size=8, quality=20, split="all", overwrite=True)["shards_written"] == 1


def test_s3_store_bytes_and_readback(images, tmp_path, s3_bucket):
    import boto3

    uri = f"s3://{s3_bucket}/px"
    out = write_pixel_dataset(images, uri, size=16, quality=75, split="all", shard_rows=16)
    objects = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="px/")["Contents"]
    assert sorted(o["Key"] for o in objects) == ["px/manifest.json", "px/shard-00000.parquet", "px/shard-00001.parquet"]
    assert out["store_bytes"] == sum(o["Size"] for o in objects)
    local = write_pixel_dataset(images, str(tmp_path / "px"), size=16, quality=75, split="all", shard_rows=16)
    assert local["store_bytes"] == out["store_bytes"]  # same bytes wherever they live
    ids = np.concatenate([b["sample_id"] for b in open_dataset(uri).iter_batches()])
    np.testing.assert_array_equal(ids, np.arange(30))


def test_refusals(images, tmp_path):
    from conftest import write_synth

    with pytest.raises(ValueError, match="quality"):
        write_pixel_dataset(images, str(tmp_path / "x"), size=8, quality=0)
    assert not (tmp_path / "x").exists()
    write_synth(str(tmp_path / "tok"), samples=50, shard_rows=50)
    assert open_dataset(tmp_path / "tok").manifest.kind == "tokens"  # one opener, the kind from the manifest


def test_match_budget_lands_under_target(images, tmp_path):
    ref = write_pixel_dataset(images, str(tmp_path / "ref"), size=16, quality=50, split="all")
    target = ref["store_bytes"]
    fits = match_budget(images, target, sizes=(16, 8), qualities=(90, 50, 10), split="all", sample=30)
    assert fits and (16, 90) not in [(s, q) for s, q, _ in fits] and (8, 10) in [(s, q) for s, q, _ in fits]
    assert [b for _, _, b in fits] == sorted((b for _, _, b in fits), reverse=True)
    size, quality, _ = fits[0]  # closest to the budget
    got = write_pixel_dataset(images, str(tmp_path / "pick"), size=size, quality=quality, split="all")
    assert got["store_bytes"] <= target


@pytest.mark.parametrize("img_size,patch", [(32, 4), (16, 2), (8, 1)])
def test_pixel_vit_matches_token_sequence(img_size, patch):
    import models

    model = models.create_model("pixel_vit_tiny", img_size=img_size, num_classes=3, depth=1)
    assert model.patch_embed.num_patches == 64 and model.patch_embed.patch_size == (patch, patch)
    x = torch.randint(0, 256, (2, 3, img_size, img_size), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    torch.testing.assert_close(model.eval()(x), model(x.float() / 255))  # uint8 and [0, 1] floats agree


def test_pixel_vit_refuses_bad_shapes():
    import models
    from models.pixel_vit import pixel_vit

    with pytest.raises(ValueError, match="divisible by the token grid 8"):
        models.create_model("pixel_vit_tiny", img_size=20)
    with pytest.raises(ValueError, match="channels first"):
        pixel_vit(8, 2)(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_seeded_monotonic(kind, images):
    src = ImageSource(images)
    x = np.stack([decode_image(src.read(i), 32) for i in range(6)])
    outs = [corrupt(x, kind, s, generator=7) for s in range(1, 6)]
    for o in outs:
        assert o.shape == x.shape and o.dtype == np.uint8
    np.testing.assert_array_equal(outs[2], corrupt(x, kind, 3, generator=torch.Generator().manual_seed(7)))
    mse = [float(((o.astype(np.float64) - x) ** 2).mean()) for o in outs]
    assert all(a < b for a, b in zip(mse, mse[1:])), mse
    t = corrupt(torch.from_numpy(x), kind, 2, generator=3)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == x.shape
    if kind == "gaussian_noise":
        assert not np.array_equal(t.numpy(), corrupt(x, kind, 2, generator=4))
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, kind, 6, generator=0)
