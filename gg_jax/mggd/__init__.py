"""Zero-mean multivariate generalized Gaussian distributions (MGGD): density, sampling, fitting.

The distribution of the paper's Eqn. (1), in the parametrisation of Pascal, Bombrun,
Tourneret and Berthoumieu, "Parameter estimation for multivariate generalized Gaussian
distributions", IEEE TSP 2013 (the paper's [33]; their `M, m, beta` are our
`sigma, delta**beta, beta`):

    p(x) = Gamma(d/2) beta / (pi^{d/2} Gamma(d/(2 beta)) 2^{d/(2 beta)} delta^{d/2} |Sigma|^{1/2})
           * exp(-(x^T Sigma^{-1} x)^beta / (2 delta^beta)),

for `x` in R^d, shape `beta > 0` (1: Gaussian with covariance `delta * Sigma`; 1/2: Laplace-like;
below 1: heavier tails than a Gaussian), scale `delta > 0` and scatter `Sigma`, normalised to
`trace(Sigma) = d` so that `(Sigma, beta, delta)` is unique. `d = 1` is the univariate
generalized Gaussian (`Sigma = [[1]]`), with the same code.

`fit` is the maximum-likelihood estimator of [33] that the 3G layer's re-weighting blocks
approximate: the fixed point of the paper's Eqn. (3) for the scatter, Newton-Raphson on the
profile-likelihood equation (Eqn. (4); [33] Eqn. (13)) for the shape, the closed form for
the scale. Everything is pure JAX, batched over leading axes and `jit`/`vmap` friendly;
float64 input stays float64 (under `jax.enable_x64`), anything else is computed in float32,
and every matrix product runs at `precision=HIGHEST` (see `gg_jax.linalg`), except in
`reweighted_covariance`, the 3G head's exact re-weighting, which takes the head's
`matmul_precision`.
"""

from __future__ import annotations

from gg_jax.mggd.distribution import MGGD, covariance, log_prob, sample
from gg_jax.mggd.fit import BETA_BOUNDS, FitDataError, FitInfo, fit, fit_with_info, profile_score
from gg_jax.mggd.reweighting import reweighted_covariance

__all__ = [
    "MGGD",
    "FitInfo",
    "FitDataError",
    "BETA_BOUNDS",
    "log_prob",
    "sample",
    "covariance",
    "fit",
    "fit_with_info",
    "profile_score",
    "reweighted_covariance",
]
