"""From process-local NumPy batches to global `jax.Array`s sharded over a mesh axis.

The global batch is split along its first dimension over the mesh axis
`data_axis` (and replicated over any other axis). Each process produces only the
rows its own devices hold; `data_shard` tells which rows those are, and the input
pipeline reads the matching shard of the dataset. With the usual meshes (every
process owns a contiguous block of the data axis) the data shard of a process is
its process index.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def default_mesh(data_axis: str = "data") -> Mesh:
    """A 1-axis mesh over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (data_axis,))


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
    """Leading (batch) dimension split over `data_axis`, the rest replicated."""
    if data_axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {data_axis!r} (axes: {mesh.axis_names})")
    return NamedSharding(mesh, PartitionSpec(data_axis))


def data_shard(mesh: Mesh, data_axis: str, global_batch_size: int) -> tuple[int, int, int]:
    """(shard_index, shard_count, local_batch_size) of this process for a global batch.

    Raises ValueError if the batch does not divide over the devices of the data axis.
    """
    sharding = batch_sharding(mesh, data_axis)
    num = mesh.shape[data_axis]
    if global_batch_size <= 0 or global_batch_size % num:
        raise ValueError(
            f"The global batch size {global_batch_size} is not divisible by the number of devices "
            f"along the mesh axis {data_axis!r} ({num} of {mesh.devices.size} devices in total); "
            f"use a multiple of {num}."
        )
    rows = sorted(
        {
            idx[0].indices(global_batch_size)[:2]
            for idx in sharding.addressable_devices_indices_map((global_batch_size,)).values()
        }
    )
    start, stop = rows[0][0], rows[-1][1]
    local = stop - start
    contiguous = all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    if not contiguous or global_batch_size % local or start % local:
        raise ValueError(
            "This process's devices do not hold one contiguous, evenly sized block of the batch "
            f"along {data_axis!r} (rows {rows}); build the mesh so that each process owns a "
            "contiguous part of the data axis (e.g. with jax.make_mesh)."
        )
    return start // local, global_batch_size // local, local


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
