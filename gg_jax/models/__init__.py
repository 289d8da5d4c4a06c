"""Model registry: 3G-Net ResNets and the global-pooling baselines of the paper, by name.

    model = gg_jax.models.create("resnet50_3g", num_classes=1000, dtype=jnp.bfloat16)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images_nhwc, train=False)

Names are `resnet{18,34,23,50,101,152}_{head}` with head one of
  3g      global covariance of generalized Gaussian (the paper; reference layout)
  isqrt   iSQRT-COV (covariance, Newton-Schulz square root)
  mpncov  MPN-COV (covariance, square root by eigendecomposition)
  cov     plain covariance pooling
  bcnn    B-CNN (bilinear pooling, signed sqrt, l2, BatchNorm)
  g2de    G2DeNet (global Gaussian embedding, square root)
  gap     the original ResNet (stride-2 last stage, global average pooling)
All covariance heads reduce the last feature map to 256 channels by 1x1 conv -> BN -> ReLU
and use a stride-1 last stage, as the reference does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp

from gg_jax import layers
from gg_jax.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["create", "names", "parse_name", "ResNet", "BasicBlock", "Bottleneck"]

BACKBONES: dict[str, tuple[tuple[int, ...], Any]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet23": ((1, 2, 2, 2), Bottleneck),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
    "resnet152": ((3, 8, 36, 3), Bottleneck),
}

# head name -> (layer class, default options, default last-stage stride)
HEADS: dict[str, tuple[Any, dict[str, Any], int]] = {
    "3g": (layers.GeneralizedGaussianCovariance, dict(reduction_dim=256, num_blocks=3, num_iters=5), 1),
    "isqrt": (layers.CovariancePooling, dict(reduction_dim=256, method="isqrt", num_iters=5), 1),
    "mpncov": (layers.CovariancePooling, dict(reduction_dim=256, method="mpncov"), 1),
    "cov": (layers.CovariancePooling, dict(reduction_dim=256, method="plain"), 1),
    "bcnn": (layers.BilinearPooling, dict(reduction_dim=256), 1),
    "g2de": (layers.GaussianEmbedding, dict(reduction_dim=256), 1),
    "gap": (layers.GlobalAveragePooling, dict(), 2),
}

_MODEL_OPTIONS = ("last_stride", "dropout_rate")


def names():
    """All registered model names, sorted."""
    return sorted(f"{b}_{h}" for b in BACKBONES for h in HEADS)


def parse_name(name: str) -> tuple[str, str]:
    """`"resnet50_3g" -> ("resnet50", "3g")`; ValueError listing valid names otherwise."""
    backbone, _, head = name.partition("_")
    if backbone not in BACKBONES or head not in HEADS:
        raise ValueError(f"Unknown model name {name!r}. Valid names: {', '.join(names())}.")
    return backbone, head


def head_options(name: str):
    """Option names that `create(name, **options)` accepts."""
    _, head = parse_name(name)
    cls = HEADS[head][0]
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name", "dtype")]
    return tuple(fields) + _MODEL_OPTIONS


def create(name: str, *, num_classes: int, dtype=jnp.float32, **options):
    """Build a model by name.

    Args:
      name: e.g. "resnet50_3g", "resnet101_isqrt", "resnet50_gap" (see `names()`).
      num_classes: classifier outputs.
      dtype: compute dtype of the backbone and head convolutions (bf16 for TPU/GPU
        training). Parameters stay float32; covariance math and the classifier run in float32.
      **options: passed to the head (e.g. `num_blocks`, `num_iters`, `lam`, `reweighting`,
        `estimator`, `reduction_dim` for 3g; see `head_options(name)`) or the model
        (`last_stride`, `dropout_rate` before the classifier: the released 3G-Net
        training code uses 0.2, which needs a 'dropout' rng in training).

    Returns:
      A Flax linen module: `model.apply(variables, images_nhwc, train=False) -> logits`.
    """
    backbone, head = parse_name(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    valid = head_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}. Valid options: {', '.join(valid)}.")
    stage_sizes, block_cls = BACKBONES[backbone]
    head_cls, head_defaults, last_stride = HEADS[head]
    last_stride = options.pop("last_stride", last_stride)
    dropout_rate = options.pop("dropout_rate", 0.0)
    head_kwargs = {**head_defaults, **options}
    return ResNet(
        stage_sizes=stage_sizes,
        block_cls=block_cls,
        num_classes=num_classes,
        head=functools.partial(head_cls, **head_kwargs),
        last_stride=last_stride,
        dropout_rate=dropout_rate,
        dtype=dtype,
    )
