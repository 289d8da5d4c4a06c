"""The zero-mean MGGD of the paper's Eqn. (1): parameters, density, sampling and covariance."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import special

from gg_jax import linalg

HIGHEST = linalg.HIGHEST


class MGGD(NamedTuple):
    """Parameters of zero-mean MGGDs, batched over leading axes.

    sigma: `[..., d, d]` symmetric positive-definite scatter with `trace(sigma) = d`.
    beta: `[...]` shape (> 0).
    delta: `[...]` scale (> 0).
    """

    sigma: jax.Array
    beta: jax.Array
    delta: jax.Array


def result_dtype(*arrays):
    return linalg.compute_dtype(jnp.result_type(*arrays))


def _log_normalizer(beta, d: int):
    """log of `Gamma(d/2) beta / (pi^{d/2} Gamma(d/(2 beta)) 2^{d/(2 beta)})`."""
    a = d / (2.0 * beta)
    return math.lgamma(d / 2.0) + jnp.log(beta) - 0.5 * d * math.log(math.pi) - special.gammaln(a) - a * math.log(2.0)


def quadratic_form(x, sigma):
    """`y_n = x_n^T sigma^{-1} x_n` for x `[..., N, d]`, sigma `[..., d, d]` -> `([..., N], log|sigma|)`."""
    chol = jnp.linalg.cholesky(sigma)
    z = jax.scipy.linalg.solve_triangular(chol, jnp.swapaxes(x, -1, -2), lower=True)  # [..., d, N]
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    return jnp.sum(z * z, axis=-2), logdet


def _check_params(params: MGGD):
    sigma = jnp.asarray(params.sigma)
    if sigma.ndim < 2 or sigma.shape[-1] != sigma.shape[-2]:
        raise ValueError(f"MGGD.sigma must have shape [..., d, d], got {sigma.shape}.")
    dtype = result_dtype(sigma, params.beta, params.delta)
    return sigma.astype(dtype), jnp.asarray(params.beta, dtype), jnp.asarray(params.delta, dtype)


def log_prob(x, params: MGGD):
    """Log-density of paper Eqn. (1) at `x`.

    Args:
      x: `[..., N, d]` points (any float dtype).
      params: an `MGGD` whose batch shape broadcasts with `x.shape[:-2]`.

    Returns:
      `[..., N]` log-densities (float32, or float64 for float64 input).
    """
    sigma, beta, delta = _check_params(params)
    x = jnp.asarray(x)
    d = sigma.shape[-1]
    if x.ndim < 2 or x.shape[-1] != d:
        raise ValueError(f"log_prob expects x of shape [..., N, {d}] for a {d}-dimensional MGGD, got {x.shape}.")
    x = x.astype(result_dtype(x, sigma))
    batch = jnp.broadcast_shapes(x.shape[:-2], sigma.shape[:-2], beta.shape, delta.shape)
    x = jnp.broadcast_to(x, batch + x.shape[-2:])
    sigma = jnp.broadcast_to(sigma.astype(x.dtype), batch + (d, d))
    beta = jnp.broadcast_to(beta, batch)[..., None].astype(x.dtype)
    delta = jnp.broadcast_to(delta, batch)[..., None].astype(x.dtype)
    y, logdet = quadratic_form(x, sigma)
    return _log_normalizer(beta, d) - 0.5 * d * jnp.log(delta) - 0.5 * logdet[..., None] - 0.5 * (y / delta) ** beta


def sample(key, params: MGGD, num_samples: int):
    """Draws from the MGGDs by their stochastic representation ([33], Sec. II).

    `x = sqrt(t) A u` with `u` uniform on the unit sphere, `A A^T = sigma` (the Cholesky factor;
    any factor gives the same distribution), `t = delta (2 s)^{1/beta}` and
    `s ~ Gamma(d / (2 beta))`, so that `x^T sigma^{-1} x = t`.

    Args:
      key: a PRNG key.
      params: an `MGGD` with batch shape `[...]`.
      num_samples: N.

    Returns:
      `[..., N, d]` samples (float32, or float64 for float64 parameters).
    """
    sigma, beta, delta = _check_params(params)
    d = sigma.shape[-1]
    batch = jnp.broadcast_shapes(sigma.shape[:-2], beta.shape, delta.shape)
    beta = jnp.broadcast_to(beta, batch)[..., None]
    delta = jnp.broadcast_to(delta, batch)[..., None]
    chol = jnp.linalg.cholesky(jnp.broadcast_to(sigma, batch + (d, d)))
    key_u, key_s = jax.random.split(key)
    g = jax.random.normal(key_u, batch + (num_samples, d), sigma.dtype)
    u = g / jnp.linalg.norm(g, axis=-1, keepdims=True)
    s = jax.random.gamma(key_s, jnp.broadcast_to(d / (2.0 * beta), batch + (num_samples,)), dtype=sigma.dtype)
    t = delta * (2.0 * s) ** (1.0 / beta)
    x = jnp.einsum("...nj,...ij->...ni", u, chol, precision=HIGHEST)
    return jnp.sqrt(t)[..., None] * x


def covariance(params: MGGD):
    """Covariance `E[x x^T]` of the MGGDs.

    `E[t] / d * sigma` with `E[t] = delta 2^{1/beta} Gamma((d + 2)/(2 beta)) / Gamma(d/(2 beta))`
    (the representation of `sample`); `delta * sigma` for beta = 1.

    Returns:
      `[..., d, d]`.
    """
    sigma, beta, delta = _check_params(params)
    d = sigma.shape[-1]
    log_scale = (
        jnp.log(delta)
        + jnp.log(2.0) / beta
        + special.gammaln((d + 2) / (2.0 * beta))
        - special.gammaln(d / (2.0 * beta))
    )
    return (jnp.exp(log_scale) / d)[..., None, None] * sigma
