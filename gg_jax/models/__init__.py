"""Models by name: a backbone, a global pooling head and a linear classifier.

    model = gg_jax.models.create("resnet50_3g", num_classes=1000, dtype=jnp.bfloat16)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False)
    logits = model.apply(variables, images_nhwc, train=False)

Names are `{backbone}_{head}`: backbones `resnet{18,34,23,50,101,152}` (the reference's)
and `vgg{11,16}` (`gg_jax.backbones`), heads
  3g      global covariance of generalized Gaussian (the paper; reference layout)
  isqrt   iSQRT-COV (covariance, Newton-Schulz square root)
  mpncov  MPN-COV (covariance, square root by eigendecomposition)
  cov     plain covariance pooling
  bcnn    B-CNN (bilinear pooling, signed sqrt, l2, BatchNorm)
  g2de    G2DeNet (global Gaussian embedding, square root)
  gap     global average pooling (the original ResNet: stride-2 last stage)
All covariance heads reduce the last feature map to 256 channels by 1x1 conv -> BN -> ReLU
and keep the last stage at stride 1, as the reference does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from gg_jax import backbones, layers
from gg_jax.backbones import blocks
from gg_jax.backbones.resnet import BasicBlock, Bottleneck, ResNet
from gg_jax.models.classifier import Classifier

__all__ = [
    "BACKBONES",
    "HEADS",
    "BasicBlock",
    "Bottleneck",
    "Classifier",
    "ResNet",
    "create",
    "head_options",
    "names",
    "parse_name",
]

BACKBONES = backbones.BACKBONES

# head name -> (layer class, default options, default backbone options)
HEADS: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "3g": (layers.GeneralizedGaussianCovariance, dict(reduction_dim=256, num_blocks=3, num_iters=5), {}),
    "isqrt": (layers.CovariancePooling, dict(reduction_dim=256, method="isqrt", num_iters=5), {}),
    "mpncov": (layers.CovariancePooling, dict(reduction_dim=256, method="mpncov"), {}),
    "cov": (layers.CovariancePooling, dict(reduction_dim=256, method="plain"), {}),
    "bcnn": (layers.BilinearPooling, dict(reduction_dim=256), {}),
    "g2de": (layers.GaussianEmbedding, dict(reduction_dim=256), {}),
    "gap": (layers.GlobalAveragePooling, dict(), dict(last_stride=2)),
}

_CLASSIFIER_OPTIONS = ("dropout_rate",)
# Head fields that `create` sets itself.
_INTERNAL_HEAD_FIELDS = ("parent", "name", "dtype", "conv")


def names():
    """All registered model names, sorted."""
    return sorted(f"{b}_{h}" for b in BACKBONES for h in HEADS)


def parse_name(name: str) -> tuple[str, str]:
    """`"resnet50_3g" -> ("resnet50", "3g")`; ValueError listing valid names otherwise."""
    backbone, _, head = name.partition("_")
    if backbone not in BACKBONES or head not in HEADS:
        raise ValueError(f"Unknown model name {name!r}. Valid names: {', '.join(names())}.")
    return backbone, head


def _head_fields(head: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(HEADS[head][0]) if f.name not in _INTERNAL_HEAD_FIELDS)


def head_options(name: str) -> tuple[str, ...]:
    """Option names that `create(name, **options)` accepts: the head's, the backbone's
    (`last_stride`) and the classifier's (`dropout_rate`)."""
    backbone, head = parse_name(name)
    return _head_fields(head) + backbones.option_names(backbone) + _CLASSIFIER_OPTIONS


def conv_for_platform(platform: str):
    """The convolution module of every backbone and head: `nn.Conv` (`blocks.Conv`), except
    `gg_jax.cpu.Conv` on the CPU, where XLA runs the matmul forms much faster."""
    if platform == "cpu":
        from gg_jax import cpu

        return cpu.Conv
    return blocks.Conv


def create(name: str, *, num_classes: int, dtype=jnp.float32, platform: str | None = None, **options):
    """Build a model by name.

    Args:
      name: e.g. "resnet50_3g", "resnet101_isqrt", "resnet50_gap", "vgg16_3g" (see `names()`).
      num_classes: classifier outputs.
      dtype: compute dtype of the backbone and head convolutions (bf16 for TPU/GPU
        training). Parameters stay float32; covariance math and the classifier run in float32.
      platform: the platform the model will run on ('cpu', 'gpu', 'cuda', 'tpu', ...; default
        `jax.default_backend()`); it selects the convolution module (`conv_for_platform`).
        Variables do not depend on it.
      **options: passed to the head (e.g. `num_blocks`, `num_iters`, `lam`, `reweighting`,
        `estimator`, `reduction_dim` for 3g), the backbone (`last_stride`) or the classifier
        (`dropout_rate` before it: the released 3G-Net training code uses 0.2, which needs a
        'dropout' rng in training); see `head_options(name)`.

    Returns:
      A `Classifier` linen module: `model.apply(variables, images_nhwc, train=False) -> logits`.
    """
    backbone, head = parse_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    valid = head_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}. Valid options: {', '.join(valid)}.")
    head_cls, head_defaults, backbone_defaults = HEADS[head]
    conv = conv_for_platform(platform or jax.default_backend())
    backbone_options = {k: options[k] for k in backbones.option_names(backbone) if k in options}
    head_kwargs = {**head_defaults, **{k: options[k] for k in _head_fields(head) if k in options}}
    return Classifier(
        backbone=BACKBONES[backbone](dtype=dtype, conv=conv, **{**backbone_defaults, **backbone_options}),
        head=functools.partial(head_cls, conv=conv, **head_kwargs),
        num_classes=num_classes,
        dropout_rate=float(options.get("dropout_rate", 0.0)),
        dtype=dtype,
    )
