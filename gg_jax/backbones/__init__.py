"""Backbones by name: feature extractors from NHWC images to the last convolutional map.

A backbone is a linen module called as `backbone(images, train=...)` on `[B, H, W, 3]`,
returning `[B, h, w, C]` and sowing it as `intermediates/layer4`. It has the fields `dtype`
(compute dtype), `conv` (the convolution module, see `blocks.Conv`) and `last_stride` (1 keeps
the last stage at the resolution the covariance heads use, 2 downsamples it as for global
average pooling). A new backbone is a file here and a line in `BACKBONES`.
"""

from __future__ import annotations

import functools

from gg_jax.backbones import blocks, resnet, vgg

BACKBONES = {
    "resnet18": functools.partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2), block_cls=resnet.BasicBlock),
    "resnet34": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block_cls=resnet.BasicBlock),
    "resnet23": functools.partial(resnet.ResNet, stage_sizes=(1, 2, 2, 2), block_cls=resnet.Bottleneck),
    "resnet50": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block_cls=resnet.Bottleneck),
    "resnet101": functools.partial(resnet.ResNet, stage_sizes=(3, 4, 23, 3), block_cls=resnet.Bottleneck),
    "resnet152": functools.partial(resnet.ResNet, stage_sizes=(3, 8, 36, 3), block_cls=resnet.Bottleneck),
    "vgg11": functools.partial(vgg.VGG, stage_sizes=vgg.VGG11),
    "vgg16": functools.partial(vgg.VGG, stage_sizes=vgg.VGG16),
}

#: Fields set by `gg_jax.models.create`, not by the user's options.
_INTERNAL_FIELDS = ("dtype", "conv")


def options(name: str) -> tuple[str, ...]:
    """The fields of backbone `name` a user may set (e.g. `last_stride`)."""
    factory = BACKBONES[name]
    return blocks.module_options(factory.func, exclude=_INTERNAL_FIELDS + tuple(factory.keywords))


def feature_map_size(name: str, image_size: int, last_stride: int = 1) -> int:
    """Side of backbone `name`'s output map on square `image_size` images (its strides and paddings)."""
    factory = BACKBONES[name]
    return factory.func.output_size(image_size, last_stride=last_stride, **factory.keywords)
