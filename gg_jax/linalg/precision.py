"""The float32 product settings (`matmul_precision`) and the compute dtype of every function
of `gg_jax.linalg`."""

from __future__ import annotations

from typing import Literal

import jax
import jax.extend.backend
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
COMPUTE_DTYPE = jnp.float32

#: The float32-accurate product algorithms, by name: the `precision=` value each gives
#: every float32 product of `gg_jax.linalg` on GPUs (its docstring; CPUs and TPUs run
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


def matmul_at(a, b, precision):
    return jnp.matmul(a, b, precision=precision)


def compute_dtype(dtype):
    """float32 for every input dtype except float64, which is kept (never narrower than f32)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else COMPUTE_DTYPE


def as_f32(x):
    """`x` as an array of at least float32 precision (see `compute_dtype`)."""
    x = jnp.asarray(x)
    dtype = compute_dtype(x.dtype)
    if x.dtype != dtype:
        x = x.astype(dtype)
    return x
