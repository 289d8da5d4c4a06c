#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one command (one H100/H200 lease runs it all):
#
#   bash benchmarks/gpu.sh [OUTDIR [SECONDS [STEP ...]]]
#
# OUTDIR defaults to ./bench_gpu_results; SECONDS 0 means no time limit; STEPs (names below,
# e.g. r50_3g_f32_128 r101_3g_bf16_128) run only those.
#
# Needs jax (CUDA), flax, optax, numpy and torch (CUDA); no tensorflow. If flax or optax is
# missing or too different there, wheels in ./.whl (see BENCHMARKS.md) are installed instead.
# Writes log.txt (everything printed) and one JSON per benchmark into OUTDIR, most important
# first, so that a lease that ends early still returns the headline figures:
#   1. resnet50_3g bf16 train step at batch 256 against the PyTorch reference with its best GPU
#      settings (bf16 autocast, channels_last, cudnn.benchmark), with the 3G head's share;
#   2. resnet50_gap / resnet50_isqrt bf16 at batch 256 (the baselines), resnet50_3g at 128;
#   3. float32 and resnet101_3g steps, the pooling heads alone (bench_layers), ops.
# (bench_memory.py is compile-only and runs on any machine: it needs no lease.)
# One configuration per process: JAX's device peak-memory counter covers a whole process.
# With SECONDS, a step is skipped when less time is left than it is expected to take, and a
# running one is stopped at the deadline (its JSON keeps the rows it finished).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_gpu_results}
budget=${2:-0}
only=" ${*:3} "
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
start=$(date +%s)

left() { if (( budget > 0 )); then echo $(( budget - ($(date +%s) - start) )); else echo 1000000; fi; }

step() {  # step NAME EXPECTED_SECONDS COMMAND...
  local name=$1 need=$2 rest
  shift 2
  rest=$(left)
  last_rc=0
  if [[ "$only" != "  " && "$only" != *" ${name%_no_triton_gemm} "* ]]; then
    return 0
  fi
  if (( rest < need )); then
    echo "== skipped $name: ${rest} s left, expected to take ${need} s" | tee -a "$log"
    return 0
  fi
  echo "== $(date -u +%T) $name (${rest} s left)" | tee -a "$log"
  timeout --kill-after=5 "$rest" "$@" 2>&1 | tee -a "$log"
  last_rc=${PIPESTATUS[0]}
  echo "== $(date -u +%T) $name: exit $last_rc" | tee -a "$log"
}

# A train step whose compilation XLA aborts (exit 134) is measured again without
# XLA:GPU's Triton GEMM fusion, and the log says so.
train() {  # train NAME EXPECTED_SECONDS BENCH_TRAIN_STEP_ARGS...
  local name=$1 need=$2
  shift 2
  step "$name" "$need" "$py" benchmarks/bench_train_step.py --no_keep_freed_memory "$@"
  if (( last_rc == 134 )); then
    step "${name}_no_triton_gemm" "$need" "$py" benchmarks/bench_train_step.py --no_keep_freed_memory \
      --xla_flags=--xla_gpu_enable_triton_gemm=false "$@"
  fi
}

smoke() {  # the stack imports, sees the GPU, and a 3G head trains one step there
  $py - <<'EOF'
import os, jax, jax.numpy as jnp, flax, optax, numpy as np, torch
from gg_jax import layers
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "torch", torch.__version__, "devices", jax.devices(), "cuda", torch.cuda.is_available(), flush=True)
assert jax.devices()[0].platform == os.environ.get("GG_JAX_SMOKE_PLATFORM", "gpu"), "JAX does not see the GPU"
head = layers.GeneralizedGaussianCovariance(reduction_dim=16, num_blocks=3, num_iters=5)
x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 7, 32)), jnp.bfloat16)
v = head.init(jax.random.PRNGKey(0), x, train=False)
def loss(p):
    out, _ = head.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
    return out.sum()
g = jax.jit(jax.grad(loss))(v["params"])
assert all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(g))
print("smoke test passed", flush=True)
EOF
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; date -u; } 2>&1 | tee -a "$log"
if ! smoke 2>&1 | tee -a "$log"; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels (.whl) and trying again" | tee -a "$log"
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gg_jax_site .whl/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH=/tmp/gg_jax_site${PYTHONPATH:+:$PYTHONPATH}
    smoke 2>&1 | tee -a "$log" || { echo "== smoke test failed: see $log" | tee -a "$log"; exit 1; }
  else
    echo "== smoke test failed and no wheels in .whl: see $log" | tee -a "$log"
    exit 1
  fi
fi

# --no_keep_freed_memory (in train): that glibc setting is for CPU steps; on a GPU both
# frameworks keep device memory in their own caching allocators.
train r50_3g_bf16_256 90 --models resnet50_3g --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --head_share --json "$out/train_r50_3g_bf16.json"
train r50_gap_bf16_256 70 --models resnet50_gap --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --json "$out/train_r50_gap_bf16.json"
train r50_isqrt_bf16_256 70 --models resnet50_isqrt --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --json "$out/train_r50_isqrt_bf16.json"
train r50_3g_bf16_128 70 --models resnet50_3g --dtypes bfloat16 --batch_sizes 128 --steps 20 --warmup 5 \
  --head_share --json "$out/train_r50_3g_bf16_128.json"
train r50_3g_f32_128 80 --models resnet50_3g --dtypes float32 --batch_sizes 128 --steps 10 --warmup 3 \
  --json "$out/train_r50_3g_f32.json"
train r101_3g_bf16_128 100 --models resnet101_3g --dtypes bfloat16 --batch_sizes 128 --steps 10 --warmup 3 \
  --head_share --json "$out/train_r101_3g_bf16.json"
# The 3G and iSQRT heads and the reference (every head: 2 minutes of compilation on an H200).
step layers_128 40 "$py" benchmarks/bench_layers.py --batch 128 --reps 20 --heads 3g isqrt --json "$out/layers.json"
step ops 40 "$py" benchmarks/bench_ops.py  # table in log.txt (a device call returns at most 8 files)
echo "== $(date -u +%T) done, $(( $(date +%s) - start )) s" | tee -a "$log"
