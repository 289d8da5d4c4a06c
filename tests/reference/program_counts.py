"""Products and convolutions a JAX program executes, by kind and FLOPs, read from its jaxpr.

`count_products(fn, *args)` traces `fn` (`jax.make_jaxpr`: the program JAX lowers, one
`dot_general` / `conv_general_dilated` per HLO dot / convolution) and walks it: scan
bodies count `length` times. Each product is keyed by kind:

  "CxC"        a `[.., C, C] x [.., C, C]` product (C >= 2): Newton-Schulz iterates;
  "features"   a product contracting or producing the N positions (the covariance
               `Xc^T Xc` and its gradient `Xc G`);
  "conv"       a convolution (the 1x1 convolutions of `nn.Conv`, the GPU/TPU program);
  "other"      any other dot_general (with `gg_jax.cpu.Conv`, the 1x1 convolutions).

FLOPs: 2 x (product of the output shape) x (contracted size), for convolutions x the
kernel's input features and window. Test and benchmark code
(tests/test_precision.py, benchmarks/count_products.py).
"""

from __future__ import annotations

import collections
import math

import jax


def _dot_kind(lhs, rhs, out, dims):
    (lc, rc), _ = dims
    k = math.prod(lhs.shape[d] for d in lc)
    flops = 2 * math.prod(out.shape) * k
    square = lambda s: len(s) >= 2 and s[-1] == s[-2]  # noqa: E731
    if square(lhs.shape) and square(rhs.shape) and square(out.shape) and k == out.shape[-1]:
        return "CxC", flops
    return None, flops


def _conv_flops(lhs, rhs, out, params):
    spec = params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
    in_features = rhs.shape[spec[1]]
    window = math.prod(rhs.shape[d] for d in spec[2:])
    return 2 * math.prod(out.shape) * in_features * window


def _walk(jaxpr, mult, counts, flops, feature_sizes):
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            kind, f = _dot_kind(lhs, rhs, eqn.outvars[0].aval, eqn.params["dimension_numbers"])
            if kind is None:
                dims = set(lhs.shape) | set(rhs.shape) | set(eqn.outvars[0].aval.shape)
                kind = "features" if dims & feature_sizes else "other"
            counts[kind] += mult
            flops[kind] += mult * f
            continue
        if name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            counts["conv"] += mult
            flops["conv"] += mult * _conv_flops(lhs, rhs, eqn.outvars[0].aval, eqn.params)
            continue
        if name in ("while", "cond"):
            raise NotImplementedError(f"a {name}'s trip count or branch is not known here")
        inner = mult * eqn.params["length"] if name == "scan" else mult
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _walk(getattr(sub, "jaxpr", sub), inner, counts, flops, feature_sizes)


def count_products(fn, *args, feature_sizes=()):
    """({kind: count}, {kind: FLOPs}) of the products `fn(*args)` executes (module doc).

    `feature_sizes`: the position counts N (e.g. H*W) that mark a "features" product.
    """
    closed = jax.make_jaxpr(fn)(*args)
    counts, flops = collections.Counter(), collections.Counter()
    _walk(closed.jaxpr, 1, counts, flops, set(feature_sizes))
    return dict(counts), dict(flops)
