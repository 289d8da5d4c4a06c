"""Building blocks shared by the backbones and the heads, in the reference's conventions.

The released 3G-Net is a PyTorch model; these give its initialisation and BatchNorm
settings in Flax, so that a checkpoint converts by renaming and transposing only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
ModuleDef = Any

#: Kernel init of the reference: He-normal with fan-out (PyTorch kaiming_normal_ mode='fan_out').
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

#: The convolution every backbone and head uses by default: a plain bias-free `nn.Conv` with the
#: reference's init. Called as `conv(features, kernel_size, strides=..., padding=..., dtype=...,
#: name=...)`; `gg_jax.models.create` substitutes a module with the same call and parameters on CPU.
Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init, param_dtype=jnp.float32)


def batch_norm(train: bool, dtype: Dtype, name: str | None = None, scale_init=nn.initializers.ones):
    """BatchNorm with the reference's (PyTorch's) epsilon 1e-5 and momentum 0.1 (Flax's 0.9)."""
    return nn.BatchNorm(
        use_running_average=not train,
        # Two-pass variance mean((x - mean)^2): E[x^2] - E[x]^2 loses digits to cancellation.
        use_fast_variance=False,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=scale_init,
        name=name,
    )


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's symmetric `padding=k // 2` of a k x k convolution (differs from 'SAME' when strided)."""
    pad = kernel_size // 2
    return ((pad, pad), (pad, pad))


class Conv1x1(nn.Conv):
    """Bias-free 1x1 convolution with the reference's init and PyTorch's padding 0.

    `nn.Conv(features, (1, 1), strides, padding='VALID', use_bias=False)`: `kernel` of shape
    `[1, 1, in, features]`; stride s reads the pixels `x[:, ::s, ::s]`.
    """

    kernel_size: Sequence[int] = (1, 1)
    padding: Any = "VALID"
    use_bias: bool = False
    kernel_init: Any = conv_kernel_init


def module_options(module_cls, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The fields of a Flax module class that its user sets: the constructor's dataclass fields
    without Flax's `parent` and `name`, and without `exclude`, in declaration order."""
    skip = {"parent", "name", *exclude}
    return tuple(f.name for f in dataclasses.fields(module_cls) if f.init and f.name not in skip)
