"""The two orders of the covariance vector, and the classifier rows permuted between them.

A head's output is the C(C+1)/2 distinct entries of a symmetric C x C matrix
(`gg_jax.linalg.triu_vector`): "lower" is `S[i, j], i >= j` row-major (3G-Net and ours),
"upper" is `S[i, j], i <= j` row-major (fast-MPN-COV). Converting between them permutes the
rows of the classifier's `[C(C+1)/2, classes]` kernel.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from gg_jax import linalg
from gg_jax.convert.errors import ConversionError

ORDERS = ("lower", "upper")


def tri_size(d: int) -> int | None:
    """C with C(C+1)/2 == d, or None."""
    c = int(round((math.sqrt(8 * d + 1) - 1) / 2))
    return c if c * (c + 1) // 2 == d else None


@functools.cache
def permutation(c: int, source: str, target: str) -> np.ndarray:
    """`perm` with `target_vector = source_vector[perm]` for every symmetric c x c matrix."""

    def entry(order):  # each element's matrix entry as (max(i, j), min(i, j)): S[i, j] and S[j, i] alike
        i, j = np.divmod(linalg.triu_indices(c, lower=order == "lower").astype(np.int64), c)
        return np.maximum(i, j) * c + np.minimum(i, j)

    position = np.empty(c * c, np.int64)
    position[entry(source)] = np.arange(c * (c + 1) // 2)
    perm = position[entry(target)]
    perm.setflags(write=False)
    return perm


def reorder(rows: np.ndarray, source: str, target: str) -> np.ndarray:
    """`rows` (indexed by the vector in `source` order on axis 0) in `target` order."""
    if source == target:
        return rows
    c = tri_size(rows.shape[0])
    if c is None:
        raise ConversionError(
            f"fc has {rows.shape[0]} inputs, not C(C+1)/2 for any C; cannot reorder the covariance vector."
        )
    return np.ascontiguousarray(rows[permutation(c, source, target)])
