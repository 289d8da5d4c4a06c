"""From process-local NumPy batches to global `jax.Array`s sharded over a mesh axis.

Each process produces only the rows of the global batch its own devices hold
(`gg_jax.sharding.data_shard` tells which), and the input pipeline reads the matching
shard of the dataset.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding, global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process-local array into a global array of `global_batch_size` rows."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
        for k, v in batch.items()
    }


class DevicePrefetcher:
    """Iterator that keeps `size` batches already transferred to the devices.

    Transfers are asynchronous, so the next batches are copied while the current
    step runs. `size=0` transfers each batch when it is requested.
    """

    def __init__(
        self,
        local_batches: Iterator[dict[str, np.ndarray]],
        sharding: NamedSharding,
        global_batch_size: int,
        size: int = 2,
    ):
        self._local = local_batches
        self._sharding = sharding
        self._global_batch_size = global_batch_size
        self._size = max(int(size), 0)
        self._queue: collections.deque[Any] = collections.deque()
        self._exhausted = False

    def __iter__(self):
        return self

    def _fill(self, n: int):
        while not self._exhausted and len(self._queue) < n:
            try:
                local = next(self._local)
            except StopIteration:
                self._exhausted = True
            except Exception as e:  # Delivered in order, after the batches before it.
                self._queue.append(e)
                self._exhausted = True
            else:
                self._queue.append(to_global(local, self._sharding, self._global_batch_size))

    def __next__(self) -> dict[str, jax.Array]:
        self._fill(self._size + 1)
        if not self._queue:
            raise StopIteration
        item = self._queue.popleft()
        if isinstance(item, Exception):
            raise item
        return item
