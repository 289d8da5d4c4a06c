#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one command (one H100/H200 lease runs it all):
#
#   bash benchmarks/gpu.sh [OUTDIR]          # default OUTDIR: ./bench_gpu_results
#
# Needs jax (CUDA), flax, optax, numpy and torch (CUDA); no tensorflow. Writes one JSON per
# benchmark into OUTDIR and prints the tables. Train step: resnet50_3g / resnet101_3g /
# resnet50_isqrt / resnet50_gap in bf16 and float32 against the PyTorch reference with its
# best GPU settings (bf16 autocast, channels_last), plus the 3G head's share of the step.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# --no_keep_freed_memory: that glibc setting is for CPU steps; on a GPU both frameworks
# already keep device memory in their own caching allocators.
python benchmarks/bench_train_step.py --models resnet50_3g,resnet50_isqrt,resnet50_gap \
    --dtypes bfloat16 --batch_sizes 128,256 --steps 20 --warmup 5 --head_share --no_keep_freed_memory --json "$out/train_step_r50_bf16.json"
python benchmarks/bench_train_step.py --models resnet101_3g,resnet50_3g \
    --dtypes float32 --batch_sizes 128 --steps 10 --warmup 3 --no_keep_freed_memory --json "$out/train_step_f32.json"
python benchmarks/bench_train_step.py --models resnet101_3g \
    --dtypes bfloat16 --batch_sizes 128 --steps 10 --warmup 3 --head_share --no_keep_freed_memory --json "$out/train_step_r101_bf16.json"
python benchmarks/bench_layers.py --json "$out/layers.json"
python benchmarks/bench_ops.py --json "$out/ops.json"
python benchmarks/bench_memory.py --json "$out/memory.json"
