"""Shared pieces of the heads and re-weighting modules: the 1x1-convolution base, input checks
and the option rules (`check_options`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gg_jax import linalg
from gg_jax.backbones import blocks

Dtype = Any
ModuleDef = Any


class _Conv1x1Kernel(nn.Module):
    """The `kernel` `[1, 1, in, features]` of a 1x1 convolution, created but not applied.

    Same path, name, shape, dtype and initialisation (the reference's; Flax draws it from the
    module path) as the convolution module's own, so variables and checkpoints are unchanged.
    """

    features: int

    @nn.compact
    def __call__(self, in_features: int):
        return self.param("kernel", blocks.conv_kernel_init, (1, 1, in_features, self.features), jnp.float32)


class ConvModule(nn.Module):
    """Base of the modules with 1x1 convolutions: `conv` is the convolution module.

    The default is `nn.Conv` without bias and with the reference's init
    (`gg_jax.backbones.blocks.Conv`); `gg_jax.models.create` passes the same module it gives
    the backbone. Keyword-only, so that the heads' positional fields are unchanged.
    """

    conv: ModuleDef = dataclasses.field(default=blocks.Conv, kw_only=True)

    def conv1x1(self, features: int, dtype: Dtype, name: str):
        return self.conv(features, (1, 1), padding="VALID", dtype=dtype, name=name)

    def conv1x1_parallel(self, x, features: int, dtype: Dtype, names):
        """The 1x1 convolutions `names` of one input `x` `[B, H, W, C]`, computed as one.

        Each keeps its own `kernel` parameter (`conv1x1`'s, reference init); they are
        concatenated along the output axis at compute time and applied by one `conv`: one
        read of `x` and one wider product instead of len(names). Returns a list of
        `[B, H, W, features]` in `dtype`, in the order of `names`.
        """
        kernels = [_Conv1x1Kernel(features, name=name)(x.shape[-1]) for name in names]
        conv = self.conv(features * len(names), (1, 1), padding="VALID", dtype=dtype, parent=None)
        y = conv.apply({"params": {"kernel": jnp.concatenate(kernels, axis=-1)}}, x)
        return jnp.split(y, len(names), axis=-1)


def check_feature_map(x, layer: str, in_features: int | None = None):
    """Raise a ValueError unless `x` is an NHWC map `[B, H, W, C]` (with C == in_features)."""
    if x.ndim != 4:
        raise ValueError(
            f"{layer} expects an NHWC feature map of shape [batch, height, width, channels], "
            f"got an array of rank {x.ndim} with shape {x.shape}. Transpose NCHW inputs "
            "with x.transpose(0, 2, 3, 1)."
        )
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(
            f"{layer} was configured for {in_features} input channels but got {x.shape[-1]} "
            f"(input shape {x.shape}); set in_features={x.shape[-1]} or add a channel reduction "
            "(reduction_dim=...)."
        )


def check_param_channels(module: nn.Module, x, param: str, layer: str):
    """Raise a ValueError if `x` has not the channel count of `module`'s existing `param`.

    `param` names a child holding a `kernel` `[..., in, out]` (a 1x1 conv). Without this,
    applying initialised variables to the wrong width fails deep inside Flax with a
    parameter-shape error; here the message says what was expected.
    """
    if module.has_variable("params", param):
        expected = module.variables["params"][param]["kernel"].shape[-2]
        if x.shape[-1] != expected:
            raise ValueError(
                f"{layer} has parameters for {expected} input channels but got {x.shape[-1]} "
                f"(input shape {x.shape}); pass features with {expected} channels or initialise "
                "the layer for this width."
            )


def flatten_positions(x):
    """`[B, H, W, C] -> [B, H*W, C]`."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def is_int(value, low: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_options(module: nn.Module, rules) -> None:
    """ValueError naming the module and every option out of its range: `rules` holds
    `(option, ok, what it must be)` checked on the module's value of the option."""
    problems = [
        f"{name}={getattr(module, name)!r} must be {what}" for name, ok, what in rules if not ok(getattr(module, name))
    ]
    if problems:
        raise ValueError(f"{type(module).__name__}: {'; '.join(problems)}.")


def _matmul_precision_ok(value) -> bool:
    try:
        linalg.lax_precision(value, platform="cpu")
    except ValueError:
        return False
    return True


# Rules shared by the heads (`check_options`).
NUM_ITERS = ("num_iters", lambda v: is_int(v, 1), "an integer >= 1 (Newton-Schulz iterations)")
COV_EPS = ("cov_eps", lambda v: is_number(v) and v >= 0, "a number >= 0 (the covariance's ridge)")
REDUCTION_DIM = (
    "reduction_dim",
    lambda v: v is None or is_int(v, 0),
    "None or an integer >= 0 (channels of the 1x1 reduction; 0: none)",
)
IN_FEATURES = ("in_features", lambda v: v is None or is_int(v, 1), "None or an integer >= 1")
SQRT_METHOD = ("sqrt_method", lambda v: v in ("newton_schulz", "eigh"), "'newton_schulz' or 'eigh'")
MATMUL_PRECISION = (
    "matmul_precision",
    _matmul_precision_ok,
    "'auto', 'highest', 'bf16_6x' or 'tf32_3x' (the covariance's float32 products)",
)
