"""Ray Data Datasource for token datasets on any store (local, S3 through the cache tier, LMDB).

One read task per group of shards; every shard is verified against its sha256 in the task that
reads it, so a corrupt shard fails the read instead of reaching a training worker. Blocks are
the shards' Arrow tables (ids stay a fixed-size list of uint16: ~1 byte per token in memory).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from tokray.storage import codec
from tokray.storage.dataset import open_dataset


class TokenDatasource(Datasource):
    def __init__(self, uri: str, shard_indices: Iterable[int] | None = None):
        ds = open_dataset(uri)  # fail on the driver, with a clear error, before any task starts
        self.uri = str(ds.store.uri)
        self.manifest = ds.manifest
        self.shard_indices = list(range(len(ds.manifest.shards)) if shard_indices is None else shard_indices)

    def estimate_inmemory_data_size(self) -> int:
        return sum(self.manifest.shards[i].rows for i in self.shard_indices) * (
            2 * self.manifest.meta.tokens_per_sample + 12)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        groups = [g for g in np.array_split(np.array(self.shard_indices, dtype=int),
                                            max(1, min(parallelism, len(self.shard_indices)))) if len(g)]
        schema = codec.schema(self.manifest.meta.tokens_per_sample)
        tasks = []
        for group in groups:
            infos = [self.manifest.shards[i] for i in group]
            meta = BlockMetadata(num_rows=sum(s.rows for s in infos),
                                 size_bytes=sum(s.rows for s in infos) * (2 * self.manifest.meta.tokens_per_sample + 12),
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
    """A ``ray.data.Dataset`` of {ids: uint16[h*w], label, sample_id}; ``read_args`` go to read_datasource."""
    import ray.data

    return ray.data.read_datasource(TokenDatasource(str(uri), shard_indices), **read_args)
