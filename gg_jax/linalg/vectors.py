"""Vectorisation of symmetric matrices (reference step 5) and the pieces of the baseline heads."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from gg_jax.linalg.covariance import check_square, covariance
from gg_jax.linalg.precision import as_f32


@functools.cache
def triu_indices(c: int, lower: bool = True) -> np.ndarray:
    """Flat indices into a `C x C` matrix of the C(C+1)/2 vectorised entries.

    lower=True: `a[i, j]` with `i >= j` in row-major order, (0,0), (1,0), (1,1), (2,0), ...
    (the reference 3G-Net layout). lower=False: `i <= j` in row-major order,
    (0,0), (0,1), ..., (0,C-1), (1,1), ... (fast-MPN-COV's iSQRT-COV layout).
    """
    rows, cols = np.tril_indices(c) if lower else np.triu_indices(c)
    idx = (rows * c + cols).astype(np.int32)
    idx.setflags(write=False)
    return idx


def triu_vector(a, lower: bool = True):
    """Vectorise symmetric matrices into their C(C+1)/2 distinct entries (reference step 5).

    Args:
      a: `[..., C, C]` matrices (any float dtype; computed in float32).
      lower: True (default) for the reference 3G-Net order (`i >= j`, row-major);
        False for fast-MPN-COV's order (`i <= j`, row-major). For symmetric `a`
        the two orders hold the same values, permuted.

    Returns:
      `[..., C(C+1)/2]` float32.
    """
    a = as_f32(a)
    check_square(a, "triu_vector")
    c = a.shape[-1]
    idx = triu_indices(c, lower)
    flat = a.reshape(a.shape[:-2] + (c * c,))
    # Static, sorted, unique indices let XLA lower the backward scatter-add cheaply.
    return flat.at[..., idx].get(indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")


def signed_sqrt(x, eps: float = 1e-8):
    """Element-wise `sign(x) * sqrt(|x| + eps)` (B-CNN normalisation), float32.

    `eps` keeps the gradient finite at 0.
    """
    x = as_f32(x)
    return jnp.sign(x) * jnp.sqrt(jnp.abs(x) + eps)


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """`x / max(||x||_2, eps)` along `axis`, float32."""
    x = as_f32(x)
    # max before sqrt (same value): sqrt'(0) = inf would make the gradient 0 * inf = NaN
    # for an all-zero x (e.g. B-CNN on an all-zero feature map).
    sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq_norm, eps * eps))


def gaussian_embedding_matrix(x, eps: float = 1e-7, matmul_precision="auto"):
    """G2DeNet's embedding of a Gaussian N(mu, S) as an SPD matrix.

    `[[S + mu mu^T, mu], [mu^T, 1]]`, with `S` the covariance of `x` (divided by N).

    Args:
      x: `[..., N, C]` features.
      eps: ridge of the covariance.
      matmul_precision: product setting of the covariance (`gg_jax.linalg`).

    Returns:
      `[..., C+1, C+1]` float32 SPD matrices.
    """
    x = as_f32(x)
    mu = jnp.mean(x, axis=-2)  # [..., C]
    s = covariance(x, eps, matmul_precision) + mu[..., :, None] * mu[..., None, :]
    top = jnp.concatenate([s, mu[..., :, None]], axis=-1)
    bottom = jnp.concatenate([mu[..., None, :], jnp.ones(mu.shape[:-1] + (1, 1), mu.dtype)], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)
