#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one command (one H100/H200 lease runs it all):
#
#   bash benchmarks/gpu.sh [OUTDIR [SECONDS [STEP ...]]]
#
# OUTDIR defaults to ./bench_gpu_results; SECONDS 0 means no time limit; STEPs (names below,
# e.g. r50_3g_f32_128 r101_3g_bf16_128) run only those. `bash benchmarks/gpu.sh OUT 450`
# fits a lease's 8-minute command (start-up included) and measures steps 1-4 (5 if time is left).
#
# Needs jax (CUDA), flax, optax, numpy and torch (CUDA, with Triton for torch.compile), and for
# the trainer step the `train` requirements (orbax, grain, array-record, simplejpeg, ...); no
# tensorflow. If the smoke test fails, wheels carried in ./.whl (`pip download --no-deps -d .whl
# PACKAGE` on a machine with the registry) are installed into /tmp/gg_jax_site and tried again.
# Writes log.txt (everything printed) and one JSON per benchmark into OUTDIR, most important
# first, so that a lease that ends early still returns the headline figures:
#   1. accuracy: every head product setting (and the rejected ones) against float64 with the
#      GPU's own products (bench_precision.py), and one batched 256x256 product timed each;
#   2. resnet50_3g bf16 train step at batch 256, gg_jax with the head's products at "auto"
#      (the GPU default) and "highest", the 3G head's share of each, and the PyTorch reference
#      in eager mode with its best GPU settings (bf16 autocast, channels_last, cudnn.benchmark);
#   3. resnet50_gap bf16 at batch 256, the backbone-only control, both frameworks;
#   4. train.py end to end on the synthetic source (bench_trainer.py): the trainer's images/s
#      beside the bare step's of 2;
#   5. the PyTorch reference torch.compile'd (default mode), resnet50_3g and resnet50_gap;
#   6. gg_jax resnet50_3g with the other offered setting (bf16_6x);
#   7. torch.compile mode max-autotune (long compilation: named, or when time is left);
#   8. resnet50_isqrt, resnet50_3g at 128, float32 and resnet101_3g steps, the pooling heads
#      alone (bench_layers), ops (named, or when time is left).
# (bench_memory.py and count_products.py are compile- or trace-only: they need no lease.)
# JAX's device peak-memory counter covers a whole process: the first configuration of a process
# reports it, later ones (a second head setting) XLA's memory analysis (the JSON says which).
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
  step "$name" "$need" "$py" -m benchmarks.bench_train_step --no_keep_freed_memory "$@"
  if (( last_rc == 134 )); then
    step "${name}_no_triton_gemm" "$need" "$py" -m benchmarks.bench_train_step --no_keep_freed_memory \
      --xla_flags=--xla_gpu_enable_triton_gemm=false "$@"
  fi
}

smoke() {  # the stack imports, sees the GPU, and a 3G head trains one step there at every setting
  $py -m benchmarks.gpu_smoke --platform "${GG_JAX_SMOKE_PLATFORM:-gpu}"
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
step accuracy 60 "$py" -m benchmarks.bench_precision --channels 256 --settings highest bf16_6x tf32_3x bf16_3x tf32 \
  --product_times --json "$out/precision.json"
train r50_3g_bf16_256 140 --models resnet50_3g --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --matmul_precisions auto,highest --torch_modes eager --head_share --json "$out/train_r50_3g_bf16.json"
train r50_gap_bf16_256 60 --models resnet50_gap --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --torch_modes eager --json "$out/train_r50_gap_bf16.json"
# The whole trainer (train.py on the synthetic source: input pipeline, metrics, one checkpoint,
# one evaluation) beside the bare step measured above.
step trainer_e2e 240 "$py" -m benchmarks.bench_trainer --workdir "$out/e2e_run" \
  --bare_json "$out/train_r50_3g_bf16.json" --json "$out/trainer.json"
# torch.compile: the reference only (--no_jax), both models in one process (PyTorch's peak
# counter is reset between them).
step torch_compile_bf16_256 150 "$py" -m benchmarks.bench_train_step --no_keep_freed_memory --no_jax \
  --models resnet50_3g,resnet50_gap --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --torch_modes default --json "$out/train_torch_compile_bf16.json"
train r50_3g_bf16_256_bf16_6x 80 --models resnet50_3g --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --matmul_precisions bf16_6x --no_torch --head_share --json "$out/train_r50_3g_bf16_6x.json"
step torch_autotune_bf16_256 300 "$py" -m benchmarks.bench_train_step --no_keep_freed_memory --no_jax \
  --models resnet50_3g,resnet50_gap --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --torch_modes max-autotune --json "$out/train_torch_autotune_bf16.json"
train r50_isqrt_bf16_256 70 --models resnet50_isqrt --dtypes bfloat16 --batch_sizes 256 --steps 20 --warmup 5 \
  --json "$out/train_r50_isqrt_bf16.json"
train r50_3g_bf16_128 70 --models resnet50_3g --dtypes bfloat16 --batch_sizes 128 --steps 20 --warmup 5 \
  --head_share --json "$out/train_r50_3g_bf16_128.json"
train r50_3g_f32_128 80 --models resnet50_3g --dtypes float32 --batch_sizes 128 --steps 10 --warmup 3 \
  --json "$out/train_r50_3g_f32.json"
train r101_3g_bf16_128 100 --models resnet101_3g --dtypes bfloat16 --batch_sizes 128 --steps 10 --warmup 3 \
  --head_share --json "$out/train_r101_3g_bf16.json"
# The 3G and iSQRT heads and the reference (every head: 2 minutes of compilation on an H200).
step layers_128 40 "$py" -m benchmarks.bench_layers --batch 128 --reps 20 --heads 3g isqrt --json "$out/layers.json"
step ops 40 "$py" -m benchmarks.bench_ops  # table in log.txt (a device call returns at most 8 files)
echo "== $(date -u +%T) done, $(( $(date +%s) - start )) s" | tee -a "$log"
