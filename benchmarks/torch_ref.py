"""Where the benchmarks find the project's PyTorch reference model.

`torch_reference()` returns the module with `ReferenceResNet3G`, `AtMp`, `cov_pool`, ...:
`gg_jax.torch_reference`, or `tests/reference/torch_reference.py` (its place if it moves
out of the installed package). Imports torch (through that module) only when called.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CANDIDATES = ("gg_jax/torch_reference.py", "tests/reference/torch_reference.py")


def torch_reference():
    """The reference module, from the first of `CANDIDATES` that exists."""
    try:
        return importlib.import_module("gg_jax.torch_reference")
    except ModuleNotFoundError as e:
        if e.name not in ("gg_jax.torch_reference",):
            raise
    path = os.path.join(ROOT, CANDIDATES[1])
    if not os.path.exists(path):
        raise ModuleNotFoundError(f"the PyTorch reference model is in none of {CANDIDATES}")
    spec = importlib.util.spec_from_file_location("gg_jax_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
