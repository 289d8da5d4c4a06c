"""ResNet backbones (torchvision v1.5, the reference's), up to the last feature map.

Module names mirror the PyTorch state_dict of the reference / torchvision (`conv1`, `bn1`,
`layer3_5/conv2`, `layer2_0/downsample_0`, ...) so that checkpoint conversion
(`gg_jax.convert`) is a renaming plus transposes. Convolutions use PyTorch's symmetric
padding, which differs from 'SAME' for strided layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gg_jax.backbones import blocks

Dtype = Any
ModuleDef = Any


def _conv(conv: ModuleDef, features: int, kernel: int, stride: int, dtype: Dtype, name: str):
    padding = blocks.torch_padding(kernel)
    return conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class _Block(nn.Module):
    """The fields of a residual block and the parts both kinds share."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    conv: ModuleDef = blocks.Conv

    def conv_bn(self, x, features: int, kernel: int, stride: int, index: str, train: bool):
        """`conv{index}` then `bn{index}` (no ReLU)."""
        y = _conv(self.conv, features, kernel, stride, self.dtype, f"conv{index}")(x)
        return blocks.batch_norm(train, self.dtype, name=f"bn{index}")(y)

    def residual(self, x, y, train: bool):
        """ReLU(shortcut(x) + y); the shortcut is a strided 1x1 conv + BN where the shape changes."""
        if self.stride != 1 or x.shape[-1] != y.shape[-1]:
            x = _conv(self.conv, y.shape[-1], 1, self.stride, self.dtype, "downsample_0")(x)
            x = blocks.batch_norm(train, self.dtype, name="downsample_1")(x)
        return nn.relu(x + y)


class BasicBlock(_Block):
    """3x3 -> BN -> ReLU -> 3x3 -> BN, plus shortcut, then ReLU (ResNet-18/34)."""

    expansion = 1

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = nn.relu(self.conv_bn(x, self.planes, 3, self.stride, "1", train))
        return self.residual(x, self.conv_bn(y, self.planes, 3, 1, "2", train), train)


class Bottleneck(_Block):
    """1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4) -> BN, plus shortcut, ReLU."""

    expansion = 4

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = nn.relu(self.conv_bn(x, self.planes, 1, 1, "1", train))
        y = nn.relu(self.conv_bn(y, self.planes, 3, self.stride, "2", train))
        return self.residual(x, self.conv_bn(y, self.planes * self.expansion, 1, 1, "3", train), train)


class ResNet(nn.Module):
    """ResNet stem and four stages: NHWC images `[B, H, W, 3]` -> feature map `[B, H/s, W/s, C]`.

    Attributes:
      stage_sizes: blocks per stage (`layer1..layer4`).
      block_cls: `BasicBlock` (C = 512) or `Bottleneck` (C = 2048).
      last_stride: stride of `layer4`; 1 for the covariance heads (a 224 image gives a 14x14
        map, s = 16), 2 for the original ResNet (7x7, s = 32).
      dtype: compute dtype (e.g. bfloat16); parameters are float32.
      conv: the convolution module (`blocks.Conv`, an `nn.Conv`).

    The output is sown as `intermediates/layer4`.
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    last_stride: int = 1
    dtype: Dtype = jnp.float32
    conv: ModuleDef = blocks.Conv

    def __post_init__(self):
        if self.last_stride not in (1, 2):
            raise ValueError(f"ResNet: last_stride={self.last_stride!r} must be 1 (the covariance heads) or 2.")
        super().__post_init__()

    @staticmethod
    def output_size(image_size: int, *, last_stride: int = 1, **_) -> int:
        """Side of the output map on square `image_size` inputs (the stem and every strided stage)."""
        strided = lambda n, k, s, p: (n + 2 * p - k) // s + 1  # noqa: E731
        n = strided(strided(image_size, 7, 2, 3), 3, 2, 1)  # conv1, max-pool
        for stride in (1, 2, 2, last_stride):  # each stage's strided 3x3 convolution (padding 1)
            n = strided(n, 3, stride, 1)
        return n

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        x = _conv(self.conv, 64, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(blocks.batch_norm(train, self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (num_blocks, planes) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
            stride = (1, 2, 2, self.last_stride)[stage]
            for i in range(num_blocks):
                block = self.block_cls(
                    planes, stride if i == 0 else 1, self.dtype, self.conv, name=f"layer{stage + 1}_{i}"
                )
                x = block(x, train=train)
        self.sow("intermediates", "layer4", x)
        return x
