"""Per-channel fits: univariate generalized Gaussian (`gg_jax.mggd.fit`, d = 1) against Gaussian."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gg_jax import mggd
from gg_jax.errors import UserError


class DiagnoseError(UserError, ValueError):
    """A diagnosis cannot run as asked (no such workdir, images, channel or mode); the message says why."""


LAYERS = ("layer4", "reduced")
MODES = ("positive", "centered")
#: Fewer values than this in a channel (after leaving out zeros in "positive" mode): not fitted.
MIN_SAMPLES = 8
DEFAULT_NUM_IMAGES = 16
NUM_FIGURE_CHANNELS = 4
# Status of one fit.
FITTED, ALL_ZERO, TOO_FEW = 0, 1, 2
# Values per compiled fit (rows x values per row; the rows are padded to a power of two, 64 to 8192).
_CHUNK_VALUES = 1 << 22


class ChannelFits(NamedTuple):
    """Per-channel fits, arrays of the leading shape of the values (e.g. `[images, channels]`).

    status: FITTED, ALL_ZERO (nothing to fit: all zero, or constant) or TOO_FEW.
    num_values: values fitted (non-zero ones in "positive" mode).
    zero_share: share of exact zeros among all values of the channel.
    beta, delta: the generalized Gaussian (NaN where not fitted).
    variance: the zero-mean Gaussian's variance (the GGD with beta = 1).
    ll_gain: mean log-likelihood per value, generalized Gaussian minus Gaussian (nats, >= 0).
    converged: the fit met its tolerance with beta inside `mggd.BETA_BOUNDS`.
    """

    status: np.ndarray
    num_values: np.ndarray
    zero_share: np.ndarray
    beta: np.ndarray
    delta: np.ndarray
    variance: np.ndarray
    ll_gain: np.ndarray
    converged: np.ndarray


@functools.partial(jax.jit, static_argnames="max_iters")
def _fit_and_score(x, mask, max_iters: int):
    """GGD and Gaussian fits of `x` `[P, N]` (values where `mask`) and their mean log-likelihoods."""
    params, info = mggd.fit_with_info(x[..., None], mask=mask, max_iters=max_iters)
    maskf = mask.astype(x.dtype)
    num = jnp.maximum(jnp.sum(maskf, axis=-1), 1.0)
    log_p = jnp.where(mask, mggd.log_prob(x[..., None], params), 0.0)
    ll_ggd = jnp.sum(log_p, axis=-1) / num
    # The zero-mean Gaussian MLE (the beta = 1 fit): variance = mean x^2, mean log-likelihood
    # -log(2 pi variance)/2 - 1/2.
    variance = jnp.sum(maskf * x * x, axis=-1) / num
    ll_gauss = -0.5 * jnp.log(2.0 * math.pi * variance) - 0.5
    return params.beta, params.delta, variance, ll_ggd - ll_gauss, info.converged


def fit_channels(values, *, mode: str = "positive", min_samples: int = MIN_SAMPLES, max_iters: int = 50):
    """Univariate generalized Gaussian and Gaussian fits of each row of `values`.

    Args:
      values: `[..., N]` activations, e.g. `[images, channels, positions]`; one fit per row.
      mode: "positive" (zero-mean fits of the non-zero values; ReLU outputs, no negative values)
        or "centered" (zero-mean fits of the values minus the row's mean).
      min_samples: rows with fewer values to fit are marked TOO_FEW (at least 2).
      max_iters: cap of `mggd.fit`'s iterations.

    Returns:
      `ChannelFits` with arrays of shape `values.shape[:-1]`.
    """
    if mode not in MODES:
        raise DiagnoseError(f"mode must be one of {MODES}, got {mode!r}.")
    if min_samples < 2:
        raise DiagnoseError(
            f"min_samples must be at least 2 (a fit needs more values than dimensions), got {min_samples}."
        )
    values = np.asarray(values, np.float32)
    if values.ndim < 1 or values.shape[-1] < 2:
        raise DiagnoseError(f"fit_channels expects values of shape [..., N] with N >= 2, got {values.shape}.")
    lead, n = values.shape[:-1], values.shape[-1]
    x = values.reshape(-1, n)
    bad = ~np.isfinite(x).all(axis=-1)
    if bad.any():
        rows = [np.unravel_index(i, lead) for i in np.flatnonzero(bad)[:3]]
        raise DiagnoseError(
            f"{int(bad.sum())} of {x.shape[0]} channels have NaN or infinite activations (first at index "
            f"{', '.join(str(tuple(int(j) for j in r)) for r in rows)}); the checkpoint or the inputs are broken: "
            "evaluate the model on these images first."
        )
    zero_share = np.mean(x == 0, axis=-1)
    if mode == "positive":
        if np.any(x < 0):
            raise DiagnoseError(
                "mode='positive' fits the non-zero values of ReLU outputs, but these activations have negative "
                "values; use mode='centered'."
            )
        mask = x > 0
        nothing = ~mask.any(axis=-1)
    else:
        nothing = np.ptp(x, axis=-1) == 0
        x = x - x.mean(axis=-1, keepdims=True)
        mask = np.ones_like(x, bool)
    num_values = mask.sum(axis=-1)
    status = np.where(nothing, ALL_ZERO, np.where(num_values < min_samples, TOO_FEW, FITTED)).astype(np.int8)
    out = {k: np.full(x.shape[0], np.nan, np.float32) for k in ("beta", "delta", "variance", "ll_gain")}
    converged = np.zeros(x.shape[0], bool)
    todo = np.flatnonzero(status == FITTED)
    # Rows per compiled fit: a power of two (few distinct programs), <= _CHUNK_VALUES values in all.
    chunk = 1 << int(np.clip(math.log2(_CHUNK_VALUES / n), 6, 13))
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        size = min(chunk, max(64, 1 << (len(rows) - 1).bit_length()))
        xs = np.zeros((size, n), np.float32)
        ms = np.zeros((size, n), bool)
        # Each row divided by the power of two above its largest value (exact): beta and ll_gain
        # do not depend on it, delta and variance (squared units) are scaled back in float64.
        unit = np.exp2(np.ceil(np.log2(np.abs(x[rows]).max(axis=-1))))
        xs[: len(rows)], ms[: len(rows)] = x[rows] / unit[:, None], mask[rows]
        beta, delta, variance, gain, conv = jax.device_get(_fit_and_score(xs, ms, max_iters=max_iters))
        squared = unit.astype(np.float64) ** 2
        for key, value in zip(("beta", "delta", "variance", "ll_gain"), (beta, delta, variance, gain)):
            value = value[: len(rows)].astype(np.float64)
            out[key][rows] = value * squared if key in ("delta", "variance") else value
        converged[rows] = conv[: len(rows)]
    reshape = lambda a: a.reshape(lead)
    return ChannelFits(
        status=reshape(status),
        num_values=reshape(num_values),
        zero_share=reshape(zero_share.astype(np.float32)),
        beta=reshape(out["beta"]),
        delta=reshape(out["delta"]),
        variance=reshape(out["variance"]),
        ll_gain=reshape(out["ll_gain"]),
        converged=reshape(converged),
    )


def fit_together(arrays, axis: int, options) -> list[ChannelFits]:
    """`fit_channels` of each array, as one batch when their numbers of values agree (one compilation)."""
    if len({a.shape[-1] for a in arrays}) > 1:
        return [fit_channels(a, **options) for a in arrays]
    fits = fit_channels(np.concatenate(arrays, axis), **options)
    sizes = np.cumsum([a.shape[axis] for a in arrays])[:-1]
    return [ChannelFits(*parts) for parts in zip(*(np.split(field, sizes, axis) for field in fits))]


def _number(x):
    x = float(x)
    return None if math.isnan(x) else x


def summarize(fits: ChannelFits) -> dict[str, Any]:
    """Summary statistics of `fits` over all its fitted channels (JSON-serialisable; None = no fit)."""
    ok = fits.status == FITTED
    beta = fits.beta[ok]
    lo, hi = mggd.BETA_BOUNDS
    quantiles = np.quantile(beta, [0.25, 0.5, 0.75]) if beta.size else [np.nan] * 3
    return {
        "channels": int(fits.status.size),
        "fitted": int(ok.sum()),
        "all_zero": int((fits.status == ALL_ZERO).sum()),
        "too_few": int((fits.status == TOO_FEW).sum()),
        "not_converged": int((ok & ~fits.converged).sum()),
        "beta_at_bound": int(((beta <= lo * 1.0001) | (beta >= hi * 0.9999)).sum()),
        "values_per_fit_median": _number(np.median(fits.num_values[ok]) if ok.any() else np.nan),
        "beta_q25": _number(quantiles[0]),
        "beta_median": _number(quantiles[1]),
        "beta_q75": _number(quantiles[2]),
        "share_beta_below_1": _number(np.mean(beta < 1) if beta.size else np.nan),
        "ll_gain_mean": _number(np.mean(fits.ll_gain[ok]) if ok.any() else np.nan),
        "ll_gain_median": _number(np.median(fits.ll_gain[ok]) if ok.any() else np.nan),
        "zero_share": _number(np.mean(fits.zero_share)),
    }
