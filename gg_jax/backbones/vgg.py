"""VGG backbones with BatchNorm (Simonyan and Zisserman, 2015), up to the last feature map.

fast-MPN-COV offers VGG-16 under its covariance heads with the last max-pool removed, so
that a 224 image gives a 14x14x512 map (`last_stride=1`); `last_stride=2` keeps the pool
(7x7, for global average pooling). Names: `conv{stage}_{i}` and `bn{stage}_{i}`, stages
and layers counted from 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gg_jax.backbones import blocks

Dtype = Any
ModuleDef = Any

#: Convolutions per stage (widths 64, 128, 256, 512, 512).
VGG11 = (1, 1, 2, 2, 2)
VGG16 = (2, 2, 3, 3, 3)


class VGG(nn.Module):
    """3x3 convolution -> BN -> ReLU stacks, 2x2 max-pool between stages.

    Attributes:
      stage_sizes: convolutions per stage (`VGG11`, `VGG16`).
      last_stride: 1 drops the last max-pool (the covariance heads), 2 keeps it.
      dtype: compute dtype; parameters are float32.
      conv: the convolution module (`blocks.Conv`).

    Call: `[B, H, W, 3] -> [B, H/s, W/s, 512]`, s = 16 or 32; sown as `intermediates/layer4`.
    """

    stage_sizes: Sequence[int] = VGG16
    last_stride: int = 1
    dtype: Dtype = jnp.float32
    conv: ModuleDef = blocks.Conv

    @staticmethod
    def output_size(image_size: int, *, last_stride: int = 1, stage_sizes: Sequence[int] = VGG16) -> int:
        """Side of the output map on square `image_size` inputs (one 2x2 max-pool per stage, the
        last one only with `last_stride=2`)."""
        pools = len(stage_sizes) - (1 if last_stride == 1 else 0)
        return image_size // 2**pools

    def __post_init__(self):
        if self.last_stride not in (1, 2):
            raise ValueError(f"VGG: last_stride={self.last_stride!r} must be 1 (no last max-pool) or 2.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        widths = (64, 128, 256, 512, 512)
        for stage, (num_convs, width) in enumerate(zip(self.stage_sizes, widths), start=1):
            for i in range(1, num_convs + 1):
                x = self.conv(
                    width, (3, 3), padding=blocks.torch_padding(3), dtype=self.dtype, name=f"conv{stage}_{i}"
                )(x)
                x = nn.relu(blocks.batch_norm(train, self.dtype, name=f"bn{stage}_{i}")(x))
            if stage < len(self.stage_sizes) or self.last_stride == 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        self.sow("intermediates", "layer4", x)
        return x
