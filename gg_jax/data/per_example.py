"""The per-example functions of the pipelines, run in the input worker processes.

`TrainExample` reads element j of the infinite train sequence of one data shard,
decodes and augments it; `EvalExample` reads element i of a shard of the eval split,
or makes a masked padding example past its end; `eval_transform` builds the eval
transform they apply. They are plain data and a source, so they pickle into the
workers.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from gg_jax.data import augmentations, sources
from gg_jax.data import preprocessing as pp
from gg_jax.data.decoding import UndecodableImageError


def _entropy(seed: int) -> int:
    return int(seed) % (1 << 64)


@dataclasses.dataclass
class TrainExample:
    """Element j of the infinite train sequence of one data shard: read, decode, augment."""

    source: sources.Source
    split: str
    start: int  # The shard's first example in the split.
    shard_size: int
    per_epoch: int  # Examples used per epoch (steps_per_epoch * local batch).
    seed: int
    shard_index: int
    shard_count: int
    augment: augmentations.Augment

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
        except UndecodableImageError as e:
            raise sources.CorruptImageError(self.source.describe(self.split, index), str(e)) from None
        out["label"] = np.int32(label)
        return out


@dataclasses.dataclass
class EvalExample:
    """Element i of one data shard of the eval split, or a masked padding example past its end."""

    source: sources.Source
    split: str
    start: int
    shard_size: int
    transform: augmentations.Augment
    pad_shape: tuple[int, ...]

    def __call__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i >= self.shard_size:
            return {"image": np.zeros(self.pad_shape, np.uint8), "label": np.int32(0), "mask": np.bool_(False)}
        index = self.start + i
        image, label = self.source.record(self.split, index)
        try:
            out = self.transform(image, None)
        except UndecodableImageError as e:
            raise sources.CorruptImageError(self.source.describe(self.split, index), str(e)) from None
        return {"image": out["image"], "label": np.int32(label), "mask": np.bool_(True)}


def eval_transform(source, image_size, resize_size, ten_crop, resize_mode="shorter", mirror_crop=False):
    """(transform, output shape) of the eval split of `source`."""
    if ten_crop and mirror_crop:
        raise ValueError("ten_crop and mirror_crop exclude each other: choose one set of crops.")
    if source.eval_mode == "resize":
        if ten_crop or mirror_crop:
            raise ValueError(f"ten_crop/mirror_crop evaluation is not available for {source.info.name}")
        return augmentations.ImageTransform(
            pp.resize_whole, augmentations.frozen_kwargs(image_size=image_size), uses_rng=False
        ), (
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
    kwargs = augmentations.frozen_kwargs(
        image_size=image_size, resize_size=resize_size, resize_mode=resize_mode, crops=crops
    )
    return augmentations.ImageTransform(pp.eval_crop, kwargs, uses_rng=False), shape
