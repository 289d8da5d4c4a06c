"""Dataset sources: TFDS datasets, image folders and the embedded digits.

A source knows a dataset's splits and yields its raw examples, one data shard at
a time, as tf.data datasets of `{'image': ..., 'label': int32}` where the image
is encoded bytes, decoded uint8 pixels, or (`'path'` instead of `'image'`) a file
to read. Decoding and augmentation happen later, in `input_pipeline`, after any
records skipped for resumption have been dropped.

Sharding: shard `i` of `n` holds the contiguous examples
`[i * (N // n) + min(i, N % n), (i + 1) * (N // n) + min(i + 1, N % n))`, the
arithmetic of `tfds.even_splits` (which TFDS sources use directly), so the shards
partition the split and differ in size by at most one example.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any

import numpy as np

from gg_jax.data import digits as digits_lib
from gg_jax.data._tf import tf as _tf
from gg_jax.data._tf import tfds as _tfds
from gg_jax.errors import UserError

IMAGE_FOLDER = "image_folder"
DIGITS = digits_lib.NAME
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Image folders: the eval split is the first of these sub-folders that exists.
IMAGE_FOLDER_EVAL_DIRS = ("val", "validation", "test")
# TFDS datasets whose encoded shard is at most this big are read into memory once.
AUTO_CACHE_MAX_BYTES = 1 << 30


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset is not prepared where it was looked for; the message says how to prepare it."""


class CorruptImageError(UserError, ValueError):
    """An image file could not be decoded; `path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Corrupt or unreadable image file {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a dataset."""

    name: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    train_split: str
    eval_split: str
    data_dir: str | None = None
    class_names: tuple[str, ...] | None = dataclasses.field(default=None, repr=False, compare=False)


def shard_range(num_examples: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of shard `index` of `count` (the arithmetic of `tfds.even_splits`)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    per, rem = divmod(num_examples, count)
    return per * index + min(index, rem), per * (index + 1) + min(index + 1, rem)


def _seed_ints(seed: np.random.SeedSequence, n: int) -> list[int]:
    return [int(x) for x in seed.generate_state(n, np.uint64) >> np.uint64(1)]


class Source:
    """Base class of the dataset sources."""

    info: DatasetInfo
    # Whether horizontal flips keep the label (False for digits).
    allow_flip: bool = True
    # 'crop': resize the shorter side + centre crop; 'resize': resize the whole image.
    eval_mode: str = "crop"
    default_augment: str = "inception_crop"

    def split_size(self, split: str) -> int:
        raise NotImplementedError

    def shard_size(self, split: str, index: int, count: int) -> int:
        start, stop = shard_range(self.split_size(split), index, count)
        return stop - start

    def sequential(self, split: str, index: int, count: int):
        """The shard's examples in a fixed order."""
        raise NotImplementedError

    def shuffled(
        self,
        split: str,
        index: int,
        count: int,
        *,
        seed: np.random.SeedSequence,
        shuffle_buffer: int | None,
        cache: bool | None,
    ):
        """(dataset, order): the shard's examples in an order that depends only on `seed`.

        `order[j]` is the position in `sequential` order of the j-th example, when the
        source can tell (in-memory sources), else None.
        """
        raise NotImplementedError

    def paths(self, split: str, index: int, count: int) -> np.ndarray | None:
        """File of each example of the shard in `sequential` order, if examples are files."""
        return None


class ArraySource(Source):
    """A source whose splits are arrays in memory (pixels, encoded bytes or file paths).

    Shuffling is a full permutation of the shard, so it is exact and skipping
    examples costs nothing.
    """

    def __init__(self, info: DatasetInfo, splits: dict[str, tuple[str, np.ndarray, np.ndarray]]):
        # splits[name] = (kind, payload, labels); kind in {'pixels', 'bytes', 'path'}.
        self.info = info
        self._splits = splits

    def _get(self, split):
        if split not in self._splits:
            raise ValueError(f"{self.info.name} has no split {split!r}; it has {sorted(self._splits)}")
        return self._splits[split]

    def split_size(self, split):
        return len(self._get(split)[2])

    def _dataset(self, split, index, count, order):
        tf = _tf()
        kind, payload, labels = self._get(split)
        start, stop = shard_range(len(labels), index, count)
        idx = np.arange(start, stop) if order is None else start + order
        key = "path" if kind == "path" else "image"
        return tf.data.Dataset.from_tensor_slices({key: payload[idx], "label": labels[idx].astype(np.int32)})

    def sequential(self, split, index, count):
        return self._dataset(split, index, count, None)

    def shuffled(self, split, index, count, *, seed, shuffle_buffer, cache):
        del shuffle_buffer, cache  # Always a full, exact shuffle.
        order = np.random.default_rng(seed).permutation(self.shard_size(split, index, count))
        return self._dataset(split, index, count, order), order

    def paths(self, split, index, count):
        kind, payload, labels = self._get(split)
        if kind != "path":
            return None
        start, stop = shard_range(len(labels), index, count)
        return payload[start:stop]


class DigitsSource(ArraySource):
    """scikit-learn's 8x8 digits (see `gg_jax.data.digits`)."""

    allow_flip = False
    eval_mode = "resize"
    default_augment = "translate"

    def __init__(self):
        splits = {}
        for split in (digits_lib.TRAIN_SPLIT, digits_lib.TEST_SPLIT):
            images, labels = digits_lib.load(split)
            splits[split] = ("pixels", np.repeat(images[..., None], 3, axis=-1), labels)
        info = DatasetInfo(
            name=DIGITS,
            num_classes=digits_lib.NUM_CLASSES,
            num_train_examples=len(splits["train"][2]),
            num_eval_examples=len(splits["test"][2]),
            train_split=digits_lib.TRAIN_SPLIT,
            eval_split=digits_lib.TEST_SPLIT,
            class_names=tuple(str(i) for i in range(10)),
        )
        super().__init__(info, splits)


def _image_folder_layout(root: str) -> str:
    return (
        f"An image folder dataset needs this layout under data_dir={root!r}:\n"
        f"  {root}/train/<class_name>/<image>.jpg   (one sub-folder per class)\n"
        f"  {root}/val/<class_name>/<image>.jpg     (same class names; 'validation' or 'test' also work)\n"
        f"Images may be JPEG, PNG, BMP or GIF ({', '.join(IMAGE_EXTENSIONS)}). Labels are the\n"
        "indices of the class names sorted alphabetically (over train and val together),\n"
        "as tfds.folder_dataset.ImageFolder and torchvision's ImageFolder do."
    )


def _list_class_dirs(split_dir: str) -> list[str]:
    tf = _tf()
    return sorted(
        d.rstrip("/")
        for d in tf.io.gfile.listdir(split_dir)
        if tf.io.gfile.isdir(os.path.join(split_dir, d.rstrip("/")))
    )


def _list_images(class_dir: str) -> list[str]:
    tf = _tf()
    return sorted(
        os.path.join(class_dir, f) for f in tf.io.gfile.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS)
    )


class ImageFolderSource(ArraySource):
    """`root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`, as `tfds.folder_dataset.ImageFolder`."""

    def __init__(self, root: str | None):
        tf = _tf()
        if not root:
            raise DatasetNotFoundError("The image_folder dataset needs data_dir.\n" + _image_folder_layout("DATA_DIR"))
        root = os.fspath(root).rstrip("/")
        train_dir = os.path.join(root, "train")
        if not tf.io.gfile.isdir(train_dir):
            raise DatasetNotFoundError(f"No image folder at {train_dir}.\n" + _image_folder_layout(root))
        eval_name = next((d for d in IMAGE_FOLDER_EVAL_DIRS if tf.io.gfile.isdir(os.path.join(root, d))), "val")
        split_dirs = {"train": train_dir, eval_name: os.path.join(root, eval_name)}
        class_dirs = {split: _list_class_dirs(d) if tf.io.gfile.isdir(d) else [] for split, d in split_dirs.items()}
        class_names = sorted(set().union(*class_dirs.values()))
        splits = {}
        empty = []  # Class folders without an image file.
        for split, d in split_dirs.items():
            paths, labels = [], []
            for label, name in enumerate(class_names):
                if name in class_dirs[split]:
                    files = _list_images(os.path.join(d, name))
                    paths += files
                    labels += [label] * len(files)
                    if not files:
                        empty.append(os.path.join(d, name))
            splits[split] = ("path", np.asarray(paths, dtype=object), np.asarray(labels, np.int32))
        if not len(splits["train"][2]):
            raise DatasetNotFoundError(f"No images found under {train_dir}.\n" + _image_folder_layout(root))
        if not len(splits[eval_name][2]):
            raise DatasetNotFoundError(
                f"No evaluation images under {split_dirs[eval_name]} (training evaluates on them).\n"
                + _image_folder_layout(root)
            )
        if empty:
            logging.warning(
                "Image folder %s: %d class folder(s) hold no image (%s): each is still a class, with no "
                "examples there. Add images or remove the folder(s). Empty: %s",
                root,
                len(empty),
                ", ".join(IMAGE_EXTENSIONS),
                ", ".join(empty),
            )
        untrained = sorted(set(class_names) - set(class_dirs["train"]))
        if untrained:
            logging.warning(
                "Image folder %s: %d class(es) of %s have no folder under %s, so no training image: %s.",
                root,
                len(untrained),
                split_dirs[eval_name],
                train_dir,
                ", ".join(untrained),
            )
        info = DatasetInfo(
            name=IMAGE_FOLDER,
            num_classes=len(class_names),
            num_train_examples=len(splits["train"][2]),
            num_eval_examples=len(splits[eval_name][2]),
            train_split="train",
            eval_split=eval_name,
            data_dir=root,
            class_names=tuple(class_names),
        )
        super().__init__(info, splits)


def _tfds_instructions(name: str, data_dir: str | None) -> str:
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    dd = data_dir or "DATA_DIR"
    if name.startswith("imagenet2012"):
        return (
            f"ImageNet-1K ({name}) is not prepared in {where}. It cannot be downloaded automatically:\n"
            "  1. Register at https://image-net.org/download-images and download\n"
            "     ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB).\n"
            "  2. Put both tar files in one folder, MANUAL_DIR (do not extract them).\n"
            f"  3. pip install tensorflow-datasets && tfds build {name} --data_dir={dd} --manual_dir=MANUAL_DIR\n"
            "     (about 150 GB more disk and a few hours; data_dir may be a gs:// bucket).\n"
            f"  4. Pass data_dir={dd} (config field dataset.data_dir)."
        )
    if name.startswith("places365_small"):
        return (
            f"Places365 ({name}) is not prepared in {where}. TFDS downloads it (about 30 GB) and prepares it:\n"
            f"  tfds build {name} --data_dir={dd}\n"
            f"then pass data_dir={dd} (config field dataset.data_dir)."
        )
    return (
        f"The TFDS dataset {name!r} is not prepared in {where}. Prepare it with\n"
        f"  tfds build {name} --data_dir={dd}\n"
        f"(datasets that need a manual download print where to put the files), then pass data_dir={dd}."
    )


def _tfds_folder_name(name: str) -> str | None:
    """The folder TFDS keeps dataset `name` in ('imagenet2012' for 'imagenet2012/subset:5.*'),
    or None for names it resolves otherwise (community datasets, 'namespace:name')."""
    match = re.fullmatch(r"([a-z0-9_]+)(?:/[\w.-]+)?(?::[\w.*-]+)?", name)
    return match.group(1) if match else None


def _tfds_folder_exists(folder: str, data_dir: str | None) -> bool:
    """Whether `folder` exists in `data_dir`, or (None) in any data dir TFDS looks in."""
    tf = _tf()
    if data_dir:
        roots = [data_dir]
    else:
        try:
            from tensorflow_datasets.core.utils import file_utils

            roots = file_utils.list_data_dirs(None)
        except (ImportError, AttributeError):  # TFDS internals moved: its documented default.
            roots = [os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))]
    return any(tf.io.gfile.exists(os.path.join(os.fspath(root), folder)) for root in roots)


class TfdsSource(Source):
    """Any prepared TFDS image-classification dataset (features image + label)."""

    def __init__(self, name: str, data_dir: str | None):
        tfds = _tfds()

        def unknown(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return DatasetNotFoundError(
                f"Unknown dataset {name!r}: it is neither a TFDS dataset nor prepared in data_dir={data_dir!r}; "
                f"the built-in names are {DIGITS!r} and {IMAGE_FOLDER!r}. ({first})"
            )

        base = _tfds_folder_name(name)
        if base is not None and not _tfds_folder_exists(base, data_dir):
            # Not prepared there: say so before TFDS warns about the missing folder.
            try:
                tfds.builder_cls(base)
            except tfds.core.registered.DatasetNotFoundError as e:
                raise unknown(e) from None
            raise DatasetNotFoundError(_tfds_instructions(name, data_dir))
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise unknown(e) from None
        splits = builder.info.splits
        if not builder.is_prepared() or "train" not in splits:
            raise DatasetNotFoundError(_tfds_instructions(name, data_dir))
        eval_split = next((s for s in ("validation", "test", "val") if s in splits), None)
        if eval_split is None:
            raise DatasetNotFoundError(f"{name} has no validation or test split (splits: {list(splits)}).")
        keys = builder.info.supervised_keys or ("image", "label")
        self._image_key, self._label_key = keys[0], keys[1]
        label_feature = builder.info.features[self._label_key]
        self._builder = builder
        self._cache: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        self.info = DatasetInfo(
            name=name,
            num_classes=int(label_feature.num_classes),
            num_train_examples=int(splits["train"].num_examples),
            num_eval_examples=int(splits[eval_split].num_examples),
            train_split="train",
            eval_split=eval_split,
            data_dir=data_dir,
            class_names=tuple(getattr(label_feature, "names", ()) or ()) or None,
        )

    def split_size(self, split):
        return int(self._builder.info.splits[split].num_examples)

    def _subsplit(self, split, index, count):
        return _tfds().even_splits(split, n=count)[index]

    def shard_size(self, split, index, count):
        return int(self._builder.info.splits[self._subsplit(split, index, count)].num_examples)

    def _read(self, split, index, count, *, shuffle_seed=None):
        tf, tfds = _tf(), _tfds()
        read_config = tfds.ReadConfig(
            try_autocache=False,
            skip_prefetch=True,
            shuffle_seed=shuffle_seed,
            shuffle_reshuffle_each_iteration=False,
            interleave_cycle_length=16,
            interleave_block_length=1,
        )
        decoders = tfds.decode.PartialDecoding(
            {self._image_key: True, self._label_key: True},
            decoders={self._image_key: tfds.decode.SkipDecoding()},
        )
        ds = self._builder.as_dataset(
            split=self._subsplit(split, index, count),
            shuffle_files=shuffle_seed is not None,
            decoders=decoders,
            read_config=read_config,
        )
        return ds.map(
            lambda ex: {"image": ex[self._image_key], "label": tf.cast(ex[self._label_key], tf.int32)},
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def sequential(self, split, index, count):
        return self._read(split, index, count)

    def _should_cache(self, split, index, count, cache):
        if cache is not None:
            return cache
        num_bytes = self._builder.info.splits[split].num_bytes or 0
        return num_bytes / count <= AUTO_CACHE_MAX_BYTES

    def cached_arrays(self, split, index, count):
        """The shard's encoded images and labels, read once into memory."""
        key = (split, index, count)
        if key not in self._cache:
            images, labels = [], []
            for ex in self._read(split, index, count).as_numpy_iterator():
                images.append(ex["image"])
                labels.append(ex["label"])
            logging.info("Cached %d encoded examples of %s/%s in memory.", len(labels), self.info.name, split)
            self._cache[key] = (np.asarray(images, dtype=object), np.asarray(labels, np.int32))
        return self._cache[key]

    def shuffled(self, split, index, count, *, seed, shuffle_buffer, cache):
        tf = _tf()
        if self._should_cache(split, index, count, cache):
            images, labels = self.cached_arrays(split, index, count)
            order = np.random.default_rng(seed).permutation(len(labels))
            return tf.data.Dataset.from_tensor_slices({"image": images[order], "label": labels[order]}), order
        file_seed, buffer_seed = _seed_ints(seed, 2)
        ds = self._read(split, index, count, shuffle_seed=file_seed)
        buffer = shuffle_buffer or 10_000
        ds = ds.shuffle(buffer, seed=buffer_seed, reshuffle_each_iteration=False)
        return ds, None


@functools.lru_cache(maxsize=1)
def _digits_source() -> DigitsSource:
    return DigitsSource()


def get_source(name: str, data_dir: str | None = None) -> Source:
    """The source of dataset `name` (see `get_dataset_info` for the names)."""
    if name == DIGITS:
        return _digits_source()
    if name == IMAGE_FOLDER:
        return ImageFolderSource(data_dir)
    return TfdsSource(name, data_dir)


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Split sizes, class count and split names of dataset `name`.

    Names: 'imagenet2012', 'places365_small' and any TFDS image-classification
    dataset (prepared under `data_dir`, which may be a gs:// path);
    'image_folder' (`data_dir` holds train/<class>/* and val/<class>/*); 'digits'
    (embedded, no data_dir). A dataset that is not there raises
    `DatasetNotFoundError` explaining how to prepare it.
    """
    return get_source(name, data_dir).info


def find_corrupt_image(paths) -> CorruptImageError | None:
    """Decodes each file and returns the error for the first that fails, else None."""
    tf = _tf()
    for path in paths:
        path = path.decode() if isinstance(path, bytes) else str(path)
        try:
            data = tf.io.read_file(path)
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError) as e:
            reason = getattr(e, "message", None) or str(e)
            return CorruptImageError(path, reason.strip().splitlines()[0] if reason.strip() else type(e).__name__)
    return None
