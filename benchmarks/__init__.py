"""Speed, memory and accuracy benchmarks against the PyTorch reference: run each from the
repository root as `python -m benchmarks.NAME` (BENCHMARKS.md lists the commands and results)."""
