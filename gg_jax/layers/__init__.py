"""Flax linen pooling heads: the 3G layer and the global pooling baselines of the paper.

All heads take NHWC feature maps `[B, H, W, C]` and are called as
`head(x, train=...)`. `train=True` uses batch statistics in BatchNorm and updates the
running averages (pass `mutable=['batch_stats']` to `apply`). Convolutions and
BatchNorm run in `dtype` (e.g. bf16, parameters stay float32); the covariance,
square root and vectorisation always run in float32 (`gg_jax.linalg`), their products
at the head's `matmul_precision` ("auto": the fastest float32-accurate setting of the
platform, `linalg.default_matmul_precision`), and every head returns float32.

BatchNorm follows the reference (PyTorch defaults): epsilon 1e-5, running averages
`0.9 * running + 0.1 * batch` (Flax `momentum=0.9`). Flax updates the running
variance with the *biased* batch variance, PyTorch with the unbiased one; eval-mode
outputs are unaffected (see docs/checkpoints.md).
"""

from gg_jax.layers.common import check_feature_map, check_options, check_param_channels, flatten_positions
from gg_jax.layers.heads import (
    BilinearPooling,
    ChannelReduction,
    CovariancePooling,
    GaussianEmbedding,
    GeneralizedGaussianCovariance,
    GlobalAveragePooling,
    SqrtMethod,
)
from gg_jax.layers.reweighting import (
    ExactReweighting,
    HeadReweighting,
    ReweightingBlock,
    ReweightingVariant,
    UnrolledReweighting,
)

__all__ = [
    "BilinearPooling",
    "ChannelReduction",
    "CovariancePooling",
    "ExactReweighting",
    "GaussianEmbedding",
    "GeneralizedGaussianCovariance",
    "GlobalAveragePooling",
    "HeadReweighting",
    "ReweightingBlock",
    "ReweightingVariant",
    "SqrtMethod",
    "UnrolledReweighting",
    "check_feature_map",
    "check_options",
    "check_param_channels",
    "flatten_positions",
]
