"""Forward / forward+backward time of every pooling head, and of a PyTorch reference 3G head.

    python -m benchmarks.bench_layers                       # batch 32, 14x14x256, table
    python -m benchmarks.bench_layers --json bench.json     # also write the results as JSON
    python -m benchmarks.bench_layers --heads 3g gap --reps 5

Each head gets a `[B, H, W, C]` float32 feature map (no channel reduction: C is the
reduced width) and runs as in training: BatchNorm with batch statistics (running
averages updated), gradients with respect to the parameters *and* the input (what the
backbone below would need), loss `sum(out * g)` with a fixed random `g`. JAX steps are
`jax.jit`-compiled; times are medians over `--reps` runs after `--warmup` runs, each
ended by `block_until_ready` (JAX) or `torch.cuda.synchronize` (PyTorch on GPU).

The PyTorch reference 3G head is assembled from `tests/reference/torch_reference.py` (the project's
implementation of the released code): three `AtMp` blocks, `cov_pool` (centring with the
M x M matrix), `sqrt_newton_schulz` differentiated by autograd, and
`tril_vec_per_sample` (vectorised one sample at a time). Our 3G head and the reference
are timed in alternation (`--reps` rounds) so that load on the machine hits both alike;
the table reports the median of the per-round ratios.

Only jax, flax, numpy and torch are imported (no TensorFlow), so this runs on a GPU
machine that has just those. On CPU, PyTorch gets `--torch-threads` (2) threads; XLA:CPU
keeps its default thread pool.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np

from benchmarks.table import print_table  # noqa: E402
from gg_jax import layers  # noqa: E402

# name -> (description, factory)
HEADS = {
    "3g": ("3G-Net (T=3, iSQRT, K=5)", lambda: layers.GeneralizedGaussianCovariance(num_blocks=3, num_iters=5)),
    "isqrt": ("iSQRT-COV (K=5)", lambda: layers.CovariancePooling(method="isqrt", num_iters=5)),
    "mpncov": ("MPN-COV (eigh)", lambda: layers.CovariancePooling(method="mpncov")),
    "cov": ("plain COV", lambda: layers.CovariancePooling(method="plain")),
    "bcnn": ("B-CNN (+BN)", lambda: layers.BilinearPooling()),
    "g2de": ("G2DeNet (eigh)", lambda: layers.GaussianEmbedding()),
    "gap": ("GAP", lambda: layers.GlobalAveragePooling()),
}


def _median_ms(times):
    return 1e3 * statistics.median(times)


def _timed(fn, sync):
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0


class JaxHead:
    """A jitted forward and a jitted forward+backward (train mode) of one head."""

    def __init__(self, module, x, seed=0):
        variables = module.init(jax.random.PRNGKey(seed), x, train=False)
        self.params = variables.get("params", {})  # parameter-free heads (iSQRT, GAP, ...) have none
        self.batch_stats = variables.get("batch_stats", {})
        self.x = x
        out_shape = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables).shape
        self.g = jax.random.normal(jax.random.PRNGKey(seed + 1), out_shape, jnp.float32)
        self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(self.params))

        def apply_train(params, batch_stats, x):
            out, updates = module.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return out, updates.get("batch_stats", {})

        def loss(params, batch_stats, x, g):
            out, new_stats = apply_train(params, batch_stats, x)
            return jnp.sum(out * g), new_stats

        self._fwd = jax.jit(apply_train)
        self._fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))

    def fwd(self):
        return self._fwd(self.params, self.batch_stats, self.x)

    def fwd_bwd(self):
        return self._fwd_bwd(self.params, self.batch_stats, self.x, self.g)

    @staticmethod
    def sync(out):
        jax.block_until_ready(out)


def make_torch_reference(batch, height, width, channels, device, seed=0):
    """The reference 3G head in PyTorch, built from `tests/reference/torch_reference.py`'s pieces."""
    import torch

    from tests.reference import torch_reference

    ref = torch_reference

    class ReferenceHead3G(torch.nn.Module):
        """AtMp1..3 -> cov_pool -> sqrt_newton_schulz (autograd) -> tril_vec_per_sample."""

        def __init__(self, dim, num_blocks=3, num_iters=5, eps=1e-7):
            super().__init__()
            self.blocks = torch.nn.ModuleList([ref.AtMp(dim) for _ in range(num_blocks)])
            self.num_iters, self.eps = num_iters, eps

        def forward(self, x):
            xh = x
            for block in self.blocks:
                xh = block(xh, x)
            s = ref.cov_pool(xh, self.eps)
            return ref.tril_vec_per_sample(ref.sqrt_newton_schulz(s, self.num_iters))

    torch.manual_seed(seed)
    head = ReferenceHead3G(channels).to(device).train()
    x = torch.randn(batch, channels, height, width, device=device, requires_grad=True)
    with torch.no_grad():
        g = torch.randn_like(head(x))
    num_params = sum(p.numel() for p in head.parameters())

    def fwd():
        with torch.no_grad():
            return head(x)

    def fwd_bwd():
        for p in head.parameters():
            p.grad = None
        x.grad = None
        out = head(x)
        out.backward(g)
        return out

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return fwd, fwd_bwd, sync, num_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--height", type=int, default=14)
    parser.add_argument("--width", type=int, default=14)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--reps", type=int, default=10, help="timed runs per head (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference head")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)

    b, h, w, c = args.batch, args.height, args.width, args.channels
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, c), jnp.float32)
    jax_device = jax.devices()[0]
    results = []

    torch_ref = None
    info = {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "jax_device": str(jax_device),
        "jax_platform": jax_device.platform,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "shape_nhwc": [b, h, w, c],
        "reps": args.reps,
        "warmup": args.warmup,
    }
    if not args.no_torch:
        import torch

        device = torch.device(args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu":
            torch.set_num_threads(args.torch_threads)
        info.update(torch=torch.__version__, torch_device=str(device), torch_threads=torch.get_num_threads())
        torch_ref = make_torch_reference(b, h, w, c, device)

    def measure(fn, sync):
        for _ in range(args.warmup):
            sync(fn())
        return [_timed(fn, sync) for _ in range(args.reps)]

    ours_3g_rounds = ref_rounds = None
    for name in args.heads:
        desc, factory = HEADS[name]
        head = JaxHead(factory(), x)
        t0 = time.perf_counter()
        head.sync(head.fwd_bwd())
        compile_s = time.perf_counter() - t0
        fwd = measure(head.fwd, head.sync)
        if name == "3g" and torch_ref is not None:
            # Alternate ours and the reference so both see the same load.
            t_fwd, t_fwd_bwd, t_sync, _ = torch_ref
            for _ in range(args.warmup):
                t_sync(t_fwd_bwd())
                head.sync(head.fwd_bwd())
            ours_3g_rounds, ref_rounds = [], []
            for _ in range(args.reps):
                ours_3g_rounds.append(_timed(head.fwd_bwd, head.sync))
                ref_rounds.append(_timed(t_fwd_bwd, t_sync))
            fwd_bwd = ours_3g_rounds
        else:
            fwd_bwd = measure(head.fwd_bwd, head.sync)
        results.append(
            dict(
                head=name,
                description=desc,
                framework="jax",
                params=head.num_params,
                out_dim=int(head.g.shape[-1]),
                fwd_ms=_median_ms(fwd),
                fwd_bwd_ms=_median_ms(fwd_bwd),
                fwd_bwd_min_ms=1e3 * min(fwd_bwd),
                first_call_s=compile_s,
            )
        )
        print(
            f"  {name}: fwd {results[-1]['fwd_ms']:.1f} ms, fwd+bwd {results[-1]['fwd_bwd_ms']:.1f} ms", file=sys.stderr
        )

    ratio = None
    if torch_ref is not None:
        t_fwd, t_fwd_bwd, t_sync, t_params = torch_ref
        if ref_rounds is None:
            ref_rounds = measure(t_fwd_bwd, t_sync)
        t_fwd_times = measure(t_fwd, t_sync)
        results.append(
            dict(
                head="3g_torch_reference",
                description="PyTorch reference 3G head",
                framework="torch",
                params=t_params,
                out_dim=c * (c + 1) // 2,
                fwd_ms=_median_ms(t_fwd_times),
                fwd_bwd_ms=_median_ms(ref_rounds),
                fwd_bwd_min_ms=1e3 * min(ref_rounds),
                first_call_s=None,
            )
        )
        if ours_3g_rounds is not None:
            per_round = [o / r for o, r in zip(ours_3g_rounds, ref_rounds)]
            ratio = dict(
                ours_over_reference_fwd_bwd=statistics.median(per_round),
                ours_over_reference_fwd_bwd_of_medians=_median_ms(ours_3g_rounds) / _median_ms(ref_rounds),
                speedup=1.0 / statistics.median(per_round),
            )

    print(
        f"batch {b}, {h}x{w}x{c}, jax {jax.__version__} on {jax_device.platform}"
        + (f", torch {info['torch']} on {info['torch_device']} ({info['torch_threads']} threads)" if torch_ref else "")
    )
    print_table(results, "head framework params out_dim fwd_ms fwd_bwd_ms", params=",", fwd_ms=".1f", fwd_bwd_ms=".1f")
    if ratio:
        print(
            f"3G head fwd+bwd, ours / reference = {ratio['ours_over_reference_fwd_bwd']:.3f} "
            f"(median of {args.reps} alternating rounds; speed-up {ratio['speedup']:.2f}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=results, ratio=ratio), f, indent=2)
    return dict(info=info, results=results, ratio=ratio)


if __name__ == "__main__":
    main()
