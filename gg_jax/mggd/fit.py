"""The maximum-likelihood fit of an MGGD ([33]): the fixed point of the paper's Eqn. (3) for the
scatter, Newton-Raphson on the profile-likelihood equation (Eqn. 4) for the shape."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from gg_jax import linalg
from gg_jax.errors import UserError
from gg_jax.mggd.distribution import HIGHEST, MGGD, quadratic_form, result_dtype

#: The range searched for the shape beta. A root of the profile-likelihood equation outside it
#: (or none: e.g. samples exactly at 0, whose likelihood grows without bound as beta -> 0) gives
#: the bound and `FitInfo.converged = False`.
BETA_BOUNDS = (2.0**-8, 2.0**8)
_MAX_BETA_STEPS = 60


class FitDataError(UserError, ValueError):
    """Samples that `fit` cannot fit: NaN / inf values, or samples that do not span R^d."""


class FitInfo(NamedTuple):
    """How `fit_with_info` ended, per problem (`[...]`).

    num_iters: int32, iterations of the scatter fixed point (each with a full beta solve).
    converged: bool, the relative change of sigma and beta fell below `tol` within
      `max_iters` iterations with beta inside `BETA_BOUNDS` (and the samples could be fitted:
      more than d of them, finite, spanning R^d; see `fit_with_info`).
    """

    num_iters: jax.Array
    converged: jax.Array


def _beta_moments(beta, log_y, valid):
    """`S, S'/S, S''/S - (S'/S)^2` of `S(beta) = sum_n y_n^beta` (y normalised, max 1)."""
    t = jnp.where(valid, jnp.exp(beta * log_y), 0.0)
    s = jnp.sum(t, axis=-1)
    m1 = jnp.sum(t * log_y, axis=-1) / s
    m2 = jnp.sum(t * log_y * log_y, axis=-1) / s
    return s, m1, jnp.maximum(m2 - m1 * m1, 0.0)


def _score(beta, log_y, valid, n, d: int):
    """Profile-likelihood score `f(beta)` and `f'(beta)` (see `profile_score`); beta `[...]` per problem."""
    a = d / (2.0 * beta)
    s, m1, var = _beta_moments(beta[..., None], log_y, valid)
    f = 2.0 * beta / d + special.digamma(a) + jnp.log(2.0 * beta / (n * d)) + jnp.log(s) - beta * m1
    fp = 2.0 / d - (d / (2.0 * beta * beta)) * special.polygamma(1, a) + 1.0 / beta - beta * var
    return f, fp


def _normalised_log_y(y, valid):
    """(log(y / max y) where y > 0, 0 elsewhere; mask of those; max y)."""
    valid = valid & (y > 0)
    y_max = jnp.max(jnp.where(valid, y, 0.0), axis=-1, keepdims=True)
    safe = jnp.where(valid, y / jnp.where(y_max > 0, y_max, 1.0), 1.0)
    return jnp.where(valid, jnp.log(safe), 0.0), valid, y_max[..., 0]


def profile_score(y, beta, d: int, mask=None):
    """The profile-likelihood equation for beta (paper Eqn. (4); [33] Eqn. (13), rescaled).

    With the scatter fixed and the scale at its optimum `delta^beta = beta S / (N d)`, where
    `S = sum_n y_n^beta`, the log-likelihood per sample is, up to a constant,
    `g(beta) = log beta - log Gamma(d/(2 beta)) - d/(2 beta) log(2 e beta S / (N d))`, and
    `f = (2 beta^2 / d) g'(beta)` is

        f(beta) = 2 beta / d + digamma(d/(2 beta)) + log(2 beta S / (N d)) - beta S'/S,

    `S' = sum_n y_n^beta log y_n`. `f` does not change when all `y_n` are scaled (computed on
    `y / max y`); it is positive near 0 for samples away from the origin and changes sign from +
    to - at each local maximum of the likelihood.

    Args:
      y: `[..., N]` quadratic forms `x_n^T sigma^{-1} x_n` (>= 0).
      beta: shapes broadcasting with `y.shape[:-1]`.
      d: the dimension.
      mask: optional `[..., N]` bool, False for samples to leave out.

    Returns:
      `(f, f')`, each of shape `y.shape[:-1]`.
    """
    y = jnp.asarray(y)
    y = y.astype(result_dtype(y))
    valid = jnp.ones(y.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), y.shape)
    n = jnp.sum(valid, axis=-1).astype(y.dtype)
    log_y, valid_pos, _ = _normalised_log_y(y, valid)
    beta = jnp.broadcast_to(jnp.asarray(beta, y.dtype), y.shape[:-1])
    return _score(beta, log_y, valid_pos, n, d)


def _solve_beta(log_y, valid, n, d: int, beta0, bracket, tol):
    """Root of `f` (the nearest local maximum of the likelihood from beta0) by bracketed Newton.

    First a bracket `lo < hi` with `f(lo) > 0 > f(hi)`: `bracket` (the previous one) if it still
    holds, else by doubling or halving beta0 within `BETA_BOUNDS`; then Newton-Raphson steps,
    replaced by the bracket's geometric midpoint whenever a step would leave the bracket (and
    so leave (0, inf)). One `lax.while_loop` does both phases (one evaluation of `f` per step,
    one copy of it in the program). Returns `(beta, found, bracket)`, the bracket as found
    before the Newton steps narrowed it.
    """
    lo_bound, hi_bound = BETA_BOUNDS
    dtype = log_y.dtype
    score = lambda b: _score(b, log_y, valid, n, d)
    beta0 = jnp.clip(beta0, lo_bound, hi_bound)
    lo_prev, hi_prev = bracket
    f_init, _ = score(jnp.stack([beta0, lo_prev, hi_prev]))
    f0 = f_init[0]
    # Keep the previous bracket when it still brackets a root (its end points moved little):
    # a fresh search from a beta0 at the root could step past a nearby second root.
    reuse = (lo_prev < hi_prev) & (f_init[1] > 0) & (f_init[2] < 0)
    up = f0 > 0  # search direction: double from a positive f, halve from a negative one
    lo = jnp.where(reuse, lo_prev, jnp.where(up, beta0, lo_bound)).astype(dtype)
    hi = jnp.where(reuse, hi_prev, jnp.where(up, hi_bound, beta0)).astype(dtype)
    start = jnp.where(up, jnp.minimum(2.0 * beta0, hi_bound), jnp.maximum(0.5 * beta0, lo_bound))
    b = jnp.where(reuse, beta0, jnp.where(f0 == 0, beta0, start))
    newton = reuse | (f0 == 0)

    def cond(state):
        *_, it, done = state
        return ~done & (it < 2 * _MAX_BETA_STEPS)

    def body(state):
        b, lo, hi, lo_e, hi_e, newton, it, _ = state
        f, fp = score(b)
        flipped = jnp.where(up, f <= 0, f >= 0)
        lo = jnp.where(f > 0, b, lo)
        hi = jnp.where(f < 0, b, hi)
        to_newton = newton | flipped
        lo_e = jnp.where(newton, lo_e, lo)
        hi_e = jnp.where(newton, hi_e, hi)
        step = b - f / fp
        inside = jnp.isfinite(step) & (step > lo) & (step < hi)
        b_newton = jnp.where(inside, step, jnp.sqrt(lo * hi))
        # Stopping keeps b, not the last (rounding-sized) step: a solve started at its own
        # result returns it unchanged, so the outer fixed point can settle.
        settled = (jnp.abs(b_newton - b) <= tol * b) | (f == 0) | (hi - lo <= tol * lo)
        at_bound = jnp.where(up, b >= hi_bound, b <= lo_bound)
        expand = jnp.where(up, jnp.minimum(2.0 * b, hi_bound), jnp.maximum(0.5 * b, lo_bound))
        b_next = jnp.where(to_newton, jnp.where(settled, b, b_newton), expand)
        done = jnp.where(to_newton, settled, at_bound)
        return b_next, lo, hi, lo_e, hi_e, to_newton, it + 1, done

    state = (b, lo, hi, lo, hi, newton, 0, jnp.asarray(False))
    b, _, _, lo_e, hi_e, found, _, _ = jax.lax.while_loop(cond, body, state)
    beta = jnp.where(found, b, jnp.where(up, hi_bound, lo_bound).astype(dtype))
    return beta, found, (lo_e, hi_e)


def _normalise_trace(s):
    d = s.shape[-1]
    return s * (d / jnp.trace(s, axis1=-2, axis2=-1))[..., None, None]


def _fit_one(x, valid, beta_fixed, *, estimate_beta: bool, max_iters: int, tol: float, lam: float):
    """One problem: x `[N, d]`, valid `[N]` bool, beta_fixed scalar.

    Returns `(sigma, beta, delta, iters, converged)` and the data checks `(nonfinite [d],
    zero [d], dependent, failed)` that `fit_with_info` turns into errors for concrete input.
    """
    d = x.shape[-1]
    dtype = x.dtype
    eps = jnp.finfo(dtype).eps
    n = jnp.sum(valid).astype(dtype)
    enough = n > d
    finite = jnp.isfinite(x)
    nonfinite = jnp.any(valid[:, None] & ~finite, axis=0)  # [d]
    xv = jnp.where(valid[:, None] & finite, x, 0.0)
    # Divide by the power of two 2^e just above the largest |x|: exact (so the fit of data of
    # ordinary scale is unchanged to the bit), and no sum of squares overflows or underflows for
    # any finite scale. e is split in two halves so that each factor is a normal number.
    _, e = jnp.frexp(jnp.max(jnp.abs(xv)))
    e1 = e // 2
    e2 = e - e1
    x = xv * linalg.pow2(-e1, dtype) * linalg.pow2(-e2, dtype)
    second_moment = jnp.einsum("nc,nd->cd", x, x, precision=HIGHEST) / jnp.maximum(n, 1.0)
    # Samples that do not span R^d (no MLE): a channel without a non-zero value, or one that
    # is (up to rounding) a linear combination of the others: a Cholesky pivot of the
    # correlation matrix, that channel's variance left unexplained by the earlier ones, at
    # rounding level (duplicated channels: below 2 eps).
    var = jnp.diagonal(second_moment)
    zero = (var <= 0) & enough
    inv_sd = jnp.where(var > 0, jax.lax.rsqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    corr = second_moment * inv_sd[:, None] * inv_sd[None, :]
    eye = jnp.eye(d, dtype=dtype)
    corr = jnp.where(zero[:, None] | zero[None, :], eye, corr)
    pivots = jnp.diagonal(jnp.linalg.cholesky(corr)) ** 2
    dependent = enough & ~jnp.all(pivots > 16 * eps)  # NaN pivots: not positive definite
    ok = enough & ~jnp.any(nonfinite) & ~jnp.any(zero) & ~dependent
    sigma0 = _normalise_trace(jnp.where(ok, second_moment, eye))
    beta0 = jnp.asarray(1.0, dtype) if estimate_beta else beta_fixed.astype(dtype)
    beta_tol = 16 * eps

    def scatter_step(y, beta):
        # Paper Eqn. (3): Sigma_t = 1/N sum_n w_n x_n x_n^T with w_n = N d y_n^{beta-1} / sum_j y_j^beta,
        # written as (d / S) sum_n (y_n / y_max)^beta (x_n x_n^T / y_n): no power of a small y_n overflows.
        log_y, pos, _ = _normalised_log_y(y, valid)
        t = jnp.where(pos, jnp.exp(beta * log_y), 0.0)
        u = jnp.where(pos[:, None], x / jnp.sqrt(jnp.where(pos, y, 1.0))[:, None], 0.0)
        s = (d / jnp.sum(t)) * jnp.einsum("n,nc,nd->cd", t, u, u, precision=HIGHEST)
        if lam != 1.0:
            s = linalg.regularized_sqrtm(s, lam, method="eigh")
        return _normalise_trace(0.5 * (s + s.T))

    def cond(state):
        _, _, _, it, stop, _ = state
        return ~stop & (it < max_iters)

    def body(state):
        sigma, beta, bracket, it, _, _ = state
        y, _ = quadratic_form(x, sigma)
        found = jnp.asarray(True)
        if estimate_beta:
            log_y, pos, _ = _normalised_log_y(y, valid)
            beta_new, found, bracket = _solve_beta(log_y, pos, n, d, beta, bracket, beta_tol)
        else:
            beta_new = beta
        sigma_new = scatter_step(y, beta_new)
        sigma_change = jnp.linalg.norm(sigma_new - sigma) / jnp.linalg.norm(sigma_new)
        beta_change = jnp.abs(beta_new - beta) / beta_new
        # Where the likelihood is flat in beta (few samples), rounding moves its root by a few
        # float32 ulps from one solve to the next: beta settles at 4x the solver's tolerance.
        settled = (sigma_change <= tol) & (beta_change <= jnp.maximum(tol, 4 * beta_tol))
        change = jnp.maximum(sigma_change, beta_change)
        # A beta at its bound does not move either: stop there too, but not as converged.
        return sigma_new, beta_new, bracket, it + 1, settled | ~jnp.isfinite(change), settled & found

    one = jnp.asarray(1.0, dtype)
    state = (sigma0, beta0, (one, one), jnp.asarray(0, jnp.int32), ~ok, jnp.asarray(False))
    sigma, beta, _, iters, _, converged = jax.lax.while_loop(cond, body, state)
    # Closed-form scale given (sigma, beta): delta^beta = beta sum_n y_n^beta / (N d).
    y, _ = quadratic_form(x, sigma)
    log_y, pos, y_max = _normalised_log_y(y, valid)
    s = jnp.sum(jnp.where(pos, jnp.exp(beta * log_y), 0.0))
    delta = y_max * (beta * s / (n * d)) ** (1.0 / beta)
    # A fit of nearly dependent channels can still break down in rounding: no MLE either.
    failed = ok & ~(jnp.all(jnp.isfinite(sigma)) & jnp.isfinite(beta) & jnp.isfinite(delta))
    fitted = ok & ~failed
    # Back to the scale of x (delta is in squared units of x): exact, saturating to 0 or inf.
    p1, p2 = linalg.pow2(e1, dtype), linalg.pow2(e2, dtype)
    delta = delta * p1 * p1 * p2 * p2
    nan = jnp.asarray(jnp.nan, dtype)
    sigma = jnp.where(fitted, sigma, nan)
    params = (sigma, jnp.where(fitted, beta, nan), jnp.where(fitted, delta, nan), iters, converged & fitted)
    return params, (nonfinite, zero, dependent, failed)


@functools.partial(jax.jit, static_argnames=("estimate_beta", "max_iters", "tol", "lam"))
def _fit_batched(x, valid, beta_fixed, *, estimate_beta, max_iters, tol, lam):
    fn = functools.partial(_fit_one, estimate_beta=estimate_beta, max_iters=max_iters, tol=tol, lam=lam)
    return jax.vmap(fn)(x, valid, beta_fixed)


def fit_with_info(x, *, beta=None, mask=None, max_iters: int = 100, tol: float = 1e-6, lam: float = 1.0):
    """Maximum-likelihood MGGD of zero-mean samples, with iteration counts and convergence flags.

    Alternates, until the relative change of both falls below `tol` (or `max_iters`):
      1. beta: the root of the profile-likelihood equation (`profile_score`, paper Eqn. (4))
         given the current scatter, by Newton-Raphson inside a bracket (the nearest local
         maximum of the likelihood, searched from the previous beta, 1 at the start);
      2. the scatter: one step of the fixed point of paper Eqn. (3),
         `Sigma_t = 1/N sum_n w_n x_n x_n^T`, `w_n = N d / (y_n + y_n^{1-beta} sum_{j != n} y_j^beta)`,
         `y_n = x_n^T Sigma_{t-1}^{-1} x_n`, normalised to trace d; with `lam < 1` the step is
         followed by the robust estimator of Theorem 1 / Eqn. (6), `sqrt(c^2 I + Sigma_t/lam) - c I`,
         `c = (1 - lam)/lam` (`linalg.regularized_sqrtm`).
    Then `delta = (beta / (N d) sum_n y_n^beta)^{1/beta}` in closed form. Starts from the
    normalised second-moment matrix.

    The samples must span R^d: otherwise the zero-mean likelihood is unbounded (the scatter
    collapses onto the samples' span) and `lam` does not help (Theorem 1's estimator keeps zero
    eigenvalues at zero); nor does a ridge, whose fit of samples in r < d dimensions reads their
    quadratic forms, which follow an r-dimensional law, as d-dimensional ones: a wrong beta.
    So fewer than d + 1 samples are an error; reduce d (e.g. one fit per channel, d = 1) or
    pool more samples. Neither may a channel be all zero (a dead ReLU channel) or a linear
    combination of the others (a duplicated channel): numerically, a channel whose variance
    left unexplained by the earlier channels is below 16 eps of its variance (a Cholesky
    pivot of the samples' correlation matrix), or whose fit breaks down in rounding. Samples
    exactly at the origin make the likelihood grow without bound as beta -> 0: beta then ends
    at `BETA_BOUNDS[0]`, not converged (leave them out with `mask`).

    Bad data: with concrete (not traced) input, samples with a NaN or inf value, and problems
    whose samples do not span R^d, raise a `FitDataError` (a `ValueError`) naming the batch
    entries and channels. Under `jit` / `vmap` nothing can be raised: such problems give NaN
    parameters and `converged = False`, as problems with at most d samples do (also eagerly).

    Scale: the samples of each problem are divided by the power of two just above their largest
    magnitude (exact, so fits of ordinary data are unchanged to the bit), so sigma and beta are
    fitted for any finite scale. delta, in squared units of x, is scaled back and saturates
    where it leaves the float range (float32: to inf for samples of magnitude around 1e19 and
    above, to 0 around 1e-19 and below, where XLA flushes subnormals).

    Args:
      x: `[..., N, d]` samples (any float dtype), taken as zero-mean (centre them first if not).
      beta: None to estimate the shape, or a fixed shape (a number or an array broadcasting
        to `x.shape[:-2]`): then only sigma and delta are fitted.
      mask: optional `[..., N]` bool, False for samples to leave out (e.g. padding; their
        values are not checked). A problem with at most d samples left gives NaN parameters
        and `converged = False`.
      max_iters: cap on the fixed-point iterations.
      tol: relative change of sigma (Frobenius) and beta at which to stop.
      lam: in (0, 1]; 1 is the plain MLE, smaller values apply Theorem 1 to each iterate.

    Returns:
      `(MGGD, FitInfo)` with batch shape `x.shape[:-2]`, float32 (float64 for float64 input).

    Raises:
      FitDataError: concrete samples with NaN / inf values or that do not span R^d (above).
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"fit expects samples of shape [..., N, d], got shape {x.shape}.")
    n, d = x.shape[-2:]
    if n <= d:
        raise ValueError(
            f"fit needs more samples than dimensions (N > d), got N={n} samples of dimension d={d}: the "
            "zero-mean MGGD likelihood is unbounded otherwise (lam does not change that). Fit fewer "
            "dimensions (e.g. each channel on its own, d = 1) or pool samples (e.g. positions of several images)."
        )
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lam must lie in (0, 1], got {lam}.")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}.")
    x = x.astype(result_dtype(x))
    batch = x.shape[:-2]
    valid = jnp.ones(x.shape[:-1], bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), x.shape[:-1])
    if beta is None:
        beta_fixed = jnp.ones(batch, x.dtype)
    else:
        beta_fixed = jnp.broadcast_to(jnp.asarray(beta, x.dtype), batch)
        if not isinstance(beta_fixed, jax.core.Tracer) and not bool(jnp.all(beta_fixed > 0)):
            raise ValueError(f"A fixed beta must be positive, got {beta}.")
    size = math.prod(batch)
    (sigma, beta_hat, delta, iters, converged), checks = _fit_batched(
        x.reshape((size, n, d)),
        valid.reshape((size, n)),
        beta_fixed.reshape((size,)),
        estimate_beta=beta is None,
        max_iters=int(max_iters),
        tol=float(tol),
        lam=float(lam),
    )
    if not any(isinstance(a, jax.core.Tracer) for a in (x, valid)):
        _raise_for_bad_data(x.reshape((size, n, d)), valid.reshape((size, n)), batch, *jax.device_get(checks))
    params = MGGD(sigma.reshape(batch + (d, d)), beta_hat.reshape(batch), delta.reshape(batch))
    return params, FitInfo(iters.reshape(batch), converged.reshape(batch))


def _channel_list(channels) -> str:
    """ "channel 3" or "channels 0, 2" (the first 8, then how many)."""
    channels = [int(c) for c in channels]
    text = ", ".join(str(c) for c in channels[:8])
    text += f", ... ({len(channels)} channels)" if len(channels) > 8 else ""
    return ("channels " if len(channels) > 1 else "channel ") + text


def _dependent_channels(x, eps) -> np.ndarray:
    """Channels of the near-null space of the samples' correlation matrix (float64, on the host)."""
    m = x.T @ x
    sd = np.sqrt(np.diag(m))
    live = np.flatnonzero(sd > 0)
    corr = m[np.ix_(live, live)] / np.outer(sd[live], sd[live])
    w, v = np.linalg.eigh(corr)
    null = w <= max(w[0], len(live) * eps * w[-1])
    return live[np.sqrt(np.sum(v[:, null] ** 2, axis=1)) >= 0.05]


def _raise_for_bad_data(x, valid, batch, nonfinite, zero, dependent, failed):
    """The FitDataError of a concrete fit (`fit_with_info`); x `[P, N, d]`, the checks of `_fit_one`."""

    def where(p):
        return "the samples" if not batch else f"batch entry {tuple(int(i) for i in np.unravel_index(p, batch))}"

    def listing(problems, describe):
        items = [f"{where(p)}: {describe(p)}" for p in problems[:4]]
        more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
        return "; ".join(items) + more

    bad = np.flatnonzero(nonfinite.any(axis=-1))
    if bad.size:
        places = listing(bad, lambda p: _channel_list(np.flatnonzero(nonfinite[p])))
        raise FitDataError(
            f"fit got samples with NaN or inf values ({places}). Remove them, or leave those samples out with mask=."
        )
    zero_problems = zero.any(axis=-1)
    bad = np.flatnonzero(zero_problems | dependent | failed)
    if not bad.size:
        return
    eps = np.finfo(x.dtype).eps

    def describe(p):
        if zero_problems[p]:
            return f"{_channel_list(np.flatnonzero(zero[p]))} all zero (a dead channel?)"
        channels = _dependent_channels(np.asarray(x[p], np.float64)[np.asarray(valid[p])], eps)
        what = "linearly dependent (duplicated?)" if dependent[p] else "nearly linearly dependent (the fit broke down)"
        return f"{_channel_list(channels)} {what}"

    raise FitDataError(
        f"fit got samples that do not span R^{x.shape[-1]}, for which the MLE does not exist "
        f"({listing(bad, describe)}). Leave those channels out, or fit each channel on its own (d = 1)."
    )


def fit(x, *, beta=None, mask=None, max_iters: int = 100, tol: float = 1e-6, lam: float = 1.0) -> MGGD:
    """Maximum-likelihood MGGD of zero-mean samples `x` `[..., N, d]` -> `MGGD` (batch `x.shape[:-2]`).

    See `fit_with_info` for the algorithm and the arguments; this drops the `FitInfo`.
    """
    return fit_with_info(x, beta=beta, mask=mask, max_iters=max_iters, tol=tol, lam=lam)[0]
