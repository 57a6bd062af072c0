"""Ray Data Datasource for datasets of any record kind on any store (local, S3 through the cache tier, LMDB).

One read task per group of shards; every shard is verified against its sha256 in the task that
reads it, so a corrupt shard fails the read instead of reaching a training worker. Blocks are
the shards' Arrow tables (token ids stay a fixed-size list of uint16: ~1 byte per token in memory;
pixels stay JPEG bytes until the training stream decodes them).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from tokray.storage.dataset import open_dataset


class ShardDatasource(Datasource):
    def __init__(self, uri: str, shard_indices: Iterable[int] | None = None):
        ds = open_dataset(uri)  # fail on the driver, with a clear error, before any task starts
        self.uri = ds.uri
        self.manifest = ds.manifest
        self.format = ds.format
        self.shard_indices = list(range(len(ds.manifest.shards)) if shard_indices is None else shard_indices)

    def _size(self, shard_indices) -> int:
        infos = [self.manifest.shards[i] for i in shard_indices]
        return self.format.inmemory_bytes(self.manifest.meta, sum(s.rows for s in infos), sum(s.bytes for s in infos))

    def estimate_inmemory_data_size(self) -> int:
        return self._size(self.shard_indices)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        groups = [g for g in np.array_split(np.array(self.shard_indices, dtype=int),
                                            max(1, min(parallelism, len(self.shard_indices)))) if len(g)]
        schema = self.format.schema(self.manifest.meta)
        tasks = []
        for group in groups:
            infos = [self.manifest.shards[i] for i in group]
            meta = BlockMetadata(num_rows=sum(s.rows for s in infos), size_bytes=self._size(group),
                                 exec_stats=None, input_files=tuple(s.path for s in infos))
            tasks.append(ReadTask(_reader(self.uri, [int(i) for i in group]), meta, schema=schema,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def _reader(uri: str, shard_indices: list[int]):
    def read() -> Iterable[pa.Table]:
        ds = open_dataset(uri)
        for i in shard_indices:
            yield ds.read_shard(i)
    return read


def read_ray_dataset(uri, shard_indices=None, **read_args):
    """A ``ray.data.Dataset`` of the dataset's records (tokens: {ids: uint16[h*w], label, sample_id}; pixels:
    {jpeg, label, sample_id}); ``read_args`` go to read_datasource. Batch it with
    ``tokray.data.stream.iter_torch_batches``."""
    import ray.data

    return ray.data.read_datasource(ShardDatasource(str(uri), shard_indices), **read_args)
