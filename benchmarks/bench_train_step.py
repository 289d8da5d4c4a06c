"""Full train-step throughput and memory: gg_jax vs our PyTorch reference, in one process.

A train step is forward (train-mode BatchNorm), softmax cross-entropy, backward and an
SGD-momentum update with weight decay on every parameter (the reference recipe), on
synthetic data already on the device. For each model, dtype and batch size it prints
images/s and peak device memory of gg_jax next to the PyTorch reference model
(`tests/reference/torch_reference.py`, written from the reference notes) run on the same device
with its best settings there (GPU: bf16 autocast + channels_last + cudnn.benchmark; CPU:
float32, glibc keeping freed memory for reuse, see --no_keep_freed_memory), eager and,
with --torch_modes, `torch.compile`d (its compilation time reported).

--matmul_precisions measures gg_jax once per head product setting ("auto", "highest",
"bf16_6x", "tf32_3x": `gg_jax.linalg`), each a row; PyTorch runs once, with the first.

Imports only jax, flax, optax, numpy and torch (no tensorflow), so it runs as is on a
GPU machine:

    python -m benchmarks.bench_train_step --models resnet50_3g --batch_sizes 4 \
        --dtypes float32 --threads 2 --json /tmp/train_step.json        # the CPU target
    python -m benchmarks.bench_train_step --models resnet50_3g,resnet101_3g,resnet50_isqrt,resnet50_gap \
        --batch_sizes 64,128,256 --dtypes float32,bfloat16                # a GPU
    python -m benchmarks.bench_train_step --models resnet50_3g --batch_sizes 256 --dtypes bfloat16 \
        --matmul_precisions auto,highest,bf16_6x --torch_modes eager --head_share   # settings (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    p.add_argument("--no_jax", action="store_true", help="measure only the PyTorch reference")
    p.add_argument(
        "--matmul_precisions",
        default="",
        help="comma-separated head product settings for gg_jax (auto, highest, bf16_6x, tf32_3x), one row "
        "each; empty: the model's default. Heads without products (gap) ignore it",
    )
    p.add_argument(
        "--torch_modes",
        default="eager",
        help="comma-separated PyTorch modes: eager, or a torch.compile mode (default, max-autotune, "
        "max-autotune-no-cudagraphs, reduce-overhead); the ratio is against the fastest",
    )
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

import gg_jax.cpu  # noqa: E402
from benchmarks.timing import call_times, median_seconds  # noqa: E402
from gg_jax import linalg, models  # noqa: E402

TORCH_HEADS = {"3g": "3g", "isqrt": "isqrt", "gap": "gap"}
_device_peak_taken = False  # whether a configuration of this process has reported the device peak


def bench_jax(name, batch, dtype, args, matmul_precision=""):
    options = {}
    if matmul_precision and "matmul_precision" in models.options(name):
        options["matmul_precision"] = matmul_precision
    model = models.create(name, num_classes=args.num_classes, dtype=jnp.dtype(dtype), **options)
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
    head = model.head.clone(dtype=model.dtype)
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


def bench_torch(name, batch, dtype, args, mode="eager"):
    import torch

    from tests.reference import torch_reference

    ReferenceResNet3G = torch_reference.ReferenceResNet3G
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
    # torch.compile the model (forward, and its backward through AOTAutograd); the optimizer
    # step stays eager, as in most training scripts.
    forward = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=use_autocast):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        opt.step()
        if gpu:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    run()  # compilation (torch.compile) and cudnn.benchmark's search
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        run()

    def finish(secs):
        peak = torch.cuda.max_memory_allocated() if gpu else None
        return {
            "images_per_sec": batch / secs,
            "step_s": secs,
            "peak_bytes": peak,
            "mode": mode,
            "first_step_s": compile_s,
            "settings": ("bf16 autocast, " if use_autocast else "float32, ")
            + ("channels_last" if gpu else "NCHW")
            + ("" if mode == "eager" else f", torch.compile mode={mode}"),
        }

    return run, finish


def measure(name, batch, dtype, args, matmul_precision="", torch_modes=("eager",)):
    """gg_jax and reference step times for one configuration.

    On CPU both models live side by side and the timing alternates: `--rounds` rounds of
    `--steps` gg_jax steps then `--steps` reference steps (the first of `torch_modes`;
    further modes are timed after). Step times are medians over all timed steps, the
    ratio is the median of the per-round ratios. On a GPU they run one after the other
    (both at once would not fit beside each other at large batches), each PyTorch mode
    in turn, and the ratio is against the fastest mode.
    """
    on_gpu = jax.devices()[0].platform != "cpu"
    result = {"gg_jax": None, "torch_reference": None, "torch": {}}
    jax_run = jax_finish = None
    if not args.no_jax:
        jax_run, jax_finish = bench_jax(name, batch, dtype, args, matmul_precision)
    modes = list(torch_modes)
    if jax_run is not None and modes and not on_gpu:  # CPU: alternate with the first mode
        torch_run, torch_finish = bench_torch(name, batch, dtype, args, modes[0])
        jax_times, torch_times = [], []
        for _ in range(args.rounds):
            jax_times.append(timed_steps(jax_run, args.steps))
            if torch_run:
                torch_times.append(timed_steps(torch_run, args.steps))
        result["gg_jax"] = jax_finish(statistics.median([t for r in jax_times for t in r]))
        if torch_run is None:
            result["torch"][modes[0]] = torch_finish  # skipped (e.g. bf16 on CPU)
        else:
            result["torch"][modes[0]] = torch_finish(statistics.median([t for r in torch_times for t in r]))
            per_round = [statistics.median(t) / statistics.median(j) for j, t in zip(jax_times, torch_times)]
            result["speedup_per_round"] = per_round
        del torch_run, torch_finish
        modes = modes[1:]
    elif jax_run is not None:
        steps = args.steps * (1 if on_gpu else args.rounds)
        result["gg_jax"] = jax_finish(statistics.median(timed_steps(jax_run, steps)))
    del jax_run, jax_finish  # the last references to the JAX state: its device memory is freed
    for mode in modes:
        torch_run, torch_finish = bench_torch(name, batch, dtype, args, mode)
        if torch_run is None:
            result["torch"][mode] = torch_finish
            continue
        result["torch"][mode] = torch_finish(statistics.median(timed_steps(torch_run, args.steps)))
        del torch_run, torch_finish
        _torch_release()
    timed = {m: r for m, r in result["torch"].items() if r and "images_per_sec" in r}
    result["torch_reference"] = result["torch"].get("eager") or next(iter(result["torch"].values()), None)
    if timed:
        best = max(timed, key=lambda m: timed[m]["images_per_sec"])
        result["torch_best_mode"] = best
        if result["gg_jax"] is not None:
            ours = result["gg_jax"]["images_per_sec"]
            result["speedup_per_mode"] = {m: ours / r["images_per_sec"] for m, r in timed.items()}
            # CPU, first mode: the median of the alternating rounds' ratios, as before.
            per_round = result.get("speedup_per_round")
            best_ratio = result["speedup_per_mode"][best]
            if per_round and best == list(torch_modes)[0]:
                best_ratio = statistics.median(per_round)
            result["speedup"] = best_ratio
    return result


def _torch_release():
    """Free PyTorch's cached device memory and reset its peak counter between modes."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


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
    torch_modes = [] if args.no_torch else [m for m in args.torch_modes.split(",") if m]
    precisions = args.matmul_precisions.split(",") if args.matmul_precisions else [""]
    if args.no_jax:
        precisions = [""]
    for name in args.models.split(","):
        # Heads without products (gap) have no setting: one row.
        settings = precisions if "matmul_precision" in models.options(name) else [""]
        for dtype in args.dtypes.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                for i, precision in enumerate(settings):
                    has_option = "matmul_precision" in models.options(name) and not args.no_jax
                    label = _precision_label(precision, has_option)
                    row = {"model": name, "dtype": dtype, "batch": batch, "matmul_precision": label}
                    # PyTorch once per configuration, with the first setting.
                    row.update(measure(name, batch, dtype, args, precision, torch_modes if i == 0 else ()))
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
        "ratio = gg_jax images/s / the fastest PyTorch mode's images/s (higher is better; on CPU the median of "
        f"the per-round ratios of {args.rounds} alternating rounds); torch: eager, compiled = the fastest "
        "torch.compile mode measured (first-step time in the JSON); head % = the pooling head's fwd+bwd time "
        "alone / gg_jax step time (--head_share)"
    )


HEADER = (
    f"{'model':<16}{'dtype':<10}{'batch':>6}{'precision':>14}{'gg_jax img/s':>14}{'gg_jax mem':>12}"
    f"{'eager img/s':>13}{'eager mem':>11}{'compiled':>10}{'comp mem':>10}{'ratio':>8}{'head %':>8}"
)


def _fmt_row(r):
    nan = float("nan")
    ours = r["gg_jax"] or {}
    eager = r["torch"].get("eager") or {}
    compiled = [v for m, v in r["torch"].items() if m != "eager" and v and "images_per_sec" in v]
    comp = max(compiled, key=lambda v: v["images_per_sec"]) if compiled else {}
    return (
        f"{r['model']:<16}{r['dtype']:<10}{r['batch']:>6}{r['matmul_precision']:>14}"
        f"{ours.get('images_per_sec', nan):>14.2f}{_fmt_mem(ours.get('peak_bytes')):>12}"
        f"{eager.get('images_per_sec', nan):>13.2f}{_fmt_mem(eager.get('peak_bytes')):>11}"
        f"{comp.get('images_per_sec', nan):>10.2f}{_fmt_mem(comp.get('peak_bytes')):>10}"
        f"{r.get('speedup', nan):>8.2f}"
        f"{100 * (ours.get('head_fraction') or nan):>8.1f}"
    )


def _precision_label(precision, has_option):
    """What the head's products ran at: "-" (no products), the setting, "auto:<setting>"."""
    if not has_option:
        return "-"
    precision = precision or "auto"  # the models' default
    if precision == "auto":
        return f"auto:{linalg.default_matmul_precision(jax.default_backend())}"
    return precision


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
