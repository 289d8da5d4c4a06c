"""The test suite. A package, so that pytest puts the repository root on the import path:
tests import `configs`, `tests.runs` (training runs) and `tests.reference` (the PyTorch
reference, golden files, the precision emulator), and benchmarks do the same when run as
`python -m benchmarks.NAME` from the repository root."""
