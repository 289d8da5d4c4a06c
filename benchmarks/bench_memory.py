"""Where the activation memory of a train step goes: backbone vs covariance head vs square root.

    python -m benchmarks.bench_memory                              # resnet50_3g, batch 256, bf16
    python -m benchmarks.bench_memory --model resnet101_3g --batch_size 128 --dtype float32 --json m.json

Compile-only: XLA's `memory_analysis()` of the compiled programs gives the temporary
(activation and workspace) bytes, so this runs on any device, a 2-core CPU included,
without allocating the batch. Rows:

- the whole train-step gradient (forward + backward of the model, train-mode BatchNorm);
- the pooling head alone (reduction, re-weighting, covariance, root, vector) on a
  `layer4`-shaped input, forward + backward;
- the Newton-Schulz square root alone (`gg_jax.linalg.sqrtm_newton_schulz`) on the
  head's `[B, C, C]` covariances, forward + backward, as autodiff stores it and fully
  rematerialised: the difference is what a memory-lean custom VJP of the iteration could
  at most save.

Imports only jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from gg_jax import linalg, models  # noqa: E402


def temp_bytes(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_3g")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", help="backbone compute dtype")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    model = models.create(args.model, num_classes=1000, dtype=dtype)
    b, s = args.batch_size, args.image_size
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)), train=False))
    images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)

    # The losses contract the output with a cotangent passed as an argument: a constant
    # one (out.sum()) would let XLA constant-fold parts of the backward pass.
    def model_grad(v, x, g):
        def loss(params):
            out, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.vdot(out, g)

        return jax.grad(loss)(v["params"])

    layer4 = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]["layer4"][0],
        variables,
        images,
    )
    head = model.head.clone(dtype=dtype)
    head_vars = {"params": variables["params"].get("head", {}), "batch_stats": variables["batch_stats"].get("head", {})}

    def head_grad(v, x, g):
        def loss(params, x):
            out, _ = head.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.vdot(out, g)

        return jax.grad(loss, argnums=(0, 1))(v["params"], x)

    logits = jax.ShapeDtypeStruct((b, 1000), jnp.float32)
    head_in = jax.ShapeDtypeStruct(layer4.shape, dtype)
    head_out = jax.eval_shape(lambda v, x: head.apply(v, x, train=False), head_vars, head_in)
    rows = [
        ("train-step gradient (whole model)", temp_bytes(model_grad, variables, images, logits)),
        ("pooling head fwd+bwd", temp_bytes(head_grad, head_vars, head_in, head_out)),
    ]
    dim = getattr(head, "reduction_dim", None)
    if dim and getattr(head, "num_iters", None) and getattr(head, "estimator", True):
        mats = jax.ShapeDtypeStruct((b, dim, dim), jnp.float32)
        ns = lambda a, g: jax.vjp(lambda a: linalg.sqrtm_newton_schulz(a, head.num_iters), a)[1](g)  # noqa: E731
        rows.append((f"Newton-Schulz root fwd+bwd ({head.num_iters} iters, {dim}x{dim})", temp_bytes(ns, mats, mats)))
        # Recomputing the whole iteration in the backward pass keeps no iterate: the least
        # memory any custom VJP of the root could need.
        ns_remat = lambda a, g: jax.vjp(  # noqa: E731
            jax.checkpoint(lambda a: linalg.sqrtm_newton_schulz(a, head.num_iters)), a
        )[1](g)
        rows.append(("  the same, rematerialised (jax.checkpoint)", temp_bytes(ns_remat, mats, mats)))

    total = rows[0][1]
    print(f"\nXLA temporary memory, {args.model}, batch {b}, {s}x{s}, {args.dtype}, on {jax.devices()[0].device_kind}")
    header = f"{'program':<52}{'GiB':>9}{'% of step':>11}"
    print(header)
    print("-" * len(header))
    for name, nbytes in rows:
        print(f"{name:<52}{nbytes / 2**30:>9.3f}{100 * nbytes / total:>10.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "batch_size": b,
                    "image_size": s,
                    "dtype": args.dtype,
                    "device_kind": jax.devices()[0].device_kind,
                    "rows": [{"program": n, "temp_bytes": v} for n, v in rows],
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
