"""The 3G head's exact re-weighting: the T steps of the paper's Eqn. (9) computed, not learned."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gg_jax import linalg
from gg_jax.mggd.distribution import result_dtype


def _log_weights(y, beta, c):
    """log of Eqn. (9)'s `w_n = N d / (y_n + c_n y_n^{1-beta})`, up to a constant per problem.

    `c=None` is Eqn. (7)'s `c_n = sum_{j != n} y_j^beta`, for which `w_n` is
    proportional to `y_n^{beta-1}`; a number (or array) `c >= 0` is the same constant for every
    position, `log w_n = -log y_n - softplus(log c - beta log y_n)` (no overflow of y^{1-beta}).
    """
    log_y = jnp.log(y)
    if c is None:
        return (beta - 1.0) * log_y
    return -log_y - jnp.logaddexp(0.0, jnp.log(c) - beta * log_y)


def reweighted_covariance(
    x, *, num_steps: int, beta, c=None, num_iters: int = 5, eps: float = 1e-7, unroll=True, matmul_precision="auto"
):
    """T steps of the generalized-Gaussian re-weighting, paper Eqn. (9), as the 3G head computes it.

    The positions of each map are the samples; they are centred (`xc_n = x_n - mean`, as the
    covariance of the 3G head is) and taken as zero-mean MGGD samples. From
    `Sigma_0 = 1/N sum_n xc_n xc_n^T + eps I` (`linalg.covariance`), each step computes

        P = Sigma_{t-1}^{-1/2}                      Newton-Schulz, `num_iters` iterations (Eqn. 10)
        y_n = |P xc_n|^2                            diag(Y), Y = X^T Sigma^{-1} X
        w_n = N d / (y_n + c_n y_n^{1-beta})        Eqn. (9), then rescaled to mean 1
        Sigma_t = 1/N sum_n w_n xc_n xc_n^T + eps I

    and returns `Sigma_T`. The fixed point of Eqn. (3) defines the scatter only up to scale, and
    with a truncated Newton-Schulz inverse root the unnormalised weights carry its error as an
    overall factor: mean-1 weights keep `Sigma_t` on the scale of the plain covariance, so that
    beta = 1 with Eqn. (7)'s `c_n` (weights exactly 1) is the plain covariance, whatever
    `num_iters`.

    Args:
      x: `[..., N, C]` features (any float dtype; computed in float32, float64 kept).
      num_steps: T >= 0.
      beta: the shape (> 0), a number or a scalar array (e.g. a learned parameter).
      c: None for Eqn. (7)'s `c_n = sum_{j != n} y_j^beta` (each step is then exactly
        the fixed-point step of Eqn. (3), `w_n` proportional to `y_n^{beta-1}`); or a constant
        `c >= 0` shared by all positions, Eqn. (9) as the learned block approximates it.
      num_iters: Newton-Schulz iterations of each inverse root.
      eps: ridge of every `Sigma_t` (the head's `cov_eps`).
      unroll: unroll the `lax.scan` over the T steps.
      matmul_precision: the float32 product setting of every product, the head's
        (`gg_jax.linalg`).

    Returns:
      `(Sigma_T [..., C, C], weights [T, ..., N])`, float32 (float64 for float64 input); the
      weights of step t are those of `Sigma_t`, mean 1 over the N positions.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
    x = jnp.asarray(x)
    x = x.astype(result_dtype(x))
    if x.ndim < 2:
        raise ValueError(f"reweighted_covariance expects features of shape [..., N, C], got shape {x.shape}.")
    n, d = x.shape[-2:]
    xc = x - jnp.mean(x, axis=-2, keepdims=True)
    eye = jnp.eye(d, dtype=x.dtype)
    beta = jnp.asarray(beta, x.dtype)
    c = None if c is None else jnp.asarray(c, x.dtype)
    tiny = jnp.finfo(x.dtype).tiny

    precision = linalg.lax_precision(matmul_precision, x.dtype)

    def weighted_cov(w):
        return jnp.einsum("...nc,...nd->...cd", w[..., None] * xc, xc, precision=precision) / n + eps * eye

    def step(sigma, _):
        p = linalg.inv_sqrtm_newton_schulz(sigma, num_iters, matmul_precision=matmul_precision)
        z = jnp.matmul(xc, p, precision=precision)  # rows P xc_n (P is symmetric)
        y = jnp.maximum(jnp.sum(z * z, axis=-1), tiny)
        w = n * jax.nn.softmax(_log_weights(y, beta, c), axis=-1)
        return weighted_cov(w), w

    sigma0 = weighted_cov(jnp.ones(x.shape[:-1], x.dtype))
    unroll = max(num_steps, 1) if unroll is True else unroll
    return jax.lax.scan(step, sigma0, None, length=num_steps, unroll=unroll)
