"""Single operations of a 3G-Net train step, gg_jax (XLA) vs PyTorch, forward+backward.

Explains the train-step and head comparisons of BENCHMARKS.md: for each operation the
same computation is timed in JAX (jitted, as gg_jax computes it) and in PyTorch on the
same device, with the same thread count, in the same process.

  python -m benchmarks.bench_ops --threads 2 --json ops.json

Operations (batch 4 for the ResNet-50 layers, 32 for the head's matrices):
- the 3x3 convolutions of ResNet-50's stages and the 7x7 stem (`gg_jax.cpu.conv.conv2d`,
  NHWC, as the ResNet computes them), forward and forward+backward (input and kernel
  gradients; the stem's kernel gradient only, as in training);
- a 1x1 convolution as gg_jax computes it (one matmul over all positions);
- training-mode BatchNorm (gg_jax's `blocks.batch_norm`), forward+backward;
- one batched 32x256x256 matrix product, and the 5-iteration Newton-Schulz square root
  (`gg_jax.linalg.sqrtm_newton_schulz`) forward+backward next to the reference's
  iteration written with `torch.bmm`.

Imports only jax, flax, numpy and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both frameworks (0: leave default)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--json", default="", help="write the results here")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.threads:
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from benchmarks.table import print_table  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from gg_jax import linalg  # noqa: E402
from gg_jax.backbones import blocks  # noqa: E402
from gg_jax.cpu import conv  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def median_ms(fn, reps):
    return 1e3 * median_seconds(fn, warmup=2, reps=reps)


def torch_sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def jax_pair(fwd, args, reps, wrt=None):
    """(forward ms, forward+backward ms) of `fwd(*args)` with a random cotangent.

    The forward+backward program returns the output as well as the gradients: the
    gradients of a linear operation (convolution, matrix product) do not need its output,
    and XLA would otherwise drop the forward pass from the program, while PyTorch's
    forward+backward always computes it.
    """
    out = jax.eval_shape(fwd, *args)
    g = jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype)
    f = jax.jit(fwd)

    wrt = tuple(range(len(args))) if wrt is None else wrt

    def fwd_bwd(g, *a):
        # Arguments not in `wrt`, and the cotangent `g`, stay inputs of the program (a
        # closed-over array would be a compile-time constant, and XLA would fold what
        # depends only on it).
        def of_wrt(*d):
            full = list(a)
            for i, v in zip(wrt, d):
                full[i] = v
            return fwd(*full)

        y, vjp = jax.vjp(of_wrt, *(a[i] for i in wrt))
        return y, vjp(g)

    fb = jax.jit(fwd_bwd)
    return (
        median_ms(lambda: jax.block_until_ready(f(*args)), reps),
        median_ms(lambda: jax.block_until_ready(fb(g, *args)), reps),
    )


def torch_pair(fwd, args, reps):
    with torch.no_grad():
        g = torch.randn_like(fwd(*args))

    def run_fwd():
        with torch.no_grad():
            fwd(*args)
        torch_sync()

    def run_fwd_bwd():
        for a in args:
            a.grad = None
        fwd(*args).backward(g)
        torch_sync()

    return median_ms(run_fwd, reps), median_ms(run_fwd_bwd, reps)


def conv_case(batch, size, cin, cout, k, stride, reps, input_grad=True):
    """A convolution as gg_jax's ResNet computes it (`conv.conv2d`) and in PyTorch.

    `input_grad=False` (the stem: nothing needs the image's gradient) times the kernel
    gradient alone in the backward pass, as a train step computes it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) * (2.0 / (k * k * cin)) ** 0.5).astype(np.float32)
    pad = k // 2
    xt = torch.tensor(x.transpose(0, 3, 1, 2), device=DEVICE).contiguous().requires_grad_(input_grad)
    wt = torch.tensor(w.transpose(3, 2, 0, 1), device=DEVICE).contiguous().requires_grad_(True)

    def jconv(x, w):
        return conv.conv2d(x, w, stride, ((pad, pad), (pad, pad)))

    return (
        jax_pair(jconv, (jnp.asarray(x), jnp.asarray(w)), reps, wrt=(0, 1) if input_grad else (1,)),
        torch_pair(lambda x, w: torch.nn.functional.conv2d(x, w, stride=stride, padding=pad), (xt, wt), reps),
    )


def conv1x1_case(batch, size, cin, cout, reps):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
    module = blocks.Conv1x1(cout)
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    w = np.asarray(variables["params"]["kernel"])
    xt = torch.tensor(x.transpose(0, 3, 1, 2), device=DEVICE).contiguous().requires_grad_(True)
    wt = torch.tensor(w.transpose(3, 2, 0, 1), device=DEVICE).contiguous().requires_grad_(True)
    return (
        jax_pair(lambda p, x: module.apply({"params": p}, x), (variables["params"], jnp.asarray(x)), reps),
        torch_pair(lambda x, w: torch.nn.functional.conv2d(x, w), (xt, wt), reps),
    )


def batch_norm_case(batch, size, channels, reps):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((batch, size, size, channels)) * 2 + 1).astype(np.float32)
    bn = blocks.batch_norm(True, jnp.float32)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))

    def jbn(params, x):
        return bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])[0]

    tbn = torch.nn.BatchNorm2d(channels).to(DEVICE).train()
    xt = torch.tensor(x.transpose(0, 3, 1, 2), device=DEVICE).contiguous().requires_grad_(True)
    return (jax_pair(jbn, (variables["params"], jnp.asarray(x)), reps), torch_pair(lambda x: tbn(x), (xt,), reps))


def _spd(batch, dim, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 196, dim)).astype(np.float32)
    return (np.einsum("bnc,bnd->bcd", x, x) / 196 + 1e-3 * np.eye(dim)).astype(np.float32)


def bmm_case(batch, dim, reps):
    a, b = _spd(batch, dim, 0), _spd(batch, dim, 1)
    at = torch.tensor(a, device=DEVICE).requires_grad_(True)
    bt = torch.tensor(b, device=DEVICE).requires_grad_(True)
    return (
        jax_pair(lambda a, b: jnp.matmul(a, b, precision=HIGHEST), (jnp.asarray(a), jnp.asarray(b)), reps),
        torch_pair(torch.bmm, (at, bt), reps),
    )


def torch_newton_schulz(a, num_iters):
    """The reference's iSQRT forward (pre-normalise, coupled iteration, post-compensate)."""
    n = a.diagonal(dim1=1, dim2=2).sum(-1).view(-1, 1, 1)
    eye = torch.eye(a.shape[-1], device=a.device).expand_as(a)
    y = a / n
    t = 0.5 * (3.0 * eye - y)
    z = t
    y = y.bmm(t)
    for _ in range(num_iters - 2):
        t = 0.5 * (3.0 * eye - z.bmm(y))
        y, z = y.bmm(t), t.bmm(z)
    t = 0.5 * (3.0 * eye - z.bmm(y))
    return y.bmm(t) * n.sqrt()


def newton_schulz_case(batch, dim, reps):
    a = _spd(batch, dim)
    at = torch.tensor(a, device=DEVICE).requires_grad_(True)
    return (
        jax_pair(lambda a: linalg.sqrtm_newton_schulz(a, 5), (jnp.asarray(a),), reps),
        torch_pair(lambda a: torch_newton_schulz(a, 5), (at,), reps),
    )


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [
        ("conv 3x3 56x56 64->64 (layer1)", lambda: conv_case(4, 56, 64, 64, 3, 1, args.reps)),
        ("conv 3x3 28x28 128->128 (layer2)", lambda: conv_case(4, 28, 128, 128, 3, 1, args.reps)),
        ("conv 3x3 14x14 256->256 (layer3)", lambda: conv_case(4, 14, 256, 256, 3, 1, args.reps)),
        ("conv 3x3 14x14 512->512 (layer4, 3G)", lambda: conv_case(4, 14, 512, 512, 3, 1, args.reps)),
        ("conv 7x7/2 224->112 3->64 (stem, dk only)", lambda: conv_case(4, 224, 3, 64, 7, 2, args.reps, False)),
        ("conv 1x1 56x56 64->256 (matmul)", lambda: conv1x1_case(4, 56, 64, 256, args.reps)),
        ("BatchNorm train 56x56x256", lambda: batch_norm_case(4, 56, 256, args.reps)),
        ("bmm 32x256x256", lambda: bmm_case(32, 256, args.reps)),
        ("Newton-Schulz K=5 32x256x256", lambda: newton_schulz_case(32, 256, args.reps)),
    ]
    rows = []
    for name, fn in cases:
        (jf, jfb), (tf, tfb) = fn()
        rows.append(
            {
                "op": name,
                "jax_fwd_ms": jf,
                "jax_fwd_bwd_ms": jfb,
                "torch_fwd_ms": tf,
                "torch_fwd_bwd_ms": tfb,
                "ratio_fwd_bwd": tfb / jfb,
            }
        )
        print(f"  measured {name}", flush=True)
    threads = args.threads or "default"
    print(
        f"\nSingle operations, forward and forward+backward ms, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} on {DEVICE} ({threads} threads)"
    )
    formats = {k: ".2f" for k in ("jax_fwd_ms", "torch_fwd_ms", "jax_fwd_bwd_ms", "torch_fwd_bwd_ms", "ratio_fwd_bwd")}
    print_table(rows, "op jax_fwd_ms torch_fwd_ms jax_fwd_bwd_ms torch_fwd_bwd_ms ratio_fwd_bwd", **formats)
    print("ratio = torch fwd+bwd time / jax fwd+bwd time (above 1: gg_jax faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "meta": {
                        "jax": jax.__version__,
                        "torch": torch.__version__,
                        "device": DEVICE,
                        "threads": args.threads,
                        "machine": platform.machine(),
                    },
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main(ARGS)
