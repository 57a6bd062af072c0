"""The Ray Data path training consumes: same records, uint16 ids, corrupt shards fail the read."""

import numpy as np
import pytest
import torch

from conftest import write_synth
from tokray.data.spec import DataSpec
from tokray.data.stream import iter_torch_batches
from tokray.storage.dataset import open_dataset
from tokray.storage.raysource import read_ray_dataset


@pytest.mark.parametrize("kind", ["local", "lmdb", "s3"])
def test_ray_dataset_roundtrip(kind, tmp_path, ray_session, request):
    uri = {"local": str(tmp_path / "ds"), "lmdb": f"lmdb://{tmp_path}/env"}.get(kind)
    if kind == "s3":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/ds"
    gen = write_synth(uri, samples=1800, shard_rows=400)
    batches = list(iter_torch_batches(read_ray_dataset(uri), _spec(uri), batch_size=256))
    ids = torch.cat([b["ids"] for b in batches])
    sids = torch.cat([b["sample_id"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert ids.dtype == torch.uint16 and ids.shape == (1800, 8, 8)
    order = torch.argsort(sids)
    want_ids, want_labels, want_sids = gen.chunk(0, 1800)
    np.testing.assert_array_equal(sids[order].numpy(), want_sids)
    np.testing.assert_array_equal(ids[order].numpy(), want_ids)
    np.testing.assert_array_equal(labels[order].numpy(), want_labels)


def test_streaming_split_gives_disjoint_equal_parts(tmp_path, ray_session):
    uri = str(tmp_path / "ds")
    write_synth(uri, samples=2000, shard_rows=250)
    from concurrent.futures import ThreadPoolExecutor

    parts = read_ray_dataset(uri).streaming_split(2, equal=True)

    def consume(it):  # both consumers must run at once, as the Train workers do
        return torch.cat([b["sample_id"] for b in iter_torch_batches(it, _spec(uri), batch_size=100)])

    with ThreadPoolExecutor(2) as pool:
        seen = list(pool.map(consume, parts))
    assert len(seen[0]) == len(seen[1]) == 1000
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_corrupt_shard_fails_the_ray_read(tmp_path, ray_session):
    uri = str(tmp_path / "ds")
    write_synth(uri, samples=1200, shard_rows=400)
    path = tmp_path / "ds" / "shard-00002.parquet"
    data = bytearray(path.read_bytes())
    data[200] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="shard-00002.parquet"):
        list(iter_torch_batches(read_ray_dataset(uri), _spec(uri), batch_size=100))


def _spec(uri) -> DataSpec:
    return DataSpec.from_manifest(open_dataset(uri).manifest)
