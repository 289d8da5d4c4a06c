"""Deterministic, framework-free weights laid out like a PyTorch checkpoint.

Re-implements the recipe of the reference ``reference_weights.py`` (see
``tests/data/layout.json`` and the project's reference notes) without importing it:
one ``numpy.random.default_rng(seed)``; keys visited in layout order, each drawing
in turn:

- ``num_batches_tracked``: int64 zeros (no draw);
- ``running_mean``: ``0.1 * standard_normal``;
- ``running_var``: ``uniform(0.5, 1.5)``;
- 4-d conv kernels (OIHW): ``standard_normal * sqrt(1 / fan_in)``, fan_in = I*kh*kw;
- 2-d linear weights ([out, in]): ``uniform(-1/sqrt(in), 1/sqrt(in))``;
- other ``weight`` (BN scale): ``uniform(0.5, 1.5)``;
- other ``bias`` (BN shift, linear bias): ``0.1 * standard_normal``;

all cast to float32. The golden files ``tests/data/*_golden.npz`` were produced by the
reference PyTorch model loaded with ``make_state_dict(arch, seed=0)``.

This module needs only NumPy, so torch-free tests can use it.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

DEFAULT_LAYOUT_PATH = pathlib.Path(__file__).resolve().parents[1] / "data" / "layout.json"

LayoutLike = Union[None, str, os.PathLike, Mapping, Sequence]  # noqa: UP007 (a runtime alias)


def load_layout(arch_key: str | None = None, layout: LayoutLike = None):
    """Returns the layout, a list of ``(key, shape_tuple)`` in state_dict order.

    ``layout`` may be None (``tests/data/layout.json`` of a source checkout), a path to
    a ``layout.json``-style file, a mapping ``arch_key -> [[key, shape], ...]``, or the
    list of ``(key, shape)`` pairs itself (then ``arch_key`` is ignored).
    """
    if layout is None:
        layout = DEFAULT_LAYOUT_PATH
        if not layout.exists():
            raise FileNotFoundError(
                f"{layout} not found: pass layout= (a path, a mapping or a list of "
                "(key, shape) pairs) when not running from a source checkout"
            )
    if isinstance(layout, (str, os.PathLike)):
        layout = json.loads(pathlib.Path(layout).read_text())
    if isinstance(layout, Mapping):
        if arch_key not in layout:
            raise KeyError(f"unknown arch {arch_key!r}; layout has {sorted(layout)}")
        layout = layout[arch_key]
    return [(str(key), tuple(int(d) for d in shape)) for key, shape in layout]


def make_state_dict(arch_key: str | None = None, seed: int = 0, layout: LayoutLike = None) -> dict[str, np.ndarray]:
    """Fills the layout of ``arch_key`` (e.g. ``'resnet18_3g'``) deterministically.

    Returns an ordered ``{key: np.ndarray}``; bit-identical to the reference recipe.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, shape in load_layout(arch_key, layout):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = np.zeros(shape, np.int64)
        elif leaf == "running_mean":
            out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "running_var":
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif len(shape) == 4:  # conv kernel OIHW, fan-in scale
            fan_in = shape[1] * shape[2] * shape[3]
            out[key] = (rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)).astype(np.float32)
        elif len(shape) == 2:  # linear weight [out, in]
            bound = 1.0 / np.sqrt(shape[1])
            out[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif leaf == "weight":  # batch-norm scale
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # batch-norm shift or linear bias
            out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out
