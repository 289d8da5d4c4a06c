"""Dataset sources by name: TFDS datasets (ArrayRecord), image folders, the embedded digits, synthetic.

A source knows a dataset's splits and reads any example of them by position
(random access, as Grain's data sources): `record(split, index) -> (image, label)`
where the image is encoded bytes or uint8 pixels. Decoding and augmentation
happen later, in `input_pipeline`. Sources are built by name from `SOURCES`, a
registry (`register_source`); any other name is a TFDS dataset, read with
`tfds.data_source`-style ArrayRecord readers, which need no TensorFlow.

Sharding: shard `i` of `n` holds the contiguous examples
`[i * (N // n) + min(i, N % n), (i + 1) * (N // n) + min(i + 1, N % n))`, the
arithmetic of `tfds.even_splits` and of Grain's `ShardByJaxProcess` (without
`drop_remainder`), so the shards partition the split and differ in size by at
most one example.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from gg_jax.data import digits as digits_lib
from gg_jax.errors import UserError

IMAGE_FOLDER = "image_folder"
DIGITS = digits_lib.NAME
SYNTHETIC = "synthetic"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Image folders: the eval split is the first of these sub-folders that exists.
IMAGE_FOLDER_EVAL_DIRS = ("val", "validation", "test")


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset is not prepared where it was looked for; the message says how to prepare it."""


class DatasetFormatError(UserError, ValueError):
    """The dataset is prepared in a format the pipeline does not read (TFRecord); the message says how to convert it."""


class CorruptImageError(UserError, ValueError):
    """An image could not be decoded; `path` names its file (or TFDS record)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Corrupt or unreadable image file {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # Raised in input worker processes and re-raised in the trainer's.
        return type(self), (self.path, self.reason)


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


class Source:
    """Base class of the dataset sources (picklable: input worker processes get a copy)."""

    info: DatasetInfo
    # Whether horizontal flips keep the label (False for digits).
    allow_flip: bool = True
    # 'crop': resize the shorter side + centre crop; 'resize': resize the whole image.
    eval_mode: str = "crop"
    default_augment: str = "inception_crop"
    # In-memory pixels that take microseconds each: no worker processes by default.
    cheap: bool = False

    def split_size(self, split: str) -> int:
        raise NotImplementedError

    def record(self, split: str, index: int) -> tuple[Any, int]:
        """(image: encoded bytes or uint8 pixels, label) of example `index` of `split`."""
        raise NotImplementedError

    def describe(self, split: str, index: int) -> str:
        """Where example `index` of `split` comes from (its file or record), for error messages."""
        return f"{self.info.name}/{split}[{index}]"

    def check_split(self, split: str) -> None:
        self.split_size(split)


class ArraySource(Source):
    """A source whose splits are arrays in memory (pixels, encoded bytes or file paths)."""

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

    def record(self, split, index):
        kind, payload, labels = self._get(split)
        item = payload[index]
        if kind == "path":
            with open(item, "rb") as f:
                item = f.read()
        return item, int(labels[index])

    def describe(self, split, index):
        kind, payload, _ = self._get(split)
        return str(payload[index]) if kind == "path" else super().describe(split, index)

    def paths(self, split: str) -> np.ndarray | None:
        """The file of each example of `split`, if examples are files."""
        kind, payload, _ = self._get(split)
        return payload if kind == "path" else None


class DigitsSource(ArraySource):
    """scikit-learn's 8x8 digits (see `gg_jax.data.digits`)."""

    allow_flip = False
    eval_mode = "resize"
    default_augment = "translate"
    cheap = True

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


# ------------------------------------------------------------------ image folder


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
    return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _list_images(class_dir: str) -> list[str]:
    return sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))


class ImageFolderSource(ArraySource):
    """`root/train/<class>/*.jpg` and `root/val/<class>/*.jpg`, as `tfds.folder_dataset.ImageFolder`."""

    def __init__(self, root: str | None):
        if not root:
            raise DatasetNotFoundError("The image_folder dataset needs data_dir.\n" + _image_folder_layout("DATA_DIR"))
        root = os.fspath(root).rstrip("/")
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise DatasetNotFoundError(f"No image folder at {train_dir}.\n" + _image_folder_layout(root))
        eval_name = next((d for d in IMAGE_FOLDER_EVAL_DIRS if os.path.isdir(os.path.join(root, d))), "val")
        split_dirs = {"train": train_dir, eval_name: os.path.join(root, eval_name)}
        class_dirs = {split: _list_class_dirs(d) if os.path.isdir(d) else [] for split, d in split_dirs.items()}
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


# --------------------------------------------------------------------- synthetic


class SyntheticSource(Source):
    """ImageNet-shaped examples made up on the fly, for benchmarking the whole trainer without data.

    ImageNet-1K's sizes (1,000 classes, 1,281,167 train / 50,000 validation examples);
    example `i` is one of `NUM_DISTINCT` generated photo-like JPEGs of ImageNet's common
    sizes (500x375, 375x500, 500x333; quality 90, about 85 KB), with label `i % 1000`.
    The images go through the same decoding and augmentation as real ones.
    """

    NUM_DISTINCT = 64
    SIZES = ((375, 500), (500, 375), (333, 500))

    def __init__(self):
        self.info = DatasetInfo(
            name=SYNTHETIC,
            num_classes=1000,
            num_train_examples=1_281_167,
            num_eval_examples=50_000,
            train_split="train",
            eval_split="validation",
            class_names=None,
        )
        self._jpegs: dict[int, bytes] = {}

    def __getstate__(self):  # Each process makes the images itself (the same ones).
        return {**self.__dict__, "_jpegs": {}}

    def image(self, k: int) -> bytes:
        """Distinct image `k` (made on first use, the same in every process)."""
        if k not in self._jpegs:
            from gg_jax.data import testing  # pylint: disable=g-import-not-at-top

            rng = np.random.default_rng([20190616, k])
            pixels = testing.random_photo(rng, *self.SIZES[k % len(self.SIZES)])
            self._jpegs[k] = testing.encode_image(pixels, quality=90)
        return self._jpegs[k]

    def split_size(self, split):
        sizes = {"train": self.info.num_train_examples, "validation": self.info.num_eval_examples}
        if split not in sizes:
            raise ValueError(f"{SYNTHETIC} has splits 'train' and 'validation', not {split!r}")
        return sizes[split]

    def record(self, split, index):
        offset = 0 if split == "train" else 7  # Validation images in another order.
        return self.image((index + offset) % self.NUM_DISTINCT), index % self.info.num_classes


# -------------------------------------------------------------------------- TFDS


def _tfds():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


def _tfds_build_command(name: str, dd: str, manual: bool = False) -> str:
    manual_dir = " --manual_dir=MANUAL_DIR" if manual else ""
    return f"tfds build {name} --data_dir={dd}{manual_dir} --file_format=array_record"


def _tfds_instructions(name: str, data_dir: str | None) -> str:
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    dd = data_dir or "DATA_DIR"
    setup = "pip install tensorflow-datasets tensorflow-cpu  (TensorFlow only for this step)"
    if name.startswith("imagenet2012"):
        return (
            f"ImageNet-1K ({name}) is not prepared in {where}. It cannot be downloaded automatically:\n"
            "  1. Register at https://image-net.org/download-images and download\n"
            "     ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB).\n"
            "  2. Put both tar files in one folder, MANUAL_DIR (do not extract them).\n"
            f"  3. {setup}\n"
            f"     {_tfds_build_command(name, dd, manual=True)}\n"
            "     (about 150 GB more disk and a few hours; data_dir may be a gs:// bucket).\n"
            f"  4. Pass data_dir={dd} (config field dataset.data_dir). See docs/data.md."
        )
    if name.startswith("places365_small"):
        return (
            f"Places365 ({name}) is not prepared in {where}. TFDS downloads it (about 30 GB) and prepares it:\n"
            f"  {setup}\n"
            f"  {_tfds_build_command(name, dd)}\n"
            f"then pass data_dir={dd} (config field dataset.data_dir). See docs/data.md."
        )
    return (
        f"The TFDS dataset {name!r} is not prepared in {where}. Prepare it with\n"
        f"  {setup}\n"
        f"  {_tfds_build_command(name, dd)}\n"
        f"(datasets that need a manual download print where to put the files), then pass data_dir={dd}."
    )


def _tfds_folder_name(name: str) -> str | None:
    """The folder TFDS keeps dataset `name` in ('imagenet2012' for 'imagenet2012/subset:5.*'),
    or None for names it resolves otherwise (community datasets, 'namespace:name')."""
    match = re.fullmatch(r"([a-z0-9_]+)(?:/[\w.-]+)?(?::[\w.*-]+)?", name)
    return match.group(1) if match else None


def _tfds_data_dirs(data_dir: str | None) -> list[str]:
    if data_dir:
        return [os.fspath(data_dir)]
    try:
        from tensorflow_datasets.core.utils import file_utils  # pylint: disable=g-import-not-at-top

        return [os.fspath(d) for d in file_utils.list_data_dirs(None)]
    except (ImportError, AttributeError):  # TFDS internals moved: its documented default.
        return [os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))]


def _exists(path: str) -> bool:
    from etils import epath  # pylint: disable=g-import-not-at-top  # gs:// paths too.

    return epath.Path(path).exists()


class TfdsSource(Source):
    """Any prepared TFDS image-classification dataset (features image + label), read from its
    ArrayRecord files (`tfds build ... --file_format=array_record`) without TensorFlow."""

    def __init__(self, name: str, data_dir: str | None):
        tfds = _tfds()

        def unknown(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return DatasetNotFoundError(
                f"Unknown dataset {name!r}: it is neither a TFDS dataset nor prepared in data_dir={data_dir!r}; "
                f"the built-in names are {', '.join(repr(n) for n in SOURCES)}. ({first})"
            )

        base = _tfds_folder_name(name)
        if base is not None and not any(_exists(os.path.join(d, base)) for d in _tfds_data_dirs(data_dir)):
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
        formats = {f.value for f in builder.info.available_file_formats()}
        if "array_record" not in formats:
            raise DatasetFormatError(
                f"{name} in {builder.data_dir} is prepared as {', '.join(sorted(formats)) or 'an unknown format'} "
                "only; the input pipeline reads ArrayRecord files (random access, no TensorFlow). Convert it once "
                "(this step needs TensorFlow: pip install tensorflow-cpu): tfds convert_format "
                f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record "
                f"(or rebuild it with: {_tfds_build_command(name, data_dir or 'DATA_DIR')})."
            )
        keys = builder.info.supervised_keys or ("image", "label")
        self._image_key, self._label_key = keys[0], keys[1]
        label_feature = builder.info.features[self._label_key]
        self._name_key = next(
            (k for k in ("file_name", "filename", "image/filename") if k in builder.info.features), None
        )
        self._builder = builder
        self._readers: dict[str, Any] = {}
        self._checked: set[str] = set()
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
        for split in ("train", eval_split):  # Before any training, not at the first evaluation.
            self.check_split(split)

    def __getstate__(self):  # Workers get the readers, not the builder.
        for split in self._builder.info.splits:
            self._reader(split)
        return {**self.__dict__, "_builder": None}

    def split_size(self, split):
        if self._builder is None:
            return len(self._reader(split))
        if split not in self._builder.info.splits:
            raise ValueError(f"{self.info.name} has no split {split!r}; it has {list(self._builder.info.splits)}")
        return int(self._builder.info.splits[split].num_examples)

    def check_split(self, split):
        """Every ArrayRecord file of `split` is there (a clear error now, not in a worker later)."""
        self.split_size(split)
        if self._builder is None or split in self._checked:
            return
        from etils import epath  # pylint: disable=g-import-not-at-top

        files = [epath.Path(p) for p in self._builder.info.splits[split].filepaths]
        present = {p.name for p in epath.Path(self._builder.data_dir).iterdir()}  # One listing, also on gs://.
        missing = [str(f) for f in files if f.name not in present]
        if missing:
            raise DatasetNotFoundError(
                f"{self.info.name}: the ArrayRecord file {missing[0]} of split {split!r} is missing "
                f"({len(missing)} of {len(files)} files). Copy it back, or prepare the dataset again: "
                f"{_tfds_build_command(self.info.name, self.info.data_dir or 'DATA_DIR')}"
            )
        self._checked.add(split)

    def _reader(self, split):
        if split not in self._readers:
            tfds = _tfds()
            self.check_split(split)
            self._readers[split] = self._builder.as_data_source(
                split=split, decoders={self._image_key: tfds.decode.SkipDecoding()}
            )
        return self._readers[split]

    def _example(self, split, index):
        return self._reader(split)[int(index)]

    def record(self, split, index):
        example = self._example(split, index)
        return example[self._image_key], int(example[self._label_key])

    def describe(self, split, index):
        where = f"{self.info.name}/{split}[{index}]"
        if self._name_key is None:
            return where
        try:
            file_name = self._example(split, index)[self._name_key]
        except Exception:  # pylint: disable=broad-except  # Only for a message.
            return where
        file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        return f"{where} ({file_name})"


# ---------------------------------------------------------------------- registry

SourceFactory = Callable[[str | None], Source]
SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str):
    """Registers `factory(data_dir) -> Source` as dataset `name`; other names are TFDS datasets."""

    def wrap(factory):
        if name in SOURCES:
            raise ValueError(f"dataset source {name!r} is registered twice")
        SOURCES[name] = factory
        return factory

    return wrap


@register_source(DIGITS)
@functools.lru_cache(maxsize=1)
def _digits_source(data_dir=None) -> DigitsSource:
    del data_dir  # Embedded.
    return DigitsSource()


@register_source(IMAGE_FOLDER)
def _image_folder_source(data_dir) -> ImageFolderSource:
    return ImageFolderSource(data_dir)


@register_source(SYNTHETIC)
def _synthetic_source(data_dir=None) -> SyntheticSource:
    del data_dir  # Generated.
    return SyntheticSource()


def get_source(name: str, data_dir: str | None = None) -> Source:
    """The source of dataset `name` (see `get_dataset_info` for the names)."""
    factory = SOURCES.get(name)
    return factory(data_dir) if factory is not None else TfdsSource(name, data_dir)


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Split sizes, class count and split names of dataset `name`.

    Names: 'imagenet2012', 'places365_small' and any TFDS image-classification
    dataset prepared in ArrayRecord format under `data_dir` (which may be a gs://
    path); 'image_folder' (`data_dir` holds train/<class>/* and val/<class>/*);
    'digits' (embedded, no data_dir); 'synthetic' (ImageNet-shaped generated
    images, no data_dir). A dataset that is not there raises `DatasetNotFoundError`
    explaining how to prepare it; one in TFRecord format only, `DatasetFormatError`
    explaining how to convert it.
    """
    return get_source(name, data_dir).info


def find_corrupt_image(paths) -> CorruptImageError | None:
    """Decodes each file and returns the error for the first that fails, else None."""
    from gg_jax.data import preprocessing as pp  # pylint: disable=g-import-not-at-top

    for path in paths:
        path = path.decode() if isinstance(path, bytes) else str(path)
        try:
            pp.to_array(pp.decode(pp.read_image(path)))
        except (pp.UndecodableImageError, OSError) as e:
            return CorruptImageError(path, str(e) or type(e).__name__)
    return None
