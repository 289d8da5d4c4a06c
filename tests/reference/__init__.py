"""Reference material for the tests and benchmarks, not part of the installed package.

- `reference_weights`: the deterministic weight recipe of the golden files (NumPy only).
- `torch_reference`: the project's PyTorch implementation of the released 3G-Net and its
  baselines (imports torch), the oracle of the converter tests and the PyTorch side of
  the benchmarks.
Tests import it as `reference` (tests/ is on their path); benchmarks put tests/ on sys.path.
"""
