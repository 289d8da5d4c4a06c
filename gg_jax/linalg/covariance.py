"""Gram and covariance matrices of feature vectors (reference step 3), and their scaling
for features of any finite size."""

from __future__ import annotations

import functools

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

from gg_jax.linalg.precision import as_f32, lax_precision


def _check_features(x, name):
    if x.ndim < 2:
        raise ValueError(f"{name} expects features of shape [..., N, C], got shape {x.shape}.")
    if x.shape[-2] == 0:
        raise ValueError(
            f"{name} of N = 0 positions (features of shape {x.shape}) is undefined: the feature map "
            "has no spatial positions; use a larger input or a smaller total stride."
        )


def check_square(a, name):
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} expects square matrices of shape [..., C, C], got shape {a.shape}.")


def eye_like(a):
    return jnp.eye(a.shape[-1], dtype=a.dtype)


def trace(a):
    """Trace over the last two axes, keeping them as [..., 1, 1] for broadcasting."""
    return jnp.trace(a, axis1=-2, axis2=-1)[..., None, None]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _gram(x, precision):
    return jnp.einsum("...nc,...nd->...cd", x, x, precision=precision)


@_gram.defjvp
def _gram_jvp(precision, primals, tangents):
    # d(X^T X) = P + P^T with P = X^T dX: one product per tangent, so the backward pass
    # (the transpose, dX = X (G + G^T)) is one product too, not two.
    (x,), (dx,) = primals, tangents
    p = jnp.einsum("...nc,...nd->...cd", x, dx, precision=precision)
    return _gram(x, precision), p + jnp.swapaxes(p, -1, -2)


def gram(x, matmul_precision="auto"):
    """Gram matrix of N feature vectors divided by N: `X^T X / N` (B-CNN's bilinear pool).

    Symmetric, so its gradient is one product: `dL/dX = X (G + G^T) / N` for the
    cotangent G (paper Eqn. 18 without the centring).

    Args:
      x: `[..., N, C]` features (any float dtype).
      matmul_precision: product setting (`gg_jax.linalg`).

    Returns:
      `[..., C, C]` float32 (float64 for float64 input).
    """
    x = as_f32(x)
    _check_features(x, "gram")
    return _gram(x, lax_precision(matmul_precision, x.dtype)) / x.shape[-2]


def covariance(x, eps: float = 1e-7, matmul_precision="auto"):
    """Sample covariance of N feature vectors (reference step 3).

    `S = (1/N) Xc^T Xc + eps * I`, where `Xc` is `x` with its mean over the N
    positions removed (divided by N, not N-1, as the reference does). One product
    forward and one backward (`gram`).

    Args:
      x: `[..., N, C]` features (any float dtype); N positions, C channels.
      eps: ridge added to the diagonal so that S is strictly positive definite (a number, or
        an array broadcasting to `[..., 1, 1]`, e.g. divided by `scale_features`' unit squared).
      matmul_precision: product setting (`gg_jax.linalg`).

    Returns:
      `[..., C, C]` float32 symmetric positive-definite matrices.
    """
    x = as_f32(x)
    _check_features(x, "covariance")
    xc = x - jnp.mean(x, axis=-2, keepdims=True)
    return gram(xc, matmul_precision) + eps * jnp.eye(x.shape[-1], dtype=x.dtype)


def scaled_covariance(x, eps: float = 1e-7, matmul_precision="auto"):
    """`covariance` for features of any finite scale: `(S / unit^2, unit)`.

    The centred features are divided by `unit` `[..., 1, 1]` (`scale_features`: 1 below
    2^16, else a power of two) and the ridge is `eps / unit^2`. Dividing by a power of two
    is exact, so `S / unit^2` is `covariance(x, eps) / unit^2` wherever that is finite; the
    covariance of float32 features overflows from about 1e18 (`N m^2 > 3.4e38`), this does
    not, and the square of its trace, which the root's gradient divides by, stays finite
    too (the gradient of `covariance`'s root is wrong from features around 1e9). Pass
    `unit` to `sqrtm_newton_schulz` or `regularized_sqrtm` for the root of `S` (`unit`
    times that of `S / unit^2` for `lam = 1`).

    Args:
      x: `[..., N, C]` features (any float dtype).
      eps: ridge (a number).
      matmul_precision: product setting (`gg_jax.linalg`).

    Returns:
      `([..., C, C] float32, unit [..., 1, 1])`; `unit` carries no gradient.
    """
    x = as_f32(x)
    _check_features(x, "scaled_covariance")
    xc, unit = scale_features(x - jnp.mean(x, axis=-2, keepdims=True))
    return gram(xc, matmul_precision) + (eps / unit / unit) * jnp.eye(x.shape[-1], dtype=x.dtype), unit


#: `scale_features` leaves features below this magnitude as they are.
SCALE_BOUND = 2.0**16


def pow2(k, dtype):
    """`2.0**k` exactly (its bit pattern) for integer `k` within the normal exponents of `dtype`."""
    if jnp.dtype(dtype) == jnp.float64:
        return jax.lax.bitcast_convert_type((k.astype(jnp.int64) + 1023) << 52, jnp.float64)
    return jax.lax.bitcast_convert_type((k.astype(jnp.int32) + 127) << 23, jnp.float32)


def scale_features(x):
    """Features divided by a power of two so that their covariance cannot overflow: `(x / unit, unit)`.

    `unit` `[..., 1, 1]` is 1 for feature matrices whose entries are all below `SCALE_BOUND`
    (2^16) in magnitude (then `x` is returned unchanged, bit for bit), else the least power
    of two that brings them below it. The covariance of float32 features of magnitude `m`
    overflows from `m` around 1e18 (`N m^2` > 3.4e38); that of `x / unit` stays below 2^32.
    Dividing by a power of two is exact, and the covariance and its square root are
    homogeneous (`cov(x) = unit^2 cov(x / unit)`, with `eps / unit^2`;
    `sqrt(unit^2 S) = unit sqrt(S)`), so computing them on `x / unit` and scaling the root
    back by `unit` gives the numbers of the unscaled computation wherever those are finite
    (`scaled_covariance` does so only where they are not).

    Args:
      x: `[..., N, C]` features (any float dtype; computed in float32, float64 kept).

    Returns:
      `(x / unit [..., N, C], unit [..., 1, 1])`; `unit` carries no gradient.
    """
    x = as_f32(x)
    _check_features(x, "scale_features")
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True))
    _, e = jnp.frexp(peak)  # peak = f 2^e, f in [0.5, 1)
    bound_exponent = int(np.log2(SCALE_BOUND))
    unit = pow2(jnp.maximum(e - bound_exponent, 0), x.dtype)
    return x / unit, unit
