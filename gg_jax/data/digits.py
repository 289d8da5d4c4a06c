"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits.

1,797 real 8x8 grey-level images of the digits 0-9 (the UCI "optical recognition
of handwritten digits" test set), shipped inside scikit-learn, so nothing is
downloaded at run time. The pipelines upscale them to any `image_size`
(bilinear) and replicate the grey level to RGB, then normalise exactly like the
photo datasets.

The split is fixed and deterministic: the images are shuffled with a seeded
NumPy generator, stably sorted by class, and every fifth image of that order
goes to `test`. That gives a stratified 1,437 / 360 train / test split that does
not depend on the scikit-learn version.

Training augmentation for digits is a small random translation (up to one
original pixel in each direction). Digits are never flipped: a mirrored 2, 3, 4,
5, 6, 7 or 9 is not the same digit.
"""

from __future__ import annotations

import functools

import numpy as np

NAME = "digits"
NUM_CLASSES = 10
TRAIN_SPLIT = "train"
TEST_SPLIT = "test"
NUM_TRAIN = 1437
NUM_TEST = 360
_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # pragma: no cover - scikit-learn is a train dependency.
        raise ImportError("The embedded 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    # Pixel values are integers 0..16; map them to 0..255.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int32)
    return images, labels


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [n, 8, 8], labels int32 [n]) of `split` ('train' or 'test')."""
    images, labels = _load_all()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    is_test = np.zeros(len(labels), bool)
    is_test[order[::5]] = True
    if split == TRAIN_SPLIT:
        keep = ~is_test
    elif split == TEST_SPLIT:
        keep = is_test
    else:
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    idx = np.flatnonzero(keep)  # The original (class-interleaved) order.
    return images[idx], labels[idx]
