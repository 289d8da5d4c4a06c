"""From process-local uint8 NumPy batches to normalised global `jax.Array`s sharded over a mesh axis.

Each process produces only the rows of the global batch its own devices hold
(`gg_jax.sharding.data_shard` tells which), and the input pipeline reads the matching
shard of the dataset. Images travel to the devices as uint8 (a quarter of float32's
bytes) and are normalised there, by one jitted function per batch shape.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from gg_jax.data import preprocessing as pp


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding, global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each process-local array into a global array of `global_batch_size` rows."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
        for k, v in batch.items()
    }


@functools.lru_cache(maxsize=16)
def _normalizer(sharding: NamedSharding, dtype_name: str):
    mean = np.asarray([255.0 * m for m in pp.MEAN_RGB], np.float32)
    inv_std = np.asarray([1.0 / (255.0 * s) for s in pp.STDDEV_RGB], np.float32)

    def normalize(images, shift):
        x = images.astype(jnp.float32)
        if shift is not None:
            x = x + shift.reshape(shift.shape[:1] + (1,) * (x.ndim - 2) + (3,))
        return ((x - mean) * inv_std).astype(dtype_name)

    return jax.jit(normalize, out_shardings=sharding)


def normalize_on_device(batch: dict[str, jax.Array], sharding: NamedSharding, dtype) -> dict[str, jax.Array]:
    """`image` (uint8, + `pixel_shift`) -> normalised `dtype` image, as `preprocessing.normalize`."""
    batch = dict(batch)
    shift = batch.pop("pixel_shift", None)
    batch["image"] = _normalizer(sharding, np.dtype(dtype).name)(batch["image"], shift)
    return batch


class DevicePrefetcher:
    """Iterator that keeps `size` batches already transferred to the devices and normalised.

    Transfers and normalisation are asynchronous, so the next batches are copied while the
    current step runs. `size=0` transfers each batch when it is requested. An error of the
    local iterator is raised in order, after the batches before it.
    """

    def __init__(
        self,
        local_batches: Iterator[dict[str, np.ndarray]],
        sharding: NamedSharding,
        global_batch_size: int,
        size: int = 2,
        dtype=np.float32,
    ):
        self._local = local_batches
        self._sharding = sharding
        self._global_batch_size = global_batch_size
        self._size = max(int(size), 0)
        self._dtype = dtype
        self._queue: collections.deque[Any] = collections.deque()
        self._exhausted = False

    def __iter__(self):
        return self

    def clear(self):
        """Drops the prefetched batches (the local iterator is repositioned by the caller)."""
        self._queue.clear()
        self._exhausted = False

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
                batch = to_global(local, self._sharding, self._global_batch_size)
                self._queue.append(normalize_on_device(batch, self._sharding, self._dtype))

    def __next__(self) -> dict[str, jax.Array]:
        self._fill(self._size + 1)
        if not self._queue:
            raise StopIteration
        item = self._queue.popleft()
        if isinstance(item, Exception):
            raise item
        return item
