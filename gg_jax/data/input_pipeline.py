"""Process-local train and eval batches on Grain: random-access sources, worker processes, NumPy batches.

A pipeline is a Grain `MapDataset` of whole batches: batch `k` is computed from the
examples it holds by one call, in one worker process (`mp_prefetch`, one batch per
worker in turn, `num_workers` processes, by default one per CPU core of the host), and
is a pure function of its index. The workers run `per_example`'s functions. The
iterators here (`train_batches`, `eval_batches`) yield this process's rows of each
batch, normalised on the host, or uint8 (`normalize=False`) for `global_batches`,
which normalises them on the devices.

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

import os
from typing import Any

import grain
import numpy as np

from gg_jax import sharding
from gg_jax.data import augmentations, datasets, per_example, sources
from gg_jax.data import preprocessing as pp
from gg_jax.errors import UserError

# Batches each worker process keeps ready.
_WORKER_BUFFER = 2
# Grain's words for a worker process that exited without handing over its error.
_DEAD_WORKER = "terminated unexpectedly"


class InputWorkerError(UserError, RuntimeError):
    """An input worker process died (killed, out of memory, crashed); the run stops instead of waiting."""


def steps_per_epoch(info: sources.DatasetInfo, global_batch_size: int) -> int:
    """Train steps per epoch: whole global batches only (the remainder is dropped each epoch)."""
    return info.num_train_examples // global_batch_size


def num_eval_batches(info: sources.DatasetInfo, global_batch_size: int) -> int:
    """Eval batches covering the whole eval split (the last one padded)."""
    return -(-info.num_eval_examples // global_batch_size)


def default_num_workers(source: sources.Source) -> int:
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


def _absl_flags_ready():
    """Grain's worker processes read absl flags: outside an absl program, take their defaults."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------- process-local batches


class _LocalBatches:
    """Shared machinery: a Grain pipeline of batches from `step` on, in worker processes.

    Options of both kinds: `global_batch_size`, `shard_index` of `shard_count` (this
    process's data shard), `num_workers` (None: `default_num_workers`), `dtype` and
    `normalize` (False: uint8 images).
    """

    def __init__(
        self,
        source,
        split,
        *,
        global_batch_size,
        shard_index,
        shard_count,
        num_workers=None,
        dtype=np.float32,
        normalize=True,
    ):
        self.source = source
        self.info = source.info
        self.split = split
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.global_batch_size = global_batch_size
        self.local_batch_size = _check_shard(shard_index, shard_count, global_batch_size)
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
        except sources.CorruptImageError as e:
            self.close()
            # The file and the decoder's reason say it all; the worker's traceback would not help.
            raise sources.CorruptImageError(e.path, e.reason) from None
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
        self, source, *, image_size=224, seed=0, start_step=0, augment=None, train_resize_size=None, **options
    ):
        super().__init__(source, source.info.train_split, **options)
        global_batch_size = self.global_batch_size
        self.steps_per_epoch = steps_per_epoch(self.info, global_batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"The global batch size {global_batch_size} is larger than the {self.info.name} "
                f"train split ({self.info.num_train_examples} examples)."
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, not {start_step}")
        self.augment = augment or source.default_augment
        context = augmentations.AugmentContext(image_size, train_resize_size, source.allow_flip, source.eval_mode)
        self._augment = augmentations.get_augmentation(self.augment, context)
        self.image_size = image_size
        self.seed = seed
        self.step = start_step

    def example_fn(self) -> per_example.TrainExample:
        num_examples = self.source.split_size(self.split)
        start, stop = sources.shard_range(num_examples, self.shard_index, self.shard_count)
        return per_example.TrainExample(
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
        image_size=224,
        resize_size=256,
        ten_crop=False,
        resize_mode="shorter",
        mirror_crop=False,
        split=None,
        **options,
    ):
        super().__init__(source, split or source.info.eval_split, **options)
        self.num_examples = source.split_size(self.split)
        self.num_batches = -(-self.num_examples // self.global_batch_size)
        self._transform, self._shape = per_example.eval_transform(
            source, image_size, resize_size, ten_crop, resize_mode, mirror_crop
        )

    def batches(self):
        start, stop = sources.shard_range(self.num_examples, self.shard_index, self.shard_count)
        fn = per_example.EvalExample(self.source, self.split, start, stop - start, self._transform, self._shape)
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
    if isinstance(name, sources.Source):
        return name
    return datasets.get_source(name, data_dir)


def _local(local_batches, name, *, data_dir=None, global_batch_size, process_index=None, process_count=None, **kwargs):
    index, count = _default_shard(process_index, process_count)
    source = _resolve_source(name, data_dir)
    return local_batches(source, global_batch_size=global_batch_size, shard_index=index, shard_count=count, **kwargs)


def train_batches(name, **kwargs) -> LocalTrainBatches:
    """Process-local train batches (NumPy) of data shard `process_index` of `process_count`.

    Keyword arguments: `data_dir`, `global_batch_size`, `process_index` and `process_count`
    (default `jax.process_index()` / `jax.process_count()`; pass them to look at another
    process's shard), the options of `create_train_iterator`, and `normalize=False` for uint8.
    """
    return _local(LocalTrainBatches, name, **kwargs)


def eval_batches(name, **kwargs) -> LocalEvalBatches:
    """Process-local eval batches (NumPy) of data shard `process_index` of `process_count`;
    keyword arguments as `train_batches`, with the options of `create_eval_iterator`."""
    return _local(LocalEvalBatches, name, **kwargs)
