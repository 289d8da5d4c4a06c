"""ResNet backbones (torchvision v1.5) with a global pooling head and a linear classifier.

Module names mirror the PyTorch state_dict of the reference / torchvision
(`conv1`, `bn1`, `layer3_5/conv2`, `layer2_0/downsample_0`, ...) so that checkpoint
conversion (`gg_jax.convert`) is a renaming plus transposes. Convolutions use explicit
PyTorch-style symmetric padding, which differs from 'SAME' for strided layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gg_jax import layers
from gg_jax.models import conv

Dtype = Any


def _conv(features, kernel, stride, dtype, name):
    if kernel == 1:
        # A matmul on CPU, where XLA runs 1x1 convolutions (and their kernel gradients)
        # much slower; a convolution on GPU and TPU (`layers.conv1x1_by_platform`).
        return layers.Conv1x1(features, dtype=dtype, kernel_init=layers.conv_kernel_init, stride=stride, name=name)
    pad = kernel // 2
    return conv.Conv(
        features,
        kernel,
        stride,
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.conv_kernel_init,
        name=name,
    )


class BasicBlock(nn.Module):
    """3x3 -> BN -> ReLU -> 3x3 -> BN, plus shortcut, then ReLU (ResNet-18/34)."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, *, train: bool):
        bn = lambda name: layers.batch_norm(train, self.dtype, name=name)  # noqa: E731
        y = nn.relu(bn("bn1")(_conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)))
        y = bn("bn2")(_conv(self.planes, 3, 1, self.dtype, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = bn("downsample_1")(_conv(self.planes, 1, self.stride, self.dtype, "downsample_0")(x))
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4) -> BN, plus shortcut, ReLU."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, *, train: bool):
        bn = lambda name: layers.batch_norm(train, self.dtype, name=name)  # noqa: E731
        out = self.planes * self.expansion
        y = nn.relu(bn("bn1")(_conv(self.planes, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(bn("bn2")(_conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)))
        y = bn("bn3")(_conv(out, 1, 1, self.dtype, "conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = bn("downsample_1")(_conv(out, 1, self.stride, self.dtype, "downsample_0")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet backbone + pooling head + `fc` classifier.

    Attributes:
      stage_sizes: blocks per stage (`layer1..layer4`).
      block_cls: `BasicBlock` or `Bottleneck`.
      num_classes: classifier outputs.
      head: a factory `head(dtype=...) -> nn.Module` called as `head(x, train=...)` on the
        last feature map, returning `[B, D]` float32 (see `gg_jax.layers`).
      last_stride: stride of `layer4`; 1 for the covariance heads (a 224 image gives a
        14x14 map), 2 for the original ResNet.
      dropout_rate: dropout before the classifier in training mode (the released 3G-Net
        training code uses 0.2; needs a 'dropout' rng when > 0 and train=True).
      dtype: compute dtype of the backbone (e.g. bfloat16); parameters are float32 and
        the classifier runs in float32 on the head's float32 output.

    Call: `model.apply(variables, images, train=False)` with NHWC images `[B, H, W, 3]`
    -> float32 logits `[B, num_classes]`. Intermediates (`mutable=['intermediates']`):
    `layer4` (backbone output) and the head's own.
    """

    stage_sizes: Sequence[int]
    block_cls: Any
    num_classes: int
    head: Callable[..., nn.Module]
    last_stride: int = 1
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        layers.check_feature_map(x, type(self).__name__, None)
        if x.shape[-1] != 3:
            raise ValueError(f"Expected NHWC images with 3 channels, got shape {x.shape}.")
        x = x.astype(self.dtype)
        x = _conv(64, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (num_blocks, planes) in enumerate(zip(self.stage_sizes, (64, 128, 256, 512))):
            stride = (1, 2, 2, self.last_stride)[stage]
            for i in range(num_blocks):
                x = self.block_cls(planes, stride if i == 0 else 1, self.dtype, name=f"layer{stage + 1}_{i}")(
                    x, train=train
                )
        self.sow("intermediates", "layer4", x)
        features = self.head(dtype=self.dtype, name="head")(x, train=train)
        if self.dropout_rate > 0:
            features = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
        fan_in = features.shape[-1]
        # PyTorch's default nn.Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        bound = 1.0 / fan_in**0.5
        uniform = lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound  # noqa: E731
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=uniform,
            bias_init=uniform,
            name="fc",
        )(features.astype(jnp.float32))
