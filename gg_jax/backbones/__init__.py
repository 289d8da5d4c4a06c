"""Backbones by name: feature extractors from NHWC images to the last convolutional map.

A backbone is a linen module called as `backbone(images, train=...)` on `[B, H, W, 3]`,
returning `[B, h, w, C]` and sowing it as `intermediates/layer4`. It has the fields `dtype`
(compute dtype), `conv` (the convolution module, see `blocks.Conv`) and `last_stride` (1 keeps
the last stage at the resolution the covariance heads use, 2 downsamples it as for global
average pooling). A new backbone is a file here and a line in `BACKBONES`.
"""

from __future__ import annotations

import dataclasses
import functools

from gg_jax.backbones import resnet, vgg

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
_INTERNAL_FIELDS = ("parent", "name", "dtype", "conv")


def option_names(name: str) -> tuple[str, ...]:
    """The fields of backbone `name` a user may set (e.g. `last_stride`)."""
    factory = BACKBONES[name]
    return tuple(
        f.name
        for f in dataclasses.fields(factory.func)
        if f.name not in _INTERNAL_FIELDS and f.name not in factory.keywords
    )
