"""Where the benchmarks find the project's PyTorch reference model (tests/reference/).

`torch_reference()` returns the module with `ReferenceResNet3G`, `AtMp`, `cov_pool`, ...;
it imports torch only when called. The reference is test material, not part of the
installed package.
"""

from __future__ import annotations

import importlib
import os
import sys

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests")


def torch_reference():
    """`tests/reference/torch_reference.py` as a module."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    return importlib.import_module("reference.torch_reference")
