"""Full train-step throughput and memory: gg_jax vs our PyTorch reference, in one process.

A train step is forward (train-mode BatchNorm), softmax cross-entropy, backward and an
SGD-momentum update with weight decay on every parameter (the reference recipe), on
synthetic data already on the device. For each model, dtype and batch size it prints
images/s and peak device memory of gg_jax next to the PyTorch reference model
(`tests/reference/torch_reference.py`, written from the reference notes) run on the same device
with its best settings there (GPU: bf16 autocast + channels_last + cudnn.benchmark; CPU:
float32, glibc keeping freed memory for reuse, see --no_keep_freed_memory).

Imports only jax, flax, optax, numpy and torch (no tensorflow), so it runs as is on a
GPU machine:

    python benchmarks/bench_train_step.py --models resnet50_3g --batch_sizes 4 \
        --dtypes float32 --threads 2 --json /tmp/train_step.json        # the CPU target
    python benchmarks/bench_train_step.py --models resnet50_3g,resnet101_3g,resnet50_isqrt,resnet50_gap \
        --batch_sizes 64,128,256 --dtypes float32,bfloat16                # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50_3g", help="comma-separated gg_jax model names")
    p.add_argument("--batch_sizes", default="4", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (median reported)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="CPU: rounds of --steps gg_jax steps then --steps reference steps; the ratio is "
        "the median of the per-round ratios, so that load on the machine hits both alike "
        "(GPU: one round each, one framework after the other)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both frameworks (0: leave default)")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument(
        "--no_hugepages",
        action="store_true",
        help="do not re-execute with transparent huge pages for malloc (gg_jax/cpu/malloc.py; "
        "applies to both frameworks, which share the process)",
    )
    p.add_argument(
        "--no_keep_freed_memory",
        action="store_true",
        help="do not re-execute with glibc tunables that keep freed memory for reuse (one arena, no "
        "mmap, no trim; gg_jax/cpu/malloc.py KEEP_FREED_MEMORY). Kept by default, for both "
        "frameworks: PyTorch's best CPU setting (what jemalloc or tcmalloc give), its step 2-15 %% "
        "faster so; gg_jax's about 2 %% slower",
    )
    p.add_argument(
        "--head_share",
        action="store_true",
        help="also time the pooling head alone (fwd+bwd on a layer4-shaped input) and report its share",
    )
    p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for the JAX side")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


ARGS = parse_args()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from gg_jax.cpu import malloc as hugepages  # noqa: E402  (imports no jax)

# Both re-execute this script before jax and torch are loaded; the second sees the first's.
if not ARGS.no_keep_freed_memory:
    hugepages.reexec_with_tunables(*hugepages.KEEP_FREED_MEMORY)
if not ARGS.no_hugepages:
    hugepages.reexec_with_hugepages()  # what train.py does
if ARGS.threads:
    # XLA:CPU sizes its pool from the CPUs this process may use (pin with `taskset -c`);
    # torch gets the same count through set_num_threads below.
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
if ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from timing import call_times, median_seconds  # noqa: E402  (benchmarks/timing.py)

import gg_jax.cpu  # noqa: E402
from gg_jax import models  # noqa: E402

TORCH_HEADS = {"3g": "3g", "isqrt": "isqrt", "gap": "gap"}
_device_peak_taken = False  # whether a configuration of this process has reported the device peak


def bench_jax(name, batch, dtype, args):
    model = models.create(name, num_classes=args.num_classes, dtype=jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, args.image_size, args.image_size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, args.num_classes, batch), jnp.int32)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images[:1], train=False))()
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def train_step(state, images, labels):
        params, batch_stats, opt_state = state

        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, u), updates["batch_stats"], opt_state), loss

    # The options train.py compiles its step with (gg_jax.cpu.compiler_options).
    step = jax.jit(
        train_step, donate_argnums=(0,), compiler_options=gg_jax.cpu.compiler_options(jax.devices()[0].platform)
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    analysed = None
    if mem is not None:
        analysed = int(
            mem.temp_size_in_bytes
            + mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - getattr(mem, "alias_size_in_bytes", 0)
        )
    holder = {"state": state}

    def run():
        holder["state"], loss = compiled(holder["state"], images, labels)
        loss.block_until_ready()

    for _ in range(args.warmup):
        run()

    def finish(secs):
        """Results once the step time `secs` is known (memory and head share measured now)."""
        global _device_peak_taken
        # The device's peak counter cannot be reset and covers the whole process: it is this
        # configuration's peak only for the first one measured (gpu.sh runs one per process).
        stats = {} if _device_peak_taken else (jax.devices()[0].memory_stats() or {})
        _device_peak_taken = True
        peak = stats.get("peak_bytes_in_use", analysed)
        head_s = None
        if args.head_share:  # `variables` were donated to the step: use the live state.
            live = {"params": holder["state"][0], "batch_stats": holder["state"][1]}
            head_s = bench_jax_head(model, live, images, batch, args)
        return {
            "images_per_sec": batch / secs,
            "step_s": secs,
            "compile_s": compile_s,
            "peak_bytes": peak,
            "peak_source": "device" if "peak_bytes_in_use" in stats else "xla_memory_analysis",
            "head_s": head_s,
            "head_fraction": None if head_s is None else head_s / secs,
        }

    return run, finish


def bench_jax_head(model, variables, images, batch, args):
    """Forward+backward time of the model's pooling head alone (channel reduction, re-weighting,
    covariance, root, vector), on a `layer4`-shaped input in the backbone dtype: the head's
    share of the train step. Gradients for the head's parameters and its input, as in training."""
    layer4 = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]["layer4"][0],
        variables,
        images,
    )
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(layer4.shape), model.dtype)
    head = model.head(dtype=model.dtype)
    params = variables["params"].get("head", {})
    stats = variables["batch_stats"].get("head", {})
    out_shape = jax.eval_shape(lambda: head.apply({"params": params, "batch_stats": stats}, x, train=False)).shape
    g = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def loss(params, x, g):
        out, _ = head.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return jnp.vdot(out, g)

    # `g` is an argument: closed over, it would be a compile-time constant, and XLA would fold
    # the vectorisation's gradient (a [B, C*C] scatter of it) at compile time.
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(params, x, g))
    return median_seconds(lambda: jax.block_until_ready(step(params, x, g)), args.warmup, args.steps)


def bench_torch(name, batch, dtype, args):
    import torch
    from reference.torch_reference import ReferenceResNet3G

    backbone, head = models.parse_name(name)
    if head not in TORCH_HEADS:
        return None, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Under bf16 autocast the covariance head runs in float32 (as ours does): Newton-Schulz
    # in bf16 is not a setting anyone could train with.
    model = ReferenceResNet3G(
        backbone, args.num_classes, head=TORCH_HEADS[head], head_fp32=(device == "cuda" and dtype == "bfloat16")
    ).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, args.num_classes, (batch,), device=device)
    gpu = device == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # the reference training script's setting: tuned kernels per shape
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats()
    use_autocast = gpu and dtype == "bfloat16"
    if dtype == "bfloat16" and not gpu:
        return None, {"skipped": "bf16 autocast is not the reference's best setting on CPU"}

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_autocast):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        if gpu:
            torch.cuda.synchronize()

    for _ in range(args.warmup + 1):
        run()

    def finish(secs):
        peak = torch.cuda.max_memory_allocated() if gpu else None
        return {
            "images_per_sec": batch / secs,
            "step_s": secs,
            "peak_bytes": peak,
            "settings": ("bf16 autocast, " if use_autocast else "float32, ") + ("channels_last" if gpu else "NCHW"),
        }

    return run, finish


def measure(name, batch, dtype, args):
    """gg_jax and reference step times for one configuration.

    On CPU both models live side by side and the timing alternates: `--rounds` rounds of
    `--steps` gg_jax steps then `--steps` reference steps. Step times are medians over all
    timed steps, the ratio is the median of the per-round ratios. On a GPU the two run one
    after the other (both at once would not fit beside each other at large batches).
    """
    jax_run, jax_finish = bench_jax(name, batch, dtype, args)
    on_gpu = jax.devices()[0].platform != "cpu"
    if on_gpu or args.no_torch:
        jax_times = [timed_steps(jax_run, args.steps * (1 if on_gpu else args.rounds))]
        ours = jax_finish(statistics.median(jax_times[0]))
        del jax_run, jax_finish  # the last references to the JAX state: its device memory is freed
        torch_run, torch_finish = (None, None) if args.no_torch else bench_torch(name, batch, dtype, args)
        torch_times = [timed_steps(torch_run, args.steps)] if torch_run else None
    else:
        torch_run, torch_finish = bench_torch(name, batch, dtype, args)
        jax_times, torch_times = [], [] if torch_run else None
        for _ in range(args.rounds):
            jax_times.append(timed_steps(jax_run, args.steps))
            if torch_run:
                torch_times.append(timed_steps(torch_run, args.steps))
        ours = jax_finish(statistics.median([t for r in jax_times for t in r]))
    result = {"gg_jax": ours, "torch_reference": None}
    if torch_finish is not None and torch_run is None:  # skipped (e.g. bf16 on CPU)
        result["torch_reference"] = torch_finish
    elif torch_run is not None:
        ref = torch_finish(statistics.median([t for r in torch_times for t in r]))
        result["torch_reference"] = ref
        per_round = [statistics.median(t) / statistics.median(j) for j, t in zip(jax_times, torch_times)]
        result["speedup"] = statistics.median(per_round)
        result["speedup_per_round"] = per_round
    return result


def timed_steps(run, steps):
    """Times of `steps` calls of `run`, after one untimed call: the first step of a round
    shares the CPU with the other framework's worker threads, which spin for a while
    after their last task (OpenMP, XLA's pool)."""
    run()
    return call_times(run, steps)


def _fmt_mem(b):
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def main(args):
    if args.threads:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    rows = []
    print(
        f"Train step (fwd+bwd+SGD) on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}, transparent huge pages {'on' if hugepages.hugepages_enabled() else 'off'}, "
        f"glibc keeps freed memory: {'yes' if hugepages.keeps_freed_memory() else 'no'}",
        flush=True,
    )
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                row = {"model": name, "dtype": dtype, "batch": batch}
                row.update(measure(name, batch, dtype, args))
                rows.append(row)
                # Each row as soon as it is measured, and the JSON rewritten: a run cut short
                # (a device lease ending) keeps what it measured.
                print(f"  measured: {_fmt_row(row)}", flush=True)
                if args.json:
                    write_json(args, rows)
    print()
    print(HEADER)
    print("-" * len(HEADER))
    for r in rows:
        print(_fmt_row(r))
    print(
        "ratio = gg_jax images/s / reference images/s (higher is better; on CPU the median of the per-round "
        f"ratios of {args.rounds} alternating rounds); head % = the pooling head's "
        "fwd+bwd time alone / gg_jax step time (--head_share)"
    )


HEADER = (
    f"{'model':<16}{'dtype':<10}{'batch':>6}{'gg_jax img/s':>14}{'gg_jax mem':>12}{'torch img/s':>13}"
    f"{'torch mem':>11}{'ratio':>8}{'head %':>8}"
)


def _fmt_row(r):
    ref = r["torch_reference"] or {}
    return (
        f"{r['model']:<16}{r['dtype']:<10}{r['batch']:>6}{r['gg_jax']['images_per_sec']:>14.2f}"
        f"{_fmt_mem(r['gg_jax']['peak_bytes']):>12}"
        f"{ref.get('images_per_sec', float('nan')):>13.2f}{_fmt_mem(ref.get('peak_bytes')):>11}"
        f"{r.get('speedup', float('nan')):>8.2f}"
        f"{100 * (r['gg_jax']['head_fraction'] or float('nan')):>8.1f}"
    )


def write_json(args, rows):
    meta = {
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "threads": args.threads,
        "image_size": args.image_size,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "hugepages": hugepages.hugepages_enabled(),
        "keep_freed_memory": hugepages.keeps_freed_memory(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main(ARGS)
