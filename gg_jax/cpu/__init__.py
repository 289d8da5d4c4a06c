"""What makes the CPU demo and tests fast, in one place; nothing here runs on GPU or TPU.

- `Conv` (`conv.py`): `nn.Conv` for XLA:CPU (1x1 convolutions as matmuls, GEMM kernel
  gradients); `gg_jax.models.create` uses it when the model is built for the CPU.
- `compiler_options(platform)`: XLA options of the train step (`gg_jax.training.steps`);
  `init_compiler_options(platform)`: of one-off initialisation programs.
- `malloc.tune_for_cpu_backend()`: transparent huge pages for malloc, called by `train.py`
  and `evaluate.py` when JAX runs on the CPU only.
BENCHMARKS.md ("CPU train step", "CPU operations") has the CPU figures.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Conv", "compiler_options", "init_compiler_options"]


def __getattr__(name: str):
    # `Conv` imports jax and flax; `malloc` must stay importable before them (train.py).
    if name == "Conv":
        from gg_jax.cpu.conv import Conv

        return Conv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compiler_options(platform: str) -> dict[str, Any]:
    """XLA compiler options for a train step compiled for `platform` ('cpu', 'gpu', 'tpu', ...).

    CPU: region-analysis copy insertion, so parameters that the step donates and reads are
    updated in place instead of being copied first (the new state is bitwise the same).
    """
    if platform == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return {}


def init_compiler_options(platform: str) -> dict[str, Any] | None:
    """XLA compiler options for a program that runs once, such as a model's initialisation.

    CPU: backend optimisation level 0. Such a program is mostly random-number code that LLVM
    otherwise spends most of the compile time optimising for a single run.
    """
    if platform == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None
