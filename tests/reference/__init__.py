"""Reference material shared by the tests and the benchmarks, not part of the installed package.

- `reference_weights`: the deterministic weight recipe of the golden files (NumPy only).
- `torch_reference`: the project's PyTorch implementation of the released 3G-Net and its
  baselines (imports torch), the oracle of the converter tests and the PyTorch side of
  the benchmarks.
- `precision_emulation`: reduced-precision products (bf16 / TF32 passes) emulated on the
  CPU, for the accuracy of every `matmul_precision` setting against float64.
- `program_counts`: the matrix products and convolutions of a compiled program, by kind.
Imported as `tests.reference.NAME` (pytest and `python -m benchmarks.NAME` from the
repository root put the root on the import path).
"""
