"""Augmentations by name: the `AUGMENTATIONS` registry of per-example train transforms.

An augmentation is built for an `AugmentContext` (output size, the resize of the
centre-crop recipes, whether flips keep the label, the dataset's evaluation transform)
and maps (image, NumPy generator) to {'image': uint8 [S, S, 3]} (+ 'pixel_shift':
float32 [3], the lighting noise of `scale_aug`). `register_augmentation` adds one under
the name the config's `dataset.augment` gives; `ImageTransform` and
`ImageShiftTransform` wrap the transforms of `preprocessing` picklably for the workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from gg_jax.data.preprocessing import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_RESIZE_SIZE,
    center_crop_flip,
    eval_crop,
    inception_crop,
    resize_whole,
    scale_aug,
    translate,
)


@dataclasses.dataclass(frozen=True)
class AugmentContext:
    """What an augmentation is built for: output size, the resize of centre-crop recipes,
    whether flips keep the label, and the dataset's evaluation transform ('crop' | 'resize')."""

    image_size: int
    resize_size: int | None = None
    flip: bool = True
    eval_mode: str = "crop"


# An augmentation maps (image, rng) to {'image': uint8 [S, S, 3]} (+ 'pixel_shift': float32 [3]).
Augment = Callable[[Any, np.random.Generator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    name: str
    build: Callable[[AugmentContext], Augment]
    doc: str


AUGMENTATIONS: dict[str, Augmentation] = {}


def register_augmentation(name: str, doc: str):
    """Registers `build(context) -> augment` under `name` (the config's `dataset.augment`)."""

    def wrap(build):
        if name in AUGMENTATIONS:
            raise ValueError(f"augmentation {name!r} is registered twice")
        AUGMENTATIONS[name] = Augmentation(name, build, doc)
        return build

    return wrap


def get_augmentation(name: str, context: AugmentContext) -> Augment:
    if name not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)} (or None), not {name!r}")
    return AUGMENTATIONS[name].build(context)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """`fn(image, rng, **kwargs)` (or `fn(image, **kwargs)`) as an augmentation: {'image': pixels}.

    A frozen dataclass of a module-level function, so it pickles into the worker processes.
    """

    fn: Callable[..., np.ndarray]
    kwargs: tuple[tuple[str, Any], ...]
    uses_rng: bool = True

    def __call__(self, image, rng):
        kwargs = dict(self.kwargs)
        return {"image": self.fn(image, rng, **kwargs) if self.uses_rng else self.fn(image, **kwargs)}


@dataclasses.dataclass(frozen=True)
class ImageShiftTransform:
    """`fn(image, rng, **kwargs) -> (pixels, RGB offset)` as an augmentation (`scale_aug`'s lighting)."""

    fn: Callable[..., tuple[np.ndarray, np.ndarray]]
    kwargs: tuple[tuple[str, Any], ...]

    def __call__(self, image, rng):
        pixels, shift = self.fn(image, rng, **dict(self.kwargs))
        return {"image": pixels, "pixel_shift": shift}


def frozen_kwargs(**kwargs) -> tuple[tuple[str, Any], ...]:
    """Keyword arguments as a hashable, picklable tuple (for `ImageTransform`)."""
    return tuple(sorted(kwargs.items()))


@register_augmentation("inception_crop", "random-resized crop (8%-100% area, ratio 3/4-4/3) + flip (the reference)")
def _inception_crop(c: AugmentContext) -> Augment:
    return ImageTransform(inception_crop, frozen_kwargs(image_size=c.image_size, flip=c.flip))


@register_augmentation("scale_aug", "shorter side uniform in [256, 512], random crop, flip, PCA lighting (the paper)")
def _scale_aug(c: AugmentContext) -> Augment:
    return ImageShiftTransform(scale_aug, frozen_kwargs(image_size=c.image_size, flip=c.flip))


@register_augmentation("translate", "resize, random shift of up to 1/8 of the side, no flip (the digits default)")
def _translate(c: AugmentContext) -> Augment:
    return ImageTransform(translate, frozen_kwargs(image_size=c.image_size, max_shift=max(1, round(c.image_size / 8))))


@register_augmentation("center_crop_flip", "shorter side to train_resize_size, centre crop, flip (CUB)")
def _center_crop_flip(c: AugmentContext) -> Augment:
    size = c.resize_size or c.image_size
    return ImageTransform(
        center_crop_flip, frozen_kwargs(image_size=c.image_size, resize_size=size, resize_mode="shorter", flip=c.flip)
    )


@register_augmentation("square_center_crop_flip", "both sides to train_resize_size, centre crop, flip (Cars, Aircraft)")
def _square_center_crop_flip(c: AugmentContext) -> Augment:
    size = c.resize_size or c.image_size
    return ImageTransform(
        center_crop_flip, frozen_kwargs(image_size=c.image_size, resize_size=size, resize_mode="square", flip=c.flip)
    )


@register_augmentation("none", "the evaluation transform (no randomness)")
def _none(c: AugmentContext) -> Augment:
    if c.eval_mode == "resize":
        return ImageTransform(resize_whole, frozen_kwargs(image_size=c.image_size), uses_rng=False)
    resize = max(c.image_size, round(c.image_size * DEFAULT_RESIZE_SIZE / DEFAULT_IMAGE_SIZE))
    return ImageTransform(eval_crop, frozen_kwargs(image_size=c.image_size, resize_size=resize), uses_rng=False)
