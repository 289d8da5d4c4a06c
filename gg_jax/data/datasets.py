"""Dataset sources by name: the built-in ones (image folders, the embedded digits,
synthetic) registered in `SOURCES`, and `get_source` / `get_dataset_info`, which
fall back to a TFDS dataset (`tfds_source`) for any other name.

Decoding and augmentation happen later, in `input_pipeline`; `find_corrupt_image`
decodes files up front to name a corrupt one.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from gg_jax.data import decoding
from gg_jax.data import digits as digits_lib
from gg_jax.data.sources import (
    SOURCES,
    ArraySource,
    CorruptImageError,
    DatasetInfo,
    DatasetNotFoundError,
    Source,
    register_source,
)
from gg_jax.data.tfds_source import TfdsSource

IMAGE_FOLDER = "image_folder"
DIGITS = digits_lib.NAME
SYNTHETIC = "synthetic"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Image folders: the eval split is the first of these sub-folders that exists.
IMAGE_FOLDER_EVAL_DIRS = ("val", "validation", "test")


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


# ---------------------------------------------------------------------- registry


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
    for path in paths:
        path = path.decode() if isinstance(path, bytes) else str(path)
        try:
            decoding.to_array(decoding.decode(decoding.read_image(path)))
        except (decoding.UndecodableImageError, OSError) as e:
            return CorruptImageError(path, str(e) or type(e).__name__)
    return None
