"""The device mesh and the two shardings of data-parallel training, in one place.

Data parallelism by sharding: the model state is replicated on every device of a 1-axis
mesh over every device of every process, and each batch is split along its first axis
over the mesh axis `data`. Inside a jitted step every reduction over the batch is then a
reduction over the global batch, and XLA inserts the cross-device all-reduces.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gg_jax.errors import UserError

DATA_AXIS = "data"


class BatchSizeError(UserError, ValueError):
    """A global batch does not split evenly over the devices (or processes); says what to use."""


def make_mesh(devices=None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-axis mesh over `devices` (default: every device of every process, in `jax.make_mesh`'s
    order: each process's devices contiguous). Auto axis: shardings are given to `jax.jit`."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (axis,), (jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
    """Leading (batch) dimension split over `axis`, the rest replicated."""
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {mesh.axis_names})")
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def replicated_tree(tree, mesh: Mesh):
    """The replicated sharding for every leaf of `tree` (e.g. an abstract train state)."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda _: sharding, tree)


def put_replicated(tree, shardings):
    """Host arrays (the same on every process) -> global arrays placed with `shardings`."""

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def check_batch_size(batch_size, parts: int, what: str = "devices", field: str = "batch_size") -> int:
    """`batch_size // parts`; `BatchSizeError` unless `batch_size` is a positive multiple of `parts`.

    what: the parts in words ("devices", "processes"); field: the config field the user
    sets, quoted in the message.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise BatchSizeError(f"config.{field} must be a positive integer, got {batch_size!r}.")
    if batch_size % parts:
        detail = ""
        if what == "devices":
            detail = f" ({jax.local_device_count()} per process x {jax.process_count()} processes)"
        raise BatchSizeError(
            f"config.{field}={batch_size} is not divisible by the number of {what}, {parts}{detail}. The global "
            f"batch is split evenly over them: use a multiple of {parts}, e.g. "
            f"--config.{field}={max(parts, batch_size // parts * parts)}."
        )
    return int(batch_size) // parts


def data_shard(mesh: Mesh, axis: str, global_batch_size: int, field: str = "batch_size") -> tuple[int, int, int]:
    """(shard_index, shard_count, local_batch_size) of this process for a global batch.

    The rows of the batch this process's devices hold form one contiguous block; its index
    among the equal blocks is the data shard this process reads.
    """
    check_batch_size(global_batch_size, mesh.shape[axis], "devices", field)
    sharding = batch_sharding(mesh, axis)
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
            f"along {axis!r} (rows {rows}); build the mesh so that each process owns a "
            "contiguous part of the data axis (e.g. with jax.make_mesh)."
        )
    return start // local, global_batch_size // local, local
