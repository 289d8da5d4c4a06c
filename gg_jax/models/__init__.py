"""Models by name: a backbone, a global pooling head and a linear classifier.

    model = gg_jax.models.create("resnet50_3g", num_classes=1000, dtype="bfloat16")
    variables = gg_jax.models.init_variables(model, jax.random.PRNGKey(0))
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

Options go straight through: a training config's `model` section is `create`'s keyword
arguments (`create(**config.model, num_classes=...)`), each option under the name of the
module field it sets (the head's, the backbone's or the classifier's).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gg_jax import backbones, layers
from gg_jax.backbones import blocks
from gg_jax.models.classifier import Classifier, check_dropout_rate

__all__ = ["HEADS", "Classifier", "create", "feature_map_size", "init_variables", "names", "options", "parse_name"]

# head name -> (layer class, the model's options where they differ from the layer's defaults,
# the backbone's options where they differ from its defaults).
HEADS: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "3g": (layers.GeneralizedGaussianCovariance, dict(reduction_dim=256), {}),
    "isqrt": (layers.CovariancePooling, dict(reduction_dim=256, method="isqrt"), {}),
    "mpncov": (layers.CovariancePooling, dict(reduction_dim=256, method="mpncov"), {}),
    "cov": (layers.CovariancePooling, dict(reduction_dim=256, method="plain"), {}),
    "bcnn": (layers.BilinearPooling, dict(reduction_dim=256), {}),
    "g2de": (layers.GaussianEmbedding, dict(reduction_dim=256), {}),
    "gap": (layers.GlobalAveragePooling, {}, dict(last_stride=2)),
}
# The options of every model: the compute dtype and the classifier's dropout.
MODEL_OPTIONS = ("dtype", "dropout_rate")
# Fields `create` sets itself.
_INTERNAL_FIELDS = ("dtype", "conv")
# Side of the zero images that variables are initialised (or traced) on: every model's
# variables are independent of the image size.
INIT_IMAGE_SIZE = 64


class UnknownOptionsError(ValueError):
    """Options that the model does not take; `unknown` names them."""

    def __init__(self, message: str, unknown: list[str]):
        super().__init__(message)
        self.unknown = unknown


def names() -> list[str]:
    """All registered model names, sorted."""
    return sorted(f"{b}_{h}" for b in backbones.BACKBONES for h in HEADS)


def parse_name(name: str) -> tuple[str, str]:
    """`"resnet50_3g" -> ("resnet50", "3g")`; ValueError listing valid names otherwise."""
    backbone, _, head = str(name).partition("_")
    if backbone not in backbones.BACKBONES or head not in HEADS:
        raise ValueError(f"Unknown model name {name!r}. Valid names: {', '.join(names())}.")
    return backbone, head


def _option_groups(backbone: str, head: str) -> dict[str, tuple[str, ...]]:
    return {
        "backbone": backbones.options(backbone),
        "head": blocks.module_options(HEADS[head][0], exclude=_INTERNAL_FIELDS),
        "model": MODEL_OPTIONS,
    }


def options(name: str) -> tuple[str, ...]:
    """The options `create(name, **options)` takes: the head's fields, the backbone's
    (`last_stride`), the classifier's `dropout_rate` and the compute `dtype`."""
    groups = _option_groups(*parse_name(name))
    return groups["head"] + groups["backbone"] + groups["model"]


def conv_for_platform(platform: str):
    """The convolution module of every backbone and head: `nn.Conv` (`blocks.Conv`), except
    `gg_jax.cpu.Conv` on the CPU, where XLA runs the matmul forms much faster."""
    if platform == "cpu":
        from gg_jax import cpu

        return cpu.Conv
    return blocks.Conv


def create(name: str, *, num_classes: int, platform: str | None = None, **options: Any) -> Classifier:
    """Build a model by name.

    Args:
      name: e.g. "resnet50_3g", "resnet101_isqrt", "resnet50_gap", "vgg16_3g" (see `names()`).
      num_classes: classifier outputs.
      platform: the platform the model will run on ('cpu', 'gpu', 'cuda', 'tpu', ...; default
        `jax.default_backend()`); it selects the convolution module (`conv_for_platform`).
        Variables do not depend on it.
      **options: an option set to None takes the model's default. `dtype` (default float32;
        "bfloat16" for TPU/GPU training): the compute dtype of the backbone and the head's
        convolutions; parameters stay float32, the covariance math and the classifier run in
        float32. `dropout_rate` (default 0): dropout before the classifier in training mode
        (the released 3G-Net training code uses 0.2; needs a 'dropout' rng). The backbone's
        `last_stride`, and the head's fields (e.g. `num_blocks`, `num_iters`, `lam`,
        `reweighting`, `estimator`, `reduction_dim` for 3g); see `options(name)`.

    Returns:
      A `Classifier` linen module: `model.apply(variables, images_nhwc, train=False) -> logits`.

    Raises:
      ValueError naming the valid names, or the valid options, or the option out of range.
    """
    backbone, head = parse_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    options = {k: v for k, v in options.items() if v is not None}
    groups = _option_groups(backbone, head)
    valid = groups["head"] + groups["backbone"] + groups["model"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UnknownOptionsError(
            f"Unknown option(s) {unknown} for model {name!r}. Valid options: {', '.join(valid)}.", unknown
        )
    head_cls, head_defaults, backbone_defaults = HEADS[head]
    dtype = jnp.dtype(options.get("dtype", "float32"))
    conv = conv_for_platform(platform or jax.default_backend())
    pick = lambda group: {k: options[k] for k in groups[group] if k in options}  # noqa: E731
    problems = []

    def build(make):  # Every part checks its options when constructed; all problems in one error.
        try:
            return make()
        except ValueError as e:
            problems.append(str(e).rstrip("."))

    parts = (
        build(
            lambda: backbones.BACKBONES[backbone](dtype=dtype, conv=conv, **{**backbone_defaults, **pick("backbone")})
        ),
        build(lambda: head_cls(dtype=dtype, conv=conv, **{**head_defaults, **pick("head")}, parent=None)),
        build(lambda: check_dropout_rate(options.get("dropout_rate", 0.0))),
    )
    if problems:
        raise ValueError("; ".join(problems) + ".")
    return Classifier(
        backbone=parts[0],
        head=parts[1],
        num_classes=num_classes,
        dropout_rate=float(options.get("dropout_rate", 0.0)),
        dtype=dtype,
    )


def init_variables(module, rng, shape=None, *, abstract: bool = False, compiler_options=None) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of `module.init(rng, zeros(shape), train=False)`.

    shape: the example input, `[1, 64, 64, 3]` images by default (a model's variables do not
      depend on the image size; a head's depend on its input channels).
    abstract: shapes and dtypes only (`jax.eval_shape`), nothing computed.
    compiler_options: of the one-off init program (`gg_jax.cpu.init_compiler_options`).
    Outside a trace, the initialisation is one compiled program, so that XLA drops the forward
    pass whose output is discarded.
    """
    shape = tuple(shape or (1, INIT_IMAGE_SIZE, INIT_IMAGE_SIZE, 3))

    def init(rng):
        variables = module.init(rng, jnp.zeros(shape, jnp.float32), train=False)
        return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}

    if abstract:
        return jax.eval_shape(init, rng)
    if isinstance(rng, jax.core.Tracer):
        return init(rng)
    return jax.jit(init, compiler_options=compiler_options)(rng)


def feature_map_size(name: str, image_size: int, **options) -> int:
    """Side of the last feature map (the head's input) of model `name` on square `image_size` images."""
    backbone, head = parse_name(name)
    last_stride = options.get("last_stride") or HEADS[head][2].get("last_stride", 1)
    return backbones.feature_map_size(backbone, int(image_size), last_stride=last_stride)


@functools.cache
def smallest_image_size(name: str, last_stride: int | None = None) -> int:
    """The smallest square image size whose last feature map has at least 2 positions."""
    size = 1
    while feature_map_size(name, size, last_stride=last_stride) ** 2 < 2:
        size += 1
    return size
