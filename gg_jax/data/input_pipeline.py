"""Train and eval input pipelines: tf.data on the CPU, global `jax.Array` batches out.

Determinism and resumption (train). Epoch `e` of data shard `p` is a fixed order
of the shard's examples that depends only on (seed, p, shard count, e): TFDS
datasets shuffle their files and then records through a buffer with seeds drawn
from those numbers (in-memory sources use an exact permutation). Each epoch is
cut to `steps_per_epoch` batches, so step `s` is batch `s % steps_per_epoch` of
epoch `s // steps_per_epoch`. Augmentation is stateless, keyed by
(seed, p, shard count, e, position in the epoch), so an example's crop does not
depend on what ran before it. Starting at `start_step` therefore begins directly
at the right epoch and drops the records of the earlier batches of that epoch
before they are decoded (TFDS still reads them: up to one epoch of I/O; image
folders and in-memory data skip for free).

Evaluation. Every process reads its shard of the eval split once, in order, and
pads it with masked examples up to `num_eval_batches` batches, the same number on
every process, so collectives line up and every example is counted exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from gg_jax import sharding
from gg_jax.data import datasets as datasets_lib
from gg_jax.data import prefetch as prefetch_lib
from gg_jax.data import preprocessing as pp
from gg_jax.data._tf import tf as _tf

AUGMENTATIONS = ("inception_crop", "scale_aug", "translate", "center_crop_flip", "square_center_crop_flip", "none")
# How far around a failing batch to look for the corrupt file, in batches.
_DIAGNOSE_WINDOW = (2, 8)


def steps_per_epoch(info: datasets_lib.DatasetInfo, global_batch_size: int) -> int:
    """Train steps per epoch: whole global batches only (the remainder is dropped each epoch)."""
    return info.num_train_examples // global_batch_size


def num_eval_batches(info: datasets_lib.DatasetInfo, global_batch_size: int) -> int:
    """Eval batches covering the whole eval split (the last one padded)."""
    return -(-info.num_eval_examples // global_batch_size)


def _tf_dtype(dtype):
    tf = _tf()
    if dtype is None:
        return tf.float32
    name = np.dtype(dtype).name
    return tf.bfloat16 if name == "bfloat16" else tf.as_dtype(name)


def _options(num_threads: int | None):
    tf = _tf()
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.threading.max_intra_op_parallelism = 1
    if num_threads:
        options.threading.private_threadpool_size = int(num_threads)
    return options


def _load(example):
    tf = _tf()
    return example["image"] if "image" in example else tf.io.read_file(example["path"])


def _eval_fn(source, image_size, resize_size, ten_crop, resize_mode="shorter", mirror_crop=False):
    if ten_crop and mirror_crop:
        raise ValueError("ten_crop and mirror_crop exclude each other: choose one set of crops.")
    if source.eval_mode == "resize":
        if ten_crop or mirror_crop:
            raise ValueError(f"ten_crop/mirror_crop evaluation is not available for {source.info.name}")
        return lambda image: pp.eval_resize(image, image_size=image_size)
    return lambda image: pp.eval_preprocess(
        image,
        image_size=image_size,
        resize_size=resize_size,
        ten_crop_eval=ten_crop,
        resize_mode=resize_mode,
        mirror_crop=mirror_crop,
    )


def _train_fn(source, augment, image_size, resize_size=None):
    flip = source.allow_flip
    if augment in ("center_crop_flip", "square_center_crop_flip"):
        mode = "square" if augment.startswith("square") else "shorter"
        size = resize_size or image_size
        return lambda image, key: pp.center_crop_flip(
            image, key, image_size=image_size, resize_size=size, resize_mode=mode, flip=flip
        )
    if augment == "inception_crop":
        return lambda image, key: pp.inception_crop(image, key, image_size=image_size, flip=flip)
    if augment == "scale_aug":
        return lambda image, key: pp.scale_aug(image, key, image_size=image_size, flip=flip)
    if augment == "translate":
        shift = max(1, round(image_size / 8))
        return lambda image, key: pp.translate(image, key, image_size=image_size, max_shift=shift)
    if augment == "none":
        fn = _eval_fn(source, image_size, max(image_size, round(image_size * 256 / 224)), False)
        return lambda image, key: fn(image)
    raise ValueError(f"augment must be one of {AUGMENTATIONS} (or None), not {augment!r}")


def _epoch_seeds(seed: int, shard_index: int, shard_count: int, epoch: int):
    """(shuffle SeedSequence, augmentation key int64 [2]) of one epoch of one shard."""
    entropy = [int(seed) % (1 << 64), shard_index, shard_count, epoch]
    shuffle_seed, aug_seed = np.random.SeedSequence(entropy).spawn(2)
    aug_key = (aug_seed.generate_state(2, np.uint64) >> np.uint64(1)).astype(np.int64)
    return shuffle_seed, aug_key


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


class _LocalBatches:
    """Shared machinery: iterate tf.data pipelines and name corrupt files on failure."""

    def __init__(self, source, split, shard_index, shard_count, local_batch_size):
        self.source = source
        self.info = source.info
        self.split = split
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.local_batch_size = local_batch_size
        self._tf_iter = None
        self._order = None  # Positions (sequential order) of the current pipeline's examples.
        self._first = 0  # Index in _order of the pipeline's first example.
        self._batches_read = 0  # Batches taken from the current pipeline.

    def __iter__(self):
        return self

    def _start(self, dataset, order, first):
        self._tf_iter = dataset.as_numpy_iterator()
        self._order, self._first, self._batches_read = order, first, 0

    def _next_from_pipeline(self):
        tf = _tf()
        try:
            batch = next(self._tf_iter)
        except tf.errors.OpError:
            corrupt = self._find_corrupt()
            if corrupt is not None:
                # The file and the decoder's reason say it all; TensorFlow's traceback would not help.
                raise corrupt from None
            raise
        self._batches_read += 1
        return batch

    def _find_corrupt(self):
        paths = self.source.paths(self.split, self.shard_index, self.shard_count)
        if paths is None:
            return None
        size = self.local_batch_size
        failing = self._first + self._batches_read * size
        windows = [
            (failing, failing + size),
            (failing - _DIAGNOSE_WINDOW[0] * size, failing + _DIAGNOSE_WINDOW[1] * size),
        ]
        for lo, hi in windows:
            positions = np.arange(max(lo, 0), min(hi, len(paths) if self._order is None else len(self._order)))
            if self._order is not None:
                positions = self._order[positions]
            corrupt = datasets_lib.find_corrupt_image(paths[positions])
            if corrupt is not None:
                return corrupt
        return None


class LocalTrainBatches(_LocalBatches):
    """Infinite iterator of this data shard's train batches as NumPy dicts.

    `image` [local_batch, H, W, 3] (dtype), `label` [local_batch] int32. Batch `step`
    is a pure function of (dataset, seed, shard_index, shard_count, step).
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
        shuffle_buffer=None,
        cache=None,
        num_threads=None,
    ):
        local = _check_shard(shard_index, shard_count, global_batch_size)
        super().__init__(source, source.info.train_split, shard_index, shard_count, local)
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = steps_per_epoch(self.info, global_batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"The global batch size {global_batch_size} is larger than the {self.info.name} "
                f"train split ({self.info.num_train_examples} examples)."
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, not {start_step}")
        augment = augment or source.default_augment
        self._preprocess = _train_fn(source, augment, image_size, train_resize_size)
        self.augment = augment
        self.image_size = image_size
        self.seed = seed
        self.step = start_step
        self._dtype = _tf_dtype(dtype)
        self._shuffle_buffer = shuffle_buffer
        self._cache = cache
        self._num_threads = num_threads
        self._epoch = None
        self._epoch_batches = 0

    def epoch_dataset(self, epoch: int, first_batch: int = 0):
        """(tf.data.Dataset of this shard's batches of `epoch` from `first_batch` on, order or None)."""
        tf = _tf()
        shuffle_seed, aug_key = _epoch_seeds(self.seed, self.shard_index, self.shard_count, epoch)
        ds, order = self.source.shuffled(
            self.split,
            self.shard_index,
            self.shard_count,
            seed=shuffle_seed,
            shuffle_buffer=self._shuffle_buffer,
            cache=self._cache,
        )
        local = self.local_batch_size
        ds = ds.take(self.steps_per_epoch * local).enumerate().skip(first_batch * local)
        preprocess, dtype = self._preprocess, self._dtype
        aug_key = tf.constant(aug_key, tf.int64)

        def prepare(position, example):
            key = tf.random.experimental.stateless_fold_in(aug_key, position)
            image = pp.normalize(preprocess(_load(example), key), dtype)
            return {"image": image, "label": example["label"]}

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(local, drop_remainder=True)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        return ds.with_options(_options(self._num_threads)), order

    def __next__(self):
        while True:
            if self._tf_iter is None:
                epoch, first = divmod(self.step, self.steps_per_epoch)
                if self._epoch is not None and epoch <= self._epoch:
                    # The previous epoch ended early: its shard held fewer examples than the
                    # dataset info says (mocked data). Carry on with the next epoch.
                    epoch, first = self._epoch + 1, 0
                ds, order = self.epoch_dataset(epoch, first)
                self._start(ds, order, first * self.local_batch_size)
                self._epoch, self._epoch_batches = epoch, 0
            try:
                batch = self._next_from_pipeline()
            except StopIteration:
                self._tf_iter = None
                if self._epoch_batches == 0:
                    raise ValueError(
                        f"Epoch {self._epoch} of {self.info.name} yielded no batch of {self.local_batch_size} "
                        "examples on this process: the dataset is smaller than its info says."
                    ) from None
                if self._epoch_batches + self._first // self.local_batch_size < self.steps_per_epoch:
                    logging.warning(
                        "Epoch %d of %s ended after %d of %d batches.",
                        self._epoch,
                        self.info.name,
                        self._epoch_batches,
                        self.steps_per_epoch,
                    )
                continue
            self._epoch_batches += 1
            self.step += 1
            return batch


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
        num_threads=None,
        split=None,
    ):
        local = _check_shard(shard_index, shard_count, global_batch_size)
        super().__init__(source, split or source.info.eval_split, shard_index, shard_count, local)
        self.global_batch_size = global_batch_size
        num_examples = source.split_size(self.split)
        self.num_batches = -(-num_examples // global_batch_size)
        self.num_examples = num_examples
        tf = _tf()
        preprocess = _eval_fn(source, image_size, resize_size, ten_crop, resize_mode, mirror_crop)
        dtype = _tf_dtype(dtype)

        def prepare(example):
            image = pp.normalize(preprocess(_load(example)), dtype)
            return {"image": image, "label": example["label"], "mask": tf.constant(True)}

        ds = source.sequential(self.split, shard_index, shard_count)
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        padding = tf.data.Dataset.from_tensors(
            {
                "image": tf.zeros(ds.element_spec["image"].shape, dtype),
                "label": tf.constant(0, tf.int32),
                "mask": tf.constant(False),
            }
        ).repeat()
        ds = ds.concatenate(padding).take(self.num_batches * local).batch(local)
        ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(num_threads))
        self.dataset = ds
        self._start(ds, None, 0)

    def __len__(self):
        return self.num_batches

    def __next__(self):
        return self._next_from_pipeline()


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
    to look at another process's shard. Keyword arguments as `create_train_iterator`.
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


class GlobalIterator:
    """Batches of global `jax.Array`s sharded over the mesh's data axis."""

    def __init__(self, local: _LocalBatches, mesh, data_axis: str, prefetch: int):
        self.local = local
        self.info = local.info
        self.mesh = mesh
        self.sharding = sharding.batch_sharding(mesh, data_axis)
        self._it = prefetch_lib.DevicePrefetcher(local, self.sharding, local.global_batch_size, prefetch)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def __len__(self):
        return len(self.local)


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
    shuffle_buffer: int | None = None,
    cache: bool | None = None,
    num_threads: int | None = None,
) -> Iterator[dict]:
    """Infinite iterator of train batches `{'image': [B, S, S, 3], 'label': [B] int32}`.

    Arrays are global `jax.Array`s of the whole batch B = global_batch_size, split
    over `data_axis` of `mesh` (default: a 1-axis mesh over all devices); each
    process reads and preprocesses only its own rows. Batches are a pure function
    of (seed, process layout, step), and `start_step=k` yields exactly the batches
    a fresh iterator yields from its k-th on, without decoding the skipped images.

    augment: 'inception_crop' (random-resized crop + flip, the reference's),
      'scale_aug' (shorter side in [256, 512], random crop, flip, PCA lighting),
      'translate' (random shift, no flip; the digits default), 'center_crop_flip' /
      'square_center_crop_flip' (shorter side / both sides resized to `train_resize_size`,
      centre crop, flip: fast-MPN-COV's fine-grained training), 'none' (eval crop),
      None = the dataset's default ('translate' for digits, else 'inception_crop').
      Digits are never flipped.
    train_resize_size: the resize of the centre-crop augmentations (default image_size).
    shuffle_buffer: TFDS record shuffle buffer (default 10,000) when not cached.
    cache: read the process's shard of encoded examples into memory once and shuffle
      it exactly each epoch; None = when the split is at most 1 GiB per process.
    num_threads: size of a private tf.data thread pool (default: shared pool).
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
        dtype=dtype,
        shuffle_buffer=shuffle_buffer,
        cache=cache,
        num_threads=num_threads,
    )
    return GlobalIterator(local, mesh, data_axis, prefetch)


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
    num_threads: int | None = None,
    split: str | None = None,
) -> Iterator[dict]:
    """Finite iterator over the whole eval split, once: `{'image', 'label', 'mask'}`.

    image [B, S, S, 3], or [B, 10, S, S, 3] with `ten_crop` (torchvision TenCrop
    order: 4 corners + centre, then the same of the mirrored image; average the
    logits), or [B, 2, S, S, 3] with `mirror_crop` (the centre crop and its mirror);
    label [B] int32; mask [B] bool, False for padding. `resize_mode`: "shorter" (the
    shorter side to resize_size, torchvision `Resize(s)`) or "square" (`Resize((s, s))`). The last batch is
    padded, never dropped, and every process yields `num_eval_batches` batches.
    Digits are resized whole to image_size (resize_size is not used).
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
        dtype=dtype,
        num_threads=num_threads,
        split=split,
    )
    return GlobalIterator(local, mesh, data_axis, prefetch)
