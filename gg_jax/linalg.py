"""Pure matrix functions behind global covariance pooling and 3G-Net.

Every function here takes batched arrays (`[..., N, C]` features or `[..., C, C]`
matrices), casts them to float32 and multiplies with
`precision=jax.lax.Precision.HIGHEST`, whatever the input dtype: on TPUs and GPUs a
float32 matmul at default precision runs in bf16/TF32, and Newton-Schulz iterations
drift visibly when it does. Narrower inputs (bf16, float16) are upcast; float64 input
(with `jax_enable_x64`) stays float64, so the functions can be checked against float64
references and with `jax.test_util.check_grads`. All functions are `jit`/`vmap`/`grad`
friendly.

Equation numbers refer to Wang et al., "Deep Global Generalized Gaussian Networks",
CVPR 2019 ("the paper"); "reference" means the released PyTorch implementation as
described in the project's reference notes.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
COMPUTE_DTYPE = jnp.float32

__all__ = [
    "covariance",
    "sqrtm_newton_schulz",
    "inv_sqrtm_newton_schulz",
    "sqrtm_eigh",
    "regularized_sqrtm",
    "triu_vector",
    "triu_indices",
    "signed_sqrt",
    "l2_normalize",
    "gaussian_embedding_matrix",
]


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def compute_dtype(dtype):
    """float32 for every input dtype except float64, which is kept (never narrower than f32)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else COMPUTE_DTYPE


def _as_f32(x):
    """`x` as an array of at least float32 precision (see `compute_dtype`)."""
    x = jnp.asarray(x)
    dtype = compute_dtype(x.dtype)
    if x.dtype != dtype:
        x = x.astype(dtype)
    return x


def _check_square(a, name):
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} expects square matrices of shape [..., C, C], got shape {a.shape}.")


def _eye_like(a):
    return jnp.eye(a.shape[-1], dtype=a.dtype)


def _trace(a):
    """Trace over the last two axes, keeping them as [..., 1, 1] for broadcasting."""
    return jnp.trace(a, axis1=-2, axis2=-1)[..., None, None]


def covariance(x, eps: float = 1e-7):
    """Sample covariance of N feature vectors (reference step 3).

    `S = (1/N) Xc^T Xc + eps * I`, where `Xc` is `x` with its mean over the N
    positions removed (divided by N, not N-1, as the reference does).

    Args:
      x: `[..., N, C]` features (any float dtype); N positions, C channels.
      eps: ridge added to the diagonal so that S is strictly positive definite.

    Returns:
      `[..., C, C]` float32 symmetric positive-definite matrices.
    """
    x = _as_f32(x)
    if x.ndim < 2:
        raise ValueError(f"covariance expects features of shape [..., N, C], got shape {x.shape}.")
    n = x.shape[-2]
    xc = x - jnp.mean(x, axis=-2, keepdims=True)
    s = jnp.einsum("...nc,...nd->...cd", xc, xc, precision=HIGHEST) / n
    return s + eps * jnp.eye(x.shape[-1], dtype=x.dtype)


def _newton_schulz(a, num_iters: int, want_sqrt: bool, want_inv: bool):
    """Coupled Newton-Schulz iteration (paper Eqn. 10) on trace-normalised `a`.

    Returns `(Y_K, Z_K, trace)`; `Y_K -> (a/trace)^{1/2}` and `Z_K -> (a/trace)^{-1/2}`.
    Entries not asked for are None. `Z_0 = I`, so the first step needs one matmul
    instead of three; the last `Z` (resp. `Y`) update is skipped when not asked for.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}.")
    a = _as_f32(a)
    _check_square(a, "sqrtm_newton_schulz")
    eye = _eye_like(a)
    norm = _trace(a)
    y = a / norm
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
    return y, z, norm


def sqrtm_newton_schulz(a, num_iters: int = 5, return_inverse: bool = False):
    """Matrix square root by iSQRT: pre-normalised coupled Newton-Schulz (reference step 4).

    `Y_0 = a / tr(a)`, `Z_0 = I`, then `num_iters` times
    `T = (3I - Z Y)/2, Y = Y T, Z = T Z` (paper Eqn. 10, `Q_k = Y_k`, `P_k = Z_k`),
    and post-compensation `Y_K * sqrt(tr(a))`. Converges to `a^{1/2}` for SPD `a`
    (all eigenvalues of `a / tr(a)` lie in (0, 1]).

    Args:
      a: `[..., C, C]` symmetric positive (semi-)definite matrices, any float dtype.
      num_iters: K >= 1 Newton-Schulz iterations (the reference uses 5).
      return_inverse: also return the inverse root `P_K / sqrt(tr(a))`
        (i.e. `Z_K / sqrt(tr(a))`, Eqn. 10's `P_K` undone of the pre-normalisation).

    Returns:
      `[..., C, C]` float32 square root, or `(sqrt, inv_sqrt)` if `return_inverse`.
    """
    y, z, norm = _newton_schulz(a, num_iters, want_sqrt=True, want_inv=return_inverse)
    root_norm = jnp.sqrt(norm)
    sqrt = y * root_norm
    if return_inverse:
        return sqrt, z / root_norm
    return sqrt


def inv_sqrtm_newton_schulz(a, num_iters: int = 5):
    """Inverse matrix square root `a^{-1/2}` by the coupled Newton-Schulz iteration.

    Paper Eqn. 10's `P_K` (with `P_0 = I`, `Q_0 = a / tr(a)`), rescaled by
    `1/sqrt(tr(a))`; the last `Y` update is skipped since it is not used.

    Args:
      a: `[..., C, C]` SPD matrices, any float dtype.
      num_iters: K >= 1 iterations.

    Returns:
      `[..., C, C]` float32 approximation of `a^{-1/2}`.
    """
    _, z, norm = _newton_schulz(a, num_iters, want_sqrt=False, want_inv=True)
    return z / jnp.sqrt(norm)


# ---------------------------------------------------------------------------
# Matrix power by eigendecomposition (MPN-COV), with a Daleckii-Krein gradient.


def _eigh_power_forward(a, power, eps):
    w, v = jnp.linalg.eigh(a, symmetrize_input=True)
    # Clamp tiny/negative eigenvalues of a PSD matrix (round-off) so the power is real;
    # jnp.maximum propagates NaN, so corrupt input is not turned into numbers.
    w = jnp.maximum(w, eps)
    fw = w**power
    out = _mm(v * fw[..., None, :], jnp.swapaxes(v, -1, -2))
    return out, (w, v, fw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _eigh_power(a, power, eps):
    return _eigh_power_forward(a, power, eps)[0]


def _eigh_power_fwd(a, power, eps):
    out, res = _eigh_power_forward(a, power, eps)
    return out, res


def _eigh_power_bwd(power, eps, res, g):
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
    inner = _mm(_mm(vt, g_sym), v) * k
    return (_mm(_mm(v, inner), vt),)


_eigh_power.defvjp(_eigh_power_fwd, _eigh_power_bwd)


def sqrtm_eigh(a, power: float = 0.5, eps: float = 1e-12):
    """Matrix power `a^power` by eigendecomposition (MPN-COV, paper Eqn. 14).

    `a = U diag(w) U^T` -> `U diag(max(w, eps)^power) U^T`. The gradient is the
    Daleckii-Krein formula `U (K o (U^T sym(G) U)) U^T` with divided differences
    `K_ij = (w_i^p - w_j^p)/(w_i - w_j)` and `p w_i^{p-1}` on (near-)ties, so it stays
    finite when eigenvalues repeat (e.g. an identity-like covariance).

    Args:
      a: `[..., C, C]` symmetric positive semi-definite matrices, any float dtype.
      power: the matrix power (0.5 for the square root).
      eps: eigenvalues are clamped to at least this.

    Returns:
      `[..., C, C]` float32.
    """
    a = _as_f32(a)
    _check_square(a, "sqrtm_eigh")
    return _eigh_power(a, float(power), float(eps))


def regularized_sqrtm(
    a,
    lam: float,
    method: Literal["newton_schulz", "eigh"] = "newton_schulz",
    num_iters: int = 5,
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

    Returns:
      `[..., C, C]` float32.
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lam must lie in (0, 1], got {lam}.")
    a = _as_f32(a)
    _check_square(a, "regularized_sqrtm")
    c = (1.0 - lam) / lam
    b = a / lam
    if c != 0.0:
        b = b + (c * c) * _eye_like(a)
    if method == "newton_schulz":
        root = sqrtm_newton_schulz(b, num_iters)
    elif method == "eigh":
        root = sqrtm_eigh(b, 0.5)
    else:
        raise ValueError(f"method must be 'newton_schulz' or 'eigh', got {method!r}.")
    if c != 0.0:
        root = root - c * _eye_like(a)
    return root


# ---------------------------------------------------------------------------
# Vectorisation.


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
    a = _as_f32(a)
    _check_square(a, "triu_vector")
    c = a.shape[-1]
    idx = triu_indices(c, lower)
    flat = a.reshape(a.shape[:-2] + (c * c,))
    # Static, sorted, unique indices let XLA lower the backward scatter-add cheaply.
    return flat.at[..., idx].get(indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")


# ---------------------------------------------------------------------------
# Pieces of the baseline heads.


def signed_sqrt(x, eps: float = 1e-8):
    """Element-wise `sign(x) * sqrt(|x| + eps)` (B-CNN normalisation), float32.

    `eps` keeps the gradient finite at 0.
    """
    x = _as_f32(x)
    return jnp.sign(x) * jnp.sqrt(jnp.abs(x) + eps)


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """`x / max(||x||_2, eps)` along `axis`, float32."""
    x = _as_f32(x)
    # max before sqrt (same value): sqrt'(0) = inf would make the gradient 0 * inf = NaN
    # for an all-zero x (e.g. B-CNN on an all-zero feature map).
    sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq_norm, eps * eps))


def gaussian_embedding_matrix(x, eps: float = 1e-7):
    """G2DeNet's embedding of a Gaussian N(mu, S) as an SPD matrix.

    `[[S + mu mu^T, mu], [mu^T, 1]]`, with `S` the covariance of `x` (divided by N).

    Args:
      x: `[..., N, C]` features.
      eps: ridge of the covariance.

    Returns:
      `[..., C+1, C+1]` float32 SPD matrices.
    """
    x = _as_f32(x)
    mu = jnp.mean(x, axis=-2)  # [..., C]
    s = covariance(x, eps) + mu[..., :, None] * mu[..., None, :]
    top = jnp.concatenate([s, mu[..., :, None]], axis=-1)
    bottom = jnp.concatenate([mu[..., None, :], jnp.ones(mu.shape[:-1] + (1, 1), mu.dtype)], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)
