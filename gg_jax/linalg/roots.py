"""Matrix square roots: coupled Newton-Schulz (paper Eqn. 10, iSQRT-COV), the power by
eigendecomposition (MPN-COV) and the robust estimator of Theorem 1."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.extend.backend
import jax.numpy as jnp

from gg_jax.linalg.covariance import check_square, eye_like, trace
from gg_jax.linalg.precision import as_f32, lax_precision, matmul_at


def _newton_schulz(a, num_iters: int, want_sqrt: bool, want_inv: bool, matmul_precision):
    """Coupled Newton-Schulz iteration (paper Eqn. 10) on trace-normalised `a`.

    Returns `(Y_K, Z_K, sqrt(trace))`; `Y_K -> (a/trace)^{1/2}` and `Z_K -> (a/trace)^{-1/2}`.
    Entries not asked for are None. `Z_0 = I`, so the first step needs one matmul
    instead of three; the last `Z` (resp. `Y`) update is skipped when not asked for.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}.")
    a = as_f32(a)
    check_square(a, "sqrtm_newton_schulz")
    precision = lax_precision(matmul_precision, a.dtype)
    _mm = functools.partial(matmul_at, precision=precision)
    eye = eye_like(a)
    # tr(a) overflows float32 for entries near its maximum (~3e38): then divide by the
    # largest diagonal entry first (for other inputs `scale` is 1 and changes no bit).
    # The zero matrix (trace 0) is divided by 1: its root is 0, not 0/0.
    scale = jnp.where(
        jnp.isfinite(trace(a)), 1.0, jnp.max(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)), -1)[..., None, None]
    )
    root_scale = jnp.sqrt(jnp.where(scale > 0, scale, 1.0)).astype(a.dtype)
    a = a / root_scale / root_scale  # twice by the root: 1/scale can be subnormal, flushed to 0
    norm = trace(a)
    y = a / jnp.where(norm > 0, norm, 1.0)
    # k = 1 with Z_0 = I: T = (3I - Y_0)/2, Y_1 = Y_0 T, Z_1 = T.
    t = 0.5 * (3.0 * eye - y)
    z = t
    y = _mm(y, t)
    if num_iters > 1:

        def step(carry, _):
            y, z = carry
            t = 0.5 * (3.0 * eye - _mm(z, y))
            return (_mm(y, t), _mm(t, z)), None

        (y, z), _ = jax.lax.scan(step, (y, z), None, length=num_iters - 2)
        # The final step: Y_K needs Y T, Z_K needs T Z; compute only what is used.
        t = 0.5 * (3.0 * eye - _mm(z, y))
        y, z = (_mm(y, t) if want_sqrt else None), (_mm(t, z) if want_inv else None)
    return y, z, root_scale * jnp.sqrt(norm)


def sqrtm_newton_schulz(a, num_iters: int = 5, return_inverse: bool = False, matmul_precision="auto", unit=None):
    """Matrix square root by iSQRT: pre-normalised coupled Newton-Schulz (reference step 4).

    `Y_0 = a / tr(a)`, `Z_0 = I`, then `num_iters` times
    `T = (3I - Z Y)/2, Y = Y T, Z = T Z` (paper Eqn. 10, `Q_k = Y_k`, `P_k = Z_k`),
    and post-compensation `Y_K * sqrt(tr(a))`. Converges to `a^{1/2}` for SPD `a`
    (all eigenvalues of `a / tr(a)` lie in (0, 1]).

    Valid input: symmetric positive semi-definite matrices, the zero matrix (root 0) and
    entries up to float32's maximum included. For an indefinite or non-symmetric matrix the
    iteration does not converge and the result is meaningless; nothing is raised inside a
    jitted program (check doubtful inputs with `jnp.linalg.eigvalsh`).

    Args:
      a: `[..., C, C]` symmetric positive (semi-)definite matrices, any float dtype.
      num_iters: K >= 1 Newton-Schulz iterations (the reference uses 5).
      return_inverse: also return the inverse root `P_K / sqrt(tr(a))`
        (i.e. `Z_K / sqrt(tr(a))`, Eqn. 10's `P_K` undone of the pre-normalisation).
      matmul_precision: product setting (`gg_jax.linalg`).
      unit: optional `[..., 1, 1]` powers of two: `a` is a matrix divided by `unit^2` (from
        `scaled_covariance`), and the roots are those of `unit^2 a`: multiplied (the inverse
        root divided) by `unit`, in the post-compensation. None: 1.

    Returns:
      `[..., C, C]` float32 square root, or `(sqrt, inv_sqrt)` if `return_inverse`.
    """
    y, z, root_norm = _newton_schulz(a, num_iters, True, return_inverse, matmul_precision)
    if unit is not None:
        root_norm = root_norm * unit
    sqrt = y * root_norm
    if return_inverse:
        return sqrt, z / root_norm
    return sqrt


def inv_sqrtm_newton_schulz(a, num_iters: int = 5, matmul_precision="auto"):
    """Inverse matrix square root `a^{-1/2}` by the coupled Newton-Schulz iteration.

    Paper Eqn. 10's `P_K` (with `P_0 = I`, `Q_0 = a / tr(a)`), rescaled by
    `1/sqrt(tr(a))`; the last `Y` update is skipped since it is not used.

    Args:
      a: `[..., C, C]` SPD matrices, any float dtype (valid range as `sqrtm_newton_schulz`;
        a singular matrix has no inverse root: its result is not finite).
      num_iters: K >= 1 iterations.
      matmul_precision: product setting (`gg_jax.linalg`).

    Returns:
      `[..., C, C]` float32 approximation of `a^{-1/2}`.
    """
    _, z, root_norm = _newton_schulz(a, num_iters, False, True, matmul_precision)
    return z / root_norm


def _eigh_power_forward(a, power, eps, precision):
    w, v = jnp.linalg.eigh(a, symmetrize_input=True)
    # Clamp tiny/negative eigenvalues of a PSD matrix (round-off) so the power is real;
    # jnp.maximum propagates NaN, so corrupt input is not turned into numbers.
    w = jnp.maximum(w, eps)
    fw = w**power
    out = matmul_at(v * fw[..., None, :], jnp.swapaxes(v, -1, -2), precision)
    return out, (w, v, fw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _eigh_power(a, power, eps, precision):
    return _eigh_power_forward(a, power, eps, precision)[0]


def _eigh_power_fwd(a, power, eps, precision):
    out, res = _eigh_power_forward(a, power, eps, precision)
    return out, res


def _eigh_power_bwd(power, eps, precision, res, g):
    w, v, fw = res
    # Divided differences K_ij = (f(w_i) - f(w_j)) / (w_i - w_j), with the limit f'(w_i)
    # where eigenvalues (nearly) coincide: finite for repeated eigenvalues, unlike
    # differentiating through eigh's eigenvectors.
    wi, wj = w[..., :, None], w[..., None, :]
    diff = wi - wj
    scale = jnp.maximum(jnp.abs(wi), jnp.abs(wj))
    close = jnp.abs(diff) <= 1e-6 * scale
    mean_w = 0.5 * (wi + wj)
    deriv = power * mean_w ** (power - 1.0)
    safe_diff = jnp.where(close, 1.0, diff)
    k = jnp.where(close, deriv, (fw[..., :, None] - fw[..., None, :]) / safe_diff)
    vt = jnp.swapaxes(v, -1, -2)
    g_sym = 0.5 * (g + jnp.swapaxes(g, -1, -2))
    _mm = functools.partial(matmul_at, precision=precision)
    inner = _mm(_mm(vt, g_sym), v) * k
    return (_mm(_mm(v, inner), vt),)


_eigh_power.defvjp(_eigh_power_fwd, _eigh_power_bwd)


def sqrtm_eigh(a, power: float = 0.5, eps: float = 1e-12, matmul_precision="auto"):
    """Matrix power `a^power` by eigendecomposition (MPN-COV, paper Eqn. 14).

    `a = U diag(w) U^T` -> `U diag(max(w, eps)^power) U^T`. The gradient is the
    Daleckii-Krein formula `U (K o (U^T sym(G) U)) U^T` with divided differences
    `K_ij = (w_i^p - w_j^p)/(w_i - w_j)` and `p w_i^{p-1}` on (near-)ties, so it stays
    finite when eigenvalues repeat (e.g. an identity-like covariance).

    Args:
      a: `[..., C, C]` symmetric positive semi-definite matrices, any float dtype.
      power: the matrix power (0.5 for the square root).
      eps: eigenvalues are clamped to at least this.
      matmul_precision: setting of the products around the eigendecomposition (module
        docstring).

    Returns:
      `[..., C, C]` float32.
    """
    a = as_f32(a)
    check_square(a, "sqrtm_eigh")
    return _eigh_power(a, float(power), float(eps), lax_precision(matmul_precision, a.dtype))


def regularized_sqrtm(
    a,
    lam: float,
    method: Literal["newton_schulz", "eigh"] = "newton_schulz",
    num_iters: int = 5,
    matmul_precision="auto",
    unit=None,
):
    """Robust covariance estimator of the paper's Theorem 1 (Eqn. 6).

    For `a = U diag(s) U^T` the regularised MLE is `U diag(sqrt(c^2 + s/lam) - c) U^T`
    with `c = (1 - lam) / lam`, i.e. the matrix function `sqrt(c^2 I + a/lam) - c I`,
    which Newton-Schulz computes without an eigendecomposition. `lam = 1` gives `c = 0`,
    the plain square root that the paper uses in all experiments.

    `c` is as printed in Theorem 1. Setting the gradient of objective (5) with fixed
    weights to zero gives `lam S^2 + (1 - lam) S = a`, whose root has `c = (1 - lam)/(2 lam)`;
    the paper's supplementary proof is not available to settle the factor 2, so we follow
    the printed theorem (both agree at `lam = 1`, the only value the paper trains with).

    Args:
      a: `[..., C, C]` SPD matrices, any float dtype.
      lam: regularisation strength in (0, 1].
      method: "newton_schulz" (iSQRT, `num_iters` iterations) or "eigh".
      num_iters: iterations for Newton-Schulz.
      matmul_precision: product setting (`gg_jax.linalg`).
      unit: optional `[..., 1, 1]` powers of two: `a` is a matrix divided by `unit^2` (from
        `scaled_covariance`), and the result is the estimator of `unit^2 a`, computed as
        `unit (sqrt((c / unit)^2 I + a / lam) - (c / unit) I)` (not homogeneous in `a`). None: 1.

    Returns:
      `[..., C, C]` float32.
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lam must lie in (0, 1], got {lam}.")
    a = as_f32(a)
    check_square(a, "regularized_sqrtm")
    c = (1.0 - lam) / lam
    b = a / lam
    if c != 0.0:
        c2 = (c * c) * eye_like(a)
        b = b + (c2 if unit is None else c2 / unit / unit)
    if method == "newton_schulz":
        root = sqrtm_newton_schulz(b, num_iters, matmul_precision=matmul_precision, unit=unit)
    elif method == "eigh":
        root = sqrtm_eigh(b, 0.5, matmul_precision=matmul_precision)
        root = root if unit is None else root * unit
    else:
        raise ValueError(f"method must be 'newton_schulz' or 'eigh', got {method!r}.")
    if c != 0.0:
        root = root - c * eye_like(a)
    return root
