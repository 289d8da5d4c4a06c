"""Assertions and paths shared by the test modules (and the benchmarks' accuracy tables)."""

from __future__ import annotations

import functools
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
LAYOUT = DATA / "layout.json"


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|, in float64 (the error relative to the tensor's scale)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def assert_close(actual, expected, rtol: float = 1e-4, name: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected|: agreement relative to the tensor's scale."""
    err = rel_err(actual, expected)
    assert err <= rtol, f"{name}: max abs error {err:.3g} of the largest value > {rtol:g}"


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@functools.cache
def golden(arch: str) -> dict[str, np.ndarray]:
    """The tensors of tests/data/{arch}_golden.npz: the released PyTorch 3G-Net with
    `make_state_dict(arch, seed=0)` weights on `input_nchw` (NCHW, float32)."""
    with np.load(DATA / f"{arch}_golden.npz") as z:
        return {k: z[k] for k in z.files}
