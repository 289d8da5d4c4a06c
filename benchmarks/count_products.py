"""Matrix products, convolutions and their FLOPs in one train step of a pooling head.

    python -m benchmarks.count_products                      # resnet50_3g's head, batch 256
    python -m benchmarks.count_products --heads 3g isqrt --batch 256 --json counts.json

The head as the models build it (1x1 reduction 2048 -> 256, BatchNorm, ReLU; 3G: three
re-weighting blocks; covariance; iSQRT, K = 5; vector) on a `layer4`-shaped bf16 input
(28 x 28 x 2048 at 224 pixels), forward then backward for its parameters and input
(`jax.value_and_grad`, BatchNorm in train mode), traced, not run (abstract shapes: any
size, any machine), with the heads' default `nn.Conv` (the GPU/TPU program). Counted from
the program's jaxpr (`tests/reference/program_counts.py`, scan bodies times their length):
products of 256 x 256 matrices ("CxC"), products over the 784 positions ("features": the
covariance and its gradient), convolutions ("conv"), with GFLOPs, for the forward pass
alone and for forward + backward.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gg_jax import layers  # noqa: E402
from tests.reference.program_counts import count_products  # noqa: E402

HEADS = {
    "3g": lambda dtype: layers.GeneralizedGaussianCovariance(reduction_dim=256, num_blocks=3, num_iters=5, dtype=dtype),
    "isqrt": lambda dtype: layers.CovariancePooling(method="isqrt", reduction_dim=256, num_iters=5, dtype=dtype),
}
KINDS = ("CxC", "features", "conv", "other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=["3g"], choices=sorted(HEADS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=28, help="height = width of the layer4 map")
    p.add_argument("--channels", type=int, default=2048, help="layer4 channels")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def head_counts(name, args):
    head = HEADS[name](jnp.bfloat16)
    x = jax.ShapeDtypeStruct((args.batch, args.size, args.size, args.channels), jnp.bfloat16)
    variables = jax.eval_shape(functools.partial(head.init, train=False), jax.random.PRNGKey(0), x)
    params, stats = variables["params"], variables.get("batch_stats", {})

    def forward(params, stats, x):
        out, _ = head.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return out

    def loss(params, stats, x, g):
        return jnp.vdot(forward(params, stats, x), g)

    g = jax.ShapeDtypeStruct(jax.eval_shape(forward, params, stats, x).shape, jnp.float32)
    n = {args.size * args.size}
    fwd = count_products(forward, params, stats, x, feature_sizes=n)
    both = count_products(jax.value_and_grad(loss, argnums=(0, 2)), params, stats, x, g, feature_sizes=n)
    return {"forward": fwd, "forward_backward": both}


def main(args):
    rows = {}
    header = f"{'head':<6}{'kind':<10}{'fwd count':>10}{'fwd GFLOP':>11}{'fwd+bwd count':>15}{'fwd+bwd GFLOP':>15}"
    print(
        f"Products per train step of the head, batch {args.batch}, {args.size}x{args.size}x{args.channels} bf16 input"
    )
    print(header)
    print("-" * len(header))
    for name in args.heads:
        rows[name] = r = head_counts(name, args)
        (fc, ff), (bc, bf) = r["forward"], r["forward_backward"]
        for kind in KINDS:
            if kind in bc:
                print(
                    f"{name:<6}{kind:<10}{fc.get(kind, 0):>10}{ff.get(kind, 0) / 1e9:>11.1f}"
                    f"{bc[kind]:>15}{bf[kind] / 1e9:>15.1f}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "size": args.size, "channels": args.channels, "heads": rows}, f, indent=2)


if __name__ == "__main__":
    main(parse_args())
