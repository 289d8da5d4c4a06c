"""Pure matrix functions behind global covariance pooling and 3G-Net.

Every function here takes batched arrays (`[..., N, C]` features or `[..., C, C]`
matrices) and computes in float32 whatever the input dtype: narrower inputs (bf16,
float16) are upcast; float64 input (with `jax_enable_x64`) stays float64, so the
functions can be checked against float64 references and with
`jax.test_util.check_grads`. All functions are `jit`/`vmap`/`grad` friendly.

Every function that multiplies matrices takes `matmul_precision`, the algorithm of its
float32 products (forward and backward), one of `MATMUL_PRECISIONS`:

  "highest"  `jax.lax.Precision.HIGHEST`: float32 products (on TPUs: 6 bf16 passes);
  "bf16_6x"  `DotAlgorithmPreset.BF16_BF16_F32_X6`: operands split into 3 bf16 pieces,
             6 bf16 products accumulated in float32;
  "tf32_3x"  `DotAlgorithmPreset.TF32_TF32_F32_X3`: 2 TF32 pieces, 3 TF32 products;
  "auto"     (default) `default_matmul_precision(platform)` for the platform of the
             default backend, resolved when the function is traced.

All of them are float32-accurate: the errors of the root, the whole head and their
gradients against float64 stay within 2x of float32 HIGHEST's. A single-pass bf16/TF32
product (what default precision gives on TPUs and GPUs) is not: Newton-Schulz iterations
drift with it, so it is not offered.
XLA:CPU computes every float32 product in float32 (and rejects the TF32 presets), so on
CPU every setting runs as "highest"; float64 products are always float64.

Equation numbers refer to Wang et al., "Deep Global Generalized Gaussian Networks",
CVPR 2019 ("the paper"); "reference" means the released PyTorch implementation as
described in the project's reference notes.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
COMPUTE_DTYPE = jnp.float32

#: The float32-accurate product algorithms, by name: the `precision=` value each gives
#: every float32 product of this module on GPUs (module docstring; CPUs and TPUs run
#: HIGHEST, see `lax_precision`).
MATMUL_PRECISIONS = {
    "highest": HIGHEST,
    "bf16_6x": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    "tf32_3x": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}

#: What `matmul_precision` accepts: "auto", a name of `MATMUL_PRECISIONS`, or one of its values.
MatmulPrecision = Literal["auto", "highest", "bf16_6x", "tf32_3x"] | jax.lax.Precision | jax.lax.DotAlgorithmPreset

# What "auto" means per platform (`default_matmul_precision`). The reasoning, from the
# chips' matrix rates, and the accuracy of each setting: BENCHMARKS.md ("Head precision").
_PLATFORM_DEFAULTS = {"cpu": "highest", "tpu": "highest", "cuda": "tf32_3x", "rocm": "highest"}

__all__ = [
    "MATMUL_PRECISIONS",
    "MatmulPrecision",
    "default_matmul_precision",
    "lax_precision",
    "gram",
    "covariance",
    "scaled_covariance",
    "scale_features",
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


def default_matmul_precision(platform: str) -> str:
    """The fastest float32-accurate product setting on `platform` (what "auto" means).

    `platform`: "cpu", "tpu", "cuda", "rocm" (or "gpu", taken as "cuda"). CPUs and TPUs:
    "highest" (TPUs compute it as 6 bf16 passes already); CUDA GPUs: "tf32_3x"; ROCm and
    unknown platforms: "highest". Returns a key of `MATMUL_PRECISIONS`.
    """
    platform = {"gpu": "cuda"}.get(platform, platform)
    return _PLATFORM_DEFAULTS.get(platform, "highest")


def _default_platform() -> str:
    """The default backend's platform, with GPUs told apart: "cpu", "tpu", "cuda", "rocm", ..."""
    backend = jax.extend.backend.get_backend()
    if backend.platform == "gpu":
        return "rocm" if "rocm" in str(backend.platform_version).lower() else "cuda"
    return backend.platform


def lax_precision(matmul_precision="auto", dtype=COMPUTE_DTYPE, platform: str | None = None):
    """The `precision=` argument for a product of `dtype` arrays under `matmul_precision`.

    The one place where the product setting meets the platform. `matmul_precision` is
    "auto", a key of `MATMUL_PRECISIONS`, or one of its values (a `jax.lax.Precision` /
    `DotAlgorithmPreset`), which is used as given on every platform (e.g. to lower a GPU
    program with `jax.export` on a CPU machine). A name gives the GPU value on "cuda" and
    "rocm" (and "gpu"), `Precision.HIGHEST` on CPUs (XLA:CPU multiplies float32 exactly
    so, and rejects the TF32 presets) and on TPUs (which run HIGHEST as 6 bf16 passes and
    have no TF32); "auto" is `default_matmul_precision(platform)`. `platform` defaults to
    the default backend's, read when the caller is traced. float64 products are HIGHEST.

    Raises:
      ValueError: for anything else, listing the valid names.
    """
    if isinstance(matmul_precision, (jax.lax.Precision, jax.lax.DotAlgorithmPreset)):
        if matmul_precision not in MATMUL_PRECISIONS.values():
            raise ValueError(
                f"matmul_precision {matmul_precision!r} is not one of the float32-accurate settings "
                f"{list(MATMUL_PRECISIONS.values())} (or their names {_valid_names()})."
            )
        value = matmul_precision
    else:
        if matmul_precision != "auto" and matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"Unknown matmul_precision {matmul_precision!r}; choose one of {_valid_names()}.")
        platform = _default_platform() if platform is None else platform
        name = default_matmul_precision(platform) if matmul_precision == "auto" else matmul_precision
        value = MATMUL_PRECISIONS[name] if platform in ("cuda", "rocm", "gpu") else HIGHEST
    return HIGHEST if jnp.dtype(dtype) == jnp.float64 else value


def _valid_names():
    return ", ".join(repr(n) for n in ("auto", *MATMUL_PRECISIONS))


def _matmul_at(a, b, precision):
    return jnp.matmul(a, b, precision=precision)


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


def _check_features(x, name):
    if x.ndim < 2:
        raise ValueError(f"{name} expects features of shape [..., N, C], got shape {x.shape}.")
    if x.shape[-2] == 0:
        raise ValueError(
            f"{name} of N = 0 positions (features of shape {x.shape}) is undefined: the feature map "
            "has no spatial positions; use a larger input or a smaller total stride."
        )


def _check_square(a, name):
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{name} expects square matrices of shape [..., C, C], got shape {a.shape}.")


def _eye_like(a):
    return jnp.eye(a.shape[-1], dtype=a.dtype)


def _trace(a):
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
      matmul_precision: product setting (module docstring).

    Returns:
      `[..., C, C]` float32 (float64 for float64 input).
    """
    x = _as_f32(x)
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
      matmul_precision: product setting (module docstring).

    Returns:
      `[..., C, C]` float32 symmetric positive-definite matrices.
    """
    x = _as_f32(x)
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
      matmul_precision: product setting (module docstring).

    Returns:
      `([..., C, C] float32, unit [..., 1, 1])`; `unit` carries no gradient.
    """
    x = _as_f32(x)
    _check_features(x, "scaled_covariance")
    xc, unit = scale_features(x - jnp.mean(x, axis=-2, keepdims=True))
    return gram(xc, matmul_precision) + (eps / unit / unit) * jnp.eye(x.shape[-1], dtype=x.dtype), unit


#: `scale_features` leaves features below this magnitude as they are.
SCALE_BOUND = 2.0**16


def _pow2(k, dtype):
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
    x = _as_f32(x)
    _check_features(x, "scale_features")
    peak = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True))
    _, e = jnp.frexp(peak)  # peak = f 2^e, f in [0.5, 1)
    bound_exponent = int(np.log2(SCALE_BOUND))
    unit = _pow2(jnp.maximum(e - bound_exponent, 0), x.dtype)
    return x / unit, unit


def _newton_schulz(a, num_iters: int, want_sqrt: bool, want_inv: bool, matmul_precision):
    """Coupled Newton-Schulz iteration (paper Eqn. 10) on trace-normalised `a`.

    Returns `(Y_K, Z_K, sqrt(trace))`; `Y_K -> (a/trace)^{1/2}` and `Z_K -> (a/trace)^{-1/2}`.
    Entries not asked for are None. `Z_0 = I`, so the first step needs one matmul
    instead of three; the last `Z` (resp. `Y`) update is skipped when not asked for.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}.")
    a = _as_f32(a)
    _check_square(a, "sqrtm_newton_schulz")
    precision = lax_precision(matmul_precision, a.dtype)
    _mm = functools.partial(_matmul_at, precision=precision)
    eye = _eye_like(a)
    # tr(a) overflows float32 for entries near its maximum (~3e38): then divide by the
    # largest diagonal entry first (for other inputs `scale` is 1 and changes no bit).
    # The zero matrix (trace 0) is divided by 1: its root is 0, not 0/0.
    scale = jnp.where(
        jnp.isfinite(_trace(a)), 1.0, jnp.max(jnp.abs(jnp.diagonal(a, axis1=-2, axis2=-1)), -1)[..., None, None]
    )
    root_scale = jnp.sqrt(jnp.where(scale > 0, scale, 1.0)).astype(a.dtype)
    a = a / root_scale / root_scale  # twice by the root: 1/scale can be subnormal, flushed to 0
    norm = _trace(a)
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
      matmul_precision: product setting (module docstring).
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
      matmul_precision: product setting (module docstring).

    Returns:
      `[..., C, C]` float32 approximation of `a^{-1/2}`.
    """
    _, z, root_norm = _newton_schulz(a, num_iters, False, True, matmul_precision)
    return z / root_norm


# ---------------------------------------------------------------------------
# Matrix power by eigendecomposition (MPN-COV), with a Daleckii-Krein gradient.


def _eigh_power_forward(a, power, eps, precision):
    w, v = jnp.linalg.eigh(a, symmetrize_input=True)
    # Clamp tiny/negative eigenvalues of a PSD matrix (round-off) so the power is real;
    # jnp.maximum propagates NaN, so corrupt input is not turned into numbers.
    w = jnp.maximum(w, eps)
    fw = w**power
    out = _matmul_at(v * fw[..., None, :], jnp.swapaxes(v, -1, -2), precision)
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
    _mm = functools.partial(_matmul_at, precision=precision)
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
    a = _as_f32(a)
    _check_square(a, "sqrtm_eigh")
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
      matmul_precision: product setting (module docstring).
      unit: optional `[..., 1, 1]` powers of two: `a` is a matrix divided by `unit^2` (from
        `scaled_covariance`), and the result is the estimator of `unit^2 a`, computed as
        `unit (sqrt((c / unit)^2 I + a / lam) - (c / unit) I)` (not homogeneous in `a`). None: 1.

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
        c2 = (c * c) * _eye_like(a)
        b = b + (c2 if unit is None else c2 / unit / unit)
    if method == "newton_schulz":
        root = sqrtm_newton_schulz(b, num_iters, matmul_precision=matmul_precision, unit=unit)
    elif method == "eigh":
        root = sqrtm_eigh(b, 0.5, matmul_precision=matmul_precision)
        root = root if unit is None else root * unit
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


def gaussian_embedding_matrix(x, eps: float = 1e-7, matmul_precision="auto"):
    """G2DeNet's embedding of a Gaussian N(mu, S) as an SPD matrix.

    `[[S + mu mu^T, mu], [mu^T, 1]]`, with `S` the covariance of `x` (divided by N).

    Args:
      x: `[..., N, C]` features.
      eps: ridge of the covariance.
      matmul_precision: product setting of the covariance (module docstring).

    Returns:
      `[..., C+1, C+1]` float32 SPD matrices.
    """
    x = _as_f32(x)
    mu = jnp.mean(x, axis=-2)  # [..., C]
    s = covariance(x, eps, matmul_precision) + mu[..., :, None] * mu[..., None, :]
    top = jnp.concatenate([s, mu[..., :, None]], axis=-1)
    bottom = jnp.concatenate([mu[..., None, :], jnp.ones(mu.shape[:-1] + (1, 1), mu.dtype)], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)
