"""Global batches: process-local uint8 NumPy batches made into normalised global `jax.Array`s
sharded over a mesh axis, and the iterators the trainer reads (`create_train_iterator`,
`create_eval_iterator`, `GlobalIterator`).

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

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from gg_jax import sharding as sharding_lib
from gg_jax.data import input_pipeline
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


class GlobalIterator(grain.DatasetIterator):
    """Batches of global `jax.Array`s sharded over the mesh's data axis.

    A Grain `DatasetIterator`: `get_state()` is the position of the next batch it returns
    (whatever it has prefetched), `set_state(state)` moves it there, so
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` checkpoint it with Orbax.
    """

    def __init__(
        self,
        local: input_pipeline.LocalTrainBatches | input_pipeline.LocalEvalBatches,
        mesh,
        data_axis: str,
        prefetch: int,
        dtype,
    ):
        super().__init__()
        self.local = local
        self.info = local.info
        self.mesh = mesh
        self.sharding = sharding_lib.batch_sharding(mesh, data_axis)
        self._step = local.step
        self._prefetcher = DevicePrefetcher(local, self.sharding, local.global_batch_size, prefetch, dtype)

    def __next__(self):
        batch = next(self._prefetcher)
        self._step += 1
        return batch

    def __len__(self):
        return len(self.local)

    def get_state(self) -> dict[str, Any]:
        return {**self.local.get_state(), "step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._prefetcher.clear()
        self.local.set_state(state)
        self._step = self.local.step

    def start_prefetch(self) -> None:
        """Starts making batches now (Grain's checkpoint handler calls it after `set_state`)."""
        self.local.start()

    def close(self) -> None:
        self.local.close()
        super().close()


def _mesh_shard(mesh, data_axis, global_batch_size):
    mesh = mesh if mesh is not None else sharding_lib.make_mesh(axis=data_axis)
    index, count, _ = sharding_lib.data_shard(mesh, data_axis, global_batch_size)
    return mesh, index, count


def _global(local_batches, name, global_batch_size, mesh, *, data_axis="data", dtype=np.float32, prefetch=2, **options):
    """The process's local batches (`local_batches`, train or eval) of `mesh`'s data shard, as
    global arrays, uint8 to the devices and normalised there into `dtype`."""
    mesh, index, count = _mesh_shard(mesh, data_axis, global_batch_size)
    local = local_batches(
        name, global_batch_size=global_batch_size, process_index=index, process_count=count, normalize=False, **options
    )
    return GlobalIterator(local, mesh, data_axis, prefetch, dtype)


def create_train_iterator(name: str, *, global_batch_size: int, mesh=None, **options) -> GlobalIterator:
    """Infinite iterator of train batches `{'image': [B, S, S, 3], 'label': [B] int32}`.

    Arrays are global `jax.Array`s of the whole batch B = global_batch_size, split
    over `data_axis` of `mesh` (default: a 1-axis mesh over all devices); each
    process reads and preprocesses only its own rows. Batches are a pure function
    of (seed, process layout, step), and `start_step=k` (or `set_state`) yields exactly
    the batches a fresh iterator yields from its k-th on, without reading the skipped ones.

    options: data_axis ("data"), dtype (float32: of the images on the devices), prefetch (2:
    batches kept transferred to the devices ahead of the step), and those of
    `input_pipeline.LocalTrainBatches`:
      data_dir: where the dataset is (TFDS data_dir, the image folder's root).
      image_size (224), seed (0), start_step (0).
      augment: a name of `AUGMENTATIONS`: 'inception_crop' (random-resized crop + flip, the
        reference's), 'scale_aug' (shorter side in [256, 512], random crop, flip, PCA
        lighting), 'translate' (random shift, no flip; the digits default),
        'center_crop_flip' / 'square_center_crop_flip' (shorter side / both sides resized
        to `train_resize_size`, centre crop, flip: fast-MPN-COV's fine-grained training),
        'none' (eval crop), None = the dataset's default ('translate' for digits, else
        'inception_crop'). Digits are never flipped.
      train_resize_size: the resize of the centre-crop augmentations (default image_size).
      num_workers: Grain worker processes decoding and augmenting (default: one per CPU
        core; 0 for digits); 0 = one thread of this process.
    """
    return _global(input_pipeline.train_batches, name, global_batch_size, mesh, **options)


def create_eval_iterator(name: str, *, global_batch_size: int, mesh=None, **options) -> GlobalIterator:
    """Finite iterator over the whole eval split, once: `{'image', 'label', 'mask'}`.

    image [B, S, S, 3], or [B, 10, S, S, 3] with `ten_crop` (torchvision TenCrop
    order: 4 corners + centre, then the same of the mirrored image; average the
    logits), or [B, 2, S, S, 3] with `mirror_crop` (the centre crop, and the centre crop of
    the mirrored image); label [B] int32; mask [B] bool, False for padding. The last batch
    is padded, never dropped, and every process yields `num_eval_batches` batches.

    options: data_axis, dtype, prefetch as `create_train_iterator`'s; data_dir; image_size (224); resize_size
    (256: the resize before the crops; digits are resized whole to image_size instead);
    resize_mode ("shorter": the shorter side to resize_size, torchvision `Resize(s)`; "square":
    `Resize((s, s))`); ten_crop, mirror_crop (False); num_workers; split (the dataset's eval
    split by default).
    """
    return _global(input_pipeline.eval_batches, name, global_batch_size, mesh, **options)
