"""Smoke test of a device lease, before anything is timed (`benchmarks/gpu.sh` runs it first).

    python -m benchmarks.gpu_smoke                      # on a GPU
    python -m benchmarks.gpu_smoke --platform cpu       # anywhere

Prints the versions of the stack (jax, flax, optax, torch) and what the head's "auto"
product setting resolves to; checks that JAX's default device is on `--platform`; then
trains one step of a small 3G head (bf16 features, 3 re-weighting blocks, K = 5) at each
of `--settings` (default: "auto" and every offered setting) in one compiled program, so
that a setting the device's XLA cannot compile fails here, in seconds. Exit status 0 on
success.
"""

from __future__ import annotations

import argparse
import functools


def parse_args(argv=None):
    from gg_jax import linalg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platform", default="gpu", help="the platform JAX's default device must be on")
    p.add_argument("--settings", nargs="+", default=["auto", *linalg.MATMUL_PRECISIONS])
    p.add_argument("--num_blocks", type=int, default=3, help="re-weighting blocks of the head")
    p.add_argument("--num_iters", type=int, default=5, help="Newton-Schulz iterations")
    return p.parse_args(argv)


def main(args):
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from gg_jax import layers, linalg

    try:
        import torch

        torch_info = f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
    except ImportError:
        torch_info = "no torch"
    print(
        f"jax {jax.__version__} flax {flax.__version__} optax {optax.__version__} {torch_info}, "
        f"devices {jax.devices()}",
        flush=True,
    )
    platform = jax.devices()[0].platform
    if platform != args.platform:
        raise SystemExit(f"JAX's default device is on {platform!r}, not {args.platform!r}")
    auto = linalg.default_matmul_precision(jax.default_backend())
    print(f"auto = {auto} -> {linalg.lax_precision()}", flush=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 7, 32)), jnp.bfloat16)
    heads = [
        layers.GeneralizedGaussianCovariance(
            reduction_dim=16, num_blocks=args.num_blocks, num_iters=args.num_iters, matmul_precision=s
        )
        for s in args.settings
    ]
    variables = [jax.jit(functools.partial(h.init, train=False))(jax.random.PRNGKey(0), x) for h in heads]

    def loss(params):
        total = 0.0
        for h, v, p in zip(heads, variables, params):
            out, _ = h.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])
            total = total + out.sum()
        return total

    grads = jax.jit(jax.grad(loss))([v["params"] for v in variables])
    for s, g in zip(args.settings, grads):
        if not all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(g)):
            raise SystemExit(f"non-finite gradients at matmul_precision={s!r}")
    print(f"smoke test passed ({', '.join(args.settings)})", flush=True)


if __name__ == "__main__":
    main(parse_args())
