"""Train and eval input pipelines on Grain: random-access sources, worker processes, global `jax.Array` batches.

A pipeline is a Grain `MapDataset` of whole batches: batch `k` is computed from the
examples it holds by one call, in one worker process (`mp_prefetch`, one batch per
worker in turn, `num_workers` processes, by default one per CPU core of the host), and
is a pure function of its index. Images leave the workers as uint8 and are normalised
on the devices (`prefetch`); the process-local iterators (`train_batches`,
`eval_batches`) normalise on the host instead.

Determinism and resumption (train). Epoch `e` of data shard `p` of `n` is a
permutation of the shard's examples drawn from (seed, p, n, e), cut to
`steps_per_epoch` batches (the remainder is dropped), so step `s` is batch
`s % steps_per_epoch` of epoch `s // steps_per_epoch`. Each example's augmentation
draws from a NumPy generator seeded with (seed, p, n, e, position in the epoch).
Batch `s` is therefore a pure function of (seed, process layout, s): `start_step=k`
begins at batch k without reading anything before it, and so does `set_state`
with the state `get_state` returned (what Orbax checkpoints through Grain's
checkpoint handler).

Evaluation. Every process reads its shard of the eval split once, in order, and
pads it with masked examples up to `num_eval_batches` batches, the same number on
every process, so collectives line up and every example is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import grain
import numpy as np

from gg_jax import sharding
from gg_jax.data import datasets as datasets_lib
from gg_jax.data import prefetch as prefetch_lib
from gg_jax.data import preprocessing as pp
from gg_jax.errors import UserError

AUGMENTATIONS = pp.AUGMENTATIONS
# Batches each worker process keeps ready.
_WORKER_BUFFER = 2
# Grain's words for a worker process that exited without handing over its error.
_DEAD_WORKER = "terminated unexpectedly"


class InputWorkerError(UserError, RuntimeError):
    """An input worker process died (killed, out of memory, crashed); the run stops instead of waiting."""


def steps_per_epoch(info: datasets_lib.DatasetInfo, global_batch_size: int) -> int:
    """Train steps per epoch: whole global batches only (the remainder is dropped each epoch)."""
    return info.num_train_examples // global_batch_size


def num_eval_batches(info: datasets_lib.DatasetInfo, global_batch_size: int) -> int:
    """Eval batches covering the whole eval split (the last one padded)."""
    return -(-info.num_eval_examples // global_batch_size)


def default_num_workers(source: datasets_lib.Source) -> int:
    """One worker process per CPU core this process may use; none for in-memory pixels (digits)."""
    if source.cheap:
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_shard(shard_index, shard_count, global_batch_size):
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"process_index {shard_index} must be in [0, process_count={shard_count})")
    return sharding.check_batch_size(global_batch_size, shard_count, "processes (data shards)")


def _default_shard(process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def _entropy(seed: int) -> int:
    return int(seed) % (1 << 64)


def _absl_flags_ready():
    """Grain's worker processes read absl flags: outside an absl program, take their defaults."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------ per-example functions
# Run in the worker processes (pickled with the pipeline): plain data and a source.


@dataclasses.dataclass
class _TrainExample:
    """Element j of the infinite train sequence of one data shard: read, decode, augment."""

    source: datasets_lib.Source
    split: str
    start: int  # The shard's first example in the split.
    shard_size: int
    per_epoch: int  # Examples used per epoch (steps_per_epoch * local batch).
    seed: int
    shard_index: int
    shard_count: int
    augment: pp.Augment

    def __post_init__(self):
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_orders", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__post_init__()

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the shard's examples in `epoch`."""
        with self._lock:
            if epoch not in self._orders:
                entropy = [_entropy(self.seed), self.shard_index, self.shard_count, epoch, 0]
                if len(self._orders) >= 2:
                    self._orders.pop(min(self._orders))
                self._orders[epoch] = np.random.default_rng(entropy).permutation(self.shard_size)
            return self._orders[epoch]

    def __call__(self, j: int) -> dict[str, Any]:
        epoch, position = divmod(int(j), self.per_epoch)
        index = self.start + int(self.order(epoch)[position])
        rng = np.random.default_rng([_entropy(self.seed), self.shard_index, self.shard_count, epoch, 1, position])
        image, label = self.source.record(self.split, index)
        try:
            out = self.augment(image, rng)
        except pp.UndecodableImageError as e:
            raise datasets_lib.CorruptImageError(self.source.describe(self.split, index), str(e)) from None
        out["label"] = np.int32(label)
        return out


@dataclasses.dataclass
class _EvalExample:
    """Element i of one data shard of the eval split, or a masked padding example past its end."""

    source: datasets_lib.Source
    split: str
    start: int
    shard_size: int
    transform: pp.Augment
    pad_shape: tuple[int, ...]

    def __call__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i >= self.shard_size:
            return {"image": np.zeros(self.pad_shape, np.uint8), "label": np.int32(0), "mask": np.bool_(False)}
        index = self.start + i
        image, label = self.source.record(self.split, index)
        try:
            out = self.transform(image, None)
        except pp.UndecodableImageError as e:
            raise datasets_lib.CorruptImageError(self.source.describe(self.split, index), str(e)) from None
        return {"image": out["image"], "label": np.int32(label), "mask": np.bool_(True)}


def _eval_transform(source, image_size, resize_size, ten_crop, resize_mode="shorter", mirror_crop=False):
    """(transform, output shape) of the eval split of `source`."""
    if ten_crop and mirror_crop:
        raise ValueError("ten_crop and mirror_crop exclude each other: choose one set of crops.")
    if source.eval_mode == "resize":
        if ten_crop or mirror_crop:
            raise ValueError(f"ten_crop/mirror_crop evaluation is not available for {source.info.name}")
        return pp.ImageTransform(pp.resize_whole, pp.frozen_kwargs(image_size=image_size), uses_rng=False), (
            image_size,
            image_size,
            3,
        )
    if resize_mode not in pp.RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {pp.RESIZE_MODES}, not {resize_mode!r}")
    if image_size > resize_size:
        raise ValueError(f"image_size {image_size} must not exceed resize_size {resize_size}")
    crops = "ten" if ten_crop else "mirror" if mirror_crop else "center"
    shape = {"ten": (10,), "mirror": (2,), "center": ()}[crops] + (image_size, image_size, 3)
    kwargs = pp.frozen_kwargs(image_size=image_size, resize_size=resize_size, resize_mode=resize_mode, crops=crops)
    return pp.ImageTransform(pp.eval_crop, kwargs, uses_rng=False), shape


# ------------------------------------------------------------- process-local batches


class _LocalBatches:
    """Shared machinery: a Grain pipeline of batches from `first_batch` on, in worker processes."""

    def __init__(self, source, split, shard_index, shard_count, local_batch_size, *, num_workers, dtype, normalize):
        self.source = source
        self.info = source.info
        self.split = split
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.local_batch_size = local_batch_size
        self.num_workers = default_num_workers(source) if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, not {num_workers}")
        self.dtype = dtype
        self.normalize = normalize
        self.step = 0  # Index of the next batch.
        self._it = None
        source.check_split(split)

    def batches(self) -> grain.MapDataset:
        """All batches of this shard as a random-access Grain dataset."""
        raise NotImplementedError

    def __iter__(self):
        return self

    def _open(self):
        ds = self.batches()[self.step :]
        if self.num_workers:
            _absl_flags_ready()
            # Each worker computes whole batches in turn (batch k in worker k % num_workers).
            it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers, per_worker_buffer_size=_WORKER_BUFFER)
            )
        else:  # One background thread in this process.
            it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=_WORKER_BUFFER))
        return iter(it_ds)

    def start(self):
        """Starts the worker processes (idempotent): they make the first batches meanwhile."""
        if self._it is None:
            self._it = self._open()

    def __next__(self) -> dict[str, np.ndarray]:
        self.start()
        try:
            batch = next(self._it)
        except datasets_lib.CorruptImageError as e:
            self.close()
            # The file and the decoder's reason say it all; the worker's traceback would not help.
            raise datasets_lib.CorruptImageError(e.path, e.reason) from None
        except RuntimeError as e:
            self.close()
            if _DEAD_WORKER in str(e):
                raise InputWorkerError(
                    f"An input worker process of {self.info.name}/{self.split} died ({e}). A killed worker "
                    "(exit code -9) is most often the out-of-memory killer: lower dataset.num_workers or the "
                    "batch size. The run stops here; rerunning resumes from the last checkpoint."
                ) from None
            raise
        self.step += 1
        if self.normalize:
            batch = dict(batch)
            shift = batch.pop("pixel_shift", None)
            batch["image"] = pp.normalize(batch["image"], self.dtype, shift)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self.step = int(state["step"])

    def close(self):
        """Stops the worker processes (idempotent; iterating again restarts them)."""
        if self._it is not None:
            it, self._it = self._it, None
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except  # Interpreter shutdown.
            pass


class LocalTrainBatches(_LocalBatches):
    """Infinite iterator of this data shard's train batches as NumPy dicts.

    `image` [local_batch, H, W, 3] (dtype, normalised; uint8 with `normalize=False`, then
    with `pixel_shift` [local_batch, 3] for `scale_aug`), `label` [local_batch] int32.
    Batch `step` is a pure function of (dataset, seed, shard_index, shard_count, step).
    """

    def __init__(
        self,
        source,
        *,
        global_batch_size,
        shard_index,
        shard_count,
        image_size=224,
        seed=0,
        start_step=0,
        augment=None,
        train_resize_size=None,
        dtype=np.float32,
        num_workers=None,
        normalize=True,
    ):
        local = _check_shard(shard_index, shard_count, global_batch_size)
        super().__init__(
            source,
            source.info.train_split,
            shard_index,
            shard_count,
            local,
            num_workers=num_workers,
            dtype=dtype,
            normalize=normalize,
        )
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = steps_per_epoch(self.info, global_batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"The global batch size {global_batch_size} is larger than the {self.info.name} "
                f"train split ({self.info.num_train_examples} examples)."
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, not {start_step}")
        self.augment = augment or source.default_augment
        context = pp.AugmentContext(image_size, train_resize_size, source.allow_flip, source.eval_mode)
        self._augment = pp.get_augmentation(self.augment, context)
        self.image_size = image_size
        self.seed = seed
        self.step = start_step

    def example_fn(self) -> _TrainExample:
        num_examples = self.source.split_size(self.split)
        start, stop = datasets_lib.shard_range(num_examples, self.shard_index, self.shard_count)
        return _TrainExample(
            source=self.source,
            split=self.split,
            start=start,
            shard_size=stop - start,
            per_epoch=self.steps_per_epoch * self.local_batch_size,
            seed=self.seed,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
            augment=self._augment,
        )

    def batches(self):
        examples = grain.MapDataset.range(np.iinfo(np.int64).max).map(self.example_fn())
        return examples.batch(self.local_batch_size, drop_remainder=True)

    def get_state(self):
        return {
            "step": self.step,
            "seed": self.seed,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
            "dataset": self.info.name,
        }


class LocalEvalBatches(_LocalBatches):
    """Finite iterator of this data shard's eval batches: image, label, mask (False = padding)."""

    def __init__(
        self,
        source,
        *,
        global_batch_size,
        shard_index,
        shard_count,
        image_size=224,
        resize_size=256,
        ten_crop=False,
        resize_mode="shorter",
        mirror_crop=False,
        dtype=np.float32,
        num_workers=None,
        split=None,
        normalize=True,
    ):
        local = _check_shard(shard_index, shard_count, global_batch_size)
        super().__init__(
            source,
            split or source.info.eval_split,
            shard_index,
            shard_count,
            local,
            num_workers=num_workers,
            dtype=dtype,
            normalize=normalize,
        )
        self.global_batch_size = global_batch_size
        self.num_examples = source.split_size(self.split)
        self.num_batches = -(-self.num_examples // global_batch_size)
        self._transform, self._shape = _eval_transform(
            source, image_size, resize_size, ten_crop, resize_mode, mirror_crop
        )

    def batches(self):
        start, stop = datasets_lib.shard_range(self.num_examples, self.shard_index, self.shard_count)
        fn = _EvalExample(self.source, self.split, start, stop - start, self._transform, self._shape)
        examples = grain.MapDataset.range(self.num_batches * self.local_batch_size).map(fn)
        return examples.batch(self.local_batch_size)

    def __len__(self):
        return self.num_batches

    def __next__(self):
        if self.step >= self.num_batches:
            self.close()
            raise StopIteration
        return super().__next__()


def _resolve_source(name, data_dir):
    if isinstance(name, datasets_lib.Source):
        return name
    return datasets_lib.get_source(name, data_dir)


def train_batches(
    name,
    *,
    data_dir=None,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    **kwargs,
) -> LocalTrainBatches:
    """Process-local train batches (NumPy) of data shard `process_index` of `process_count`.

    Defaults to `jax.process_index()` / `jax.process_count()`; pass them explicitly
    to look at another process's shard. Keyword arguments as `create_train_iterator`
    (without mesh, data_axis, prefetch), and `normalize=False` for uint8 images.
    """
    index, count = _default_shard(process_index, process_count)
    return LocalTrainBatches(
        _resolve_source(name, data_dir),
        global_batch_size=global_batch_size,
        shard_index=index,
        shard_count=count,
        **kwargs,
    )


def eval_batches(
    name,
    *,
    data_dir=None,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    **kwargs,
) -> LocalEvalBatches:
    """Process-local eval batches (NumPy) of data shard `process_index` of `process_count`."""
    index, count = _default_shard(process_index, process_count)
    return LocalEvalBatches(
        _resolve_source(name, data_dir),
        global_batch_size=global_batch_size,
        shard_index=index,
        shard_count=count,
        **kwargs,
    )


# ------------------------------------------------------------------ global batches


class GlobalIterator(grain.DatasetIterator):
    """Batches of global `jax.Array`s sharded over the mesh's data axis.

    A Grain `DatasetIterator`: `get_state()` is the position of the next batch it returns
    (whatever it has prefetched), `set_state(state)` moves it there, so
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` checkpoint it with Orbax.
    """

    def __init__(self, local: _LocalBatches, mesh, data_axis: str, prefetch: int, dtype):
        super().__init__()
        self.local = local
        self.info = local.info
        self.mesh = mesh
        self.sharding = sharding.batch_sharding(mesh, data_axis)
        self._step = local.step
        self._prefetcher = prefetch_lib.DevicePrefetcher(local, self.sharding, local.global_batch_size, prefetch, dtype)

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
    mesh = mesh if mesh is not None else sharding.make_mesh(axis=data_axis)
    index, count, _ = sharding.data_shard(mesh, data_axis, global_batch_size)
    return mesh, index, count


def create_train_iterator(
    name: str,
    *,
    data_dir: str | None = None,
    global_batch_size: int,
    image_size: int = 224,
    seed: int = 0,
    start_step: int = 0,
    augment: str | None = None,
    train_resize_size: int | None = None,
    mesh=None,
    data_axis: str = "data",
    dtype=np.float32,
    prefetch: int = 2,
    num_workers: int | None = None,
) -> GlobalIterator:
    """Infinite iterator of train batches `{'image': [B, S, S, 3], 'label': [B] int32}`.

    Arrays are global `jax.Array`s of the whole batch B = global_batch_size, split
    over `data_axis` of `mesh` (default: a 1-axis mesh over all devices); each
    process reads and preprocesses only its own rows. Batches are a pure function
    of (seed, process layout, step), and `start_step=k` (or `set_state`) yields exactly
    the batches a fresh iterator yields from its k-th on, without reading the skipped ones.

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
    prefetch: batches kept transferred to the devices ahead of the step.
    """
    mesh, index, count = _mesh_shard(mesh, data_axis, global_batch_size)
    local = train_batches(
        name,
        data_dir=data_dir,
        global_batch_size=global_batch_size,
        process_index=index,
        process_count=count,
        image_size=image_size,
        seed=seed,
        start_step=start_step,
        augment=augment,
        train_resize_size=train_resize_size,
        num_workers=num_workers,
        normalize=False,
    )
    return GlobalIterator(local, mesh, data_axis, prefetch, dtype)


def create_eval_iterator(
    name: str,
    *,
    data_dir: str | None = None,
    global_batch_size: int,
    image_size: int = 224,
    resize_size: int = 256,
    ten_crop: bool = False,
    resize_mode: str = "shorter",
    mirror_crop: bool = False,
    mesh=None,
    data_axis: str = "data",
    dtype=np.float32,
    prefetch: int = 2,
    num_workers: int | None = None,
    split: str | None = None,
) -> GlobalIterator:
    """Finite iterator over the whole eval split, once: `{'image', 'label', 'mask'}`.

    image [B, S, S, 3], or [B, 10, S, S, 3] with `ten_crop` (torchvision TenCrop
    order: 4 corners + centre, then the same of the mirrored image; average the
    logits), or [B, 2, S, S, 3] with `mirror_crop` (the centre crop and its mirror);
    label [B] int32; mask [B] bool, False for padding. `resize_mode`: "shorter" (the
    shorter side to resize_size, torchvision `Resize(s)`) or "square" (`Resize((s, s))`).
    The last batch is padded, never dropped, and every process yields `num_eval_batches`
    batches. Digits are resized whole to image_size (resize_size is not used).
    """
    mesh, index, count = _mesh_shard(mesh, data_axis, global_batch_size)
    local = eval_batches(
        name,
        data_dir=data_dir,
        global_batch_size=global_batch_size,
        process_index=index,
        process_count=count,
        image_size=image_size,
        resize_size=resize_size,
        ten_crop=ten_crop,
        resize_mode=resize_mode,
        mirror_crop=mirror_crop,
        num_workers=num_workers,
        split=split,
        normalize=False,
    )
    return GlobalIterator(local, mesh, data_axis, prefetch, dtype)
