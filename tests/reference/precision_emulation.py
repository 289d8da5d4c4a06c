"""Float32 product algorithms emulated on CPU, and the accuracy study of the head's settings.

GPUs multiply float32 matrices faster by splitting each operand into bf16 or TF32
pieces and summing products of pieces in float32 (`jax.lax.DotAlgorithmPreset`); XLA:CPU
computes every float32 product in float32. `emulate(fn)` runs `fn` on CPU with every
float32 `dot_general` of its program (forward and backward alike) computed the way its
`precision` says, written out explicitly:

  a = a_0 + a_1 + ... (a_0 = round(a), a_1 = round(a - a_0), ...; round to bf16, or to
  TF32 = float32 with 10 explicit mantissa bits, nearest, ties away from zero, as the
  GPU's cvt.rna.tf32.f32), then sum over the algorithm's piece pairs (i, j),
  smallest terms first, of `a_i @ b_j`, each a float32 product (exact: the pieces'
  products fit float32's 24 bits) accumulated in float32.

Settings (`SETTINGS`): "highest" (float32), "bf16" / "tf32" (one pass: default
precision on TPUs / NVIDIA GPUs), "bf16_3x", "bf16_6x", "bf16_9x", "tf32_3x". The
program is traced once (`jax.make_jaxpr`) and its jaxpr evaluated with the dots replaced,
so the emulation sees exactly the products XLA would get, including those autodiff
derives. `override` re-labels precisions, e.g. `{HIGHEST: "bf16"}` runs a HIGHEST program
as if every product were a single bf16 pass (what `precision=DEFAULT` gives on a TPU).

The rest is the accuracy study shared by tests/test_precision.py and
benchmarks/bench_precision.py: input classes (`spd_matrices`, `spd_features`,
`relu_features`, the golden tensors), the computations measured (`root_case`,
`pipeline_case`, `head_case`) and `study_errors`, each setting's relative error
(Frobenius norm) of forward output and input gradient against float64.

Test and benchmark code: the package itself never emulates.
"""

from __future__ import annotations

import functools

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from tests import helpers

P = jax.lax.DotAlgorithmPreset
HIGHEST = jax.lax.Precision.HIGHEST

# name -> (piece format, number of pieces, piece pairs (i, j) summed, in this order)
SETTINGS = {
    "highest": (None, 1, ((0, 0),)),
    "bf16": ("bf16", 1, ((0, 0),)),
    "bf16_3x": ("bf16", 2, ((1, 0), (0, 1), (0, 0))),
    "bf16_6x": ("bf16", 3, ((2, 0), (1, 1), (0, 2), (1, 0), (0, 1), (0, 0))),
    "bf16_9x": ("bf16", 3, ((2, 2), (2, 1), (1, 2), (2, 0), (1, 1), (0, 2), (1, 0), (0, 1), (0, 0))),
    "tf32": ("tf32", 1, ((0, 0),)),
    "tf32_3x": ("tf32", 2, ((1, 0), (0, 1), (0, 0))),
}

# dot_general `precision` parameter -> setting. None / DEFAULT: products this study does
# not vary (the re-weighting blocks' 1x1 convolutions, in the backbone dtype), computed
# in float32 as on CPU.
PRECISION_SETTINGS = {
    None: "highest",
    (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT): "highest",
    (HIGHEST, HIGHEST): "highest",
    P.F32_F32_F32: "highest",
    P.BF16_BF16_F32: "bf16",
    P.BF16_BF16_F32_X3: "bf16_3x",
    P.BF16_BF16_F32_X6: "bf16_6x",
    P.BF16_BF16_F32_X9: "bf16_9x",
    P.TF32_TF32_F32: "tf32",
    P.TF32_TF32_F32_X3: "tf32_3x",
}

# setting -> what a GPU program carries for it (`gpu_precision`), the value `override` maps
# HIGHEST products to when the study runs a setting the package does not offer.
SETTING_PRESETS = {
    "highest": HIGHEST,
    "bf16": P.BF16_BF16_F32,
    "bf16_3x": P.BF16_BF16_F32_X3,
    "bf16_6x": P.BF16_BF16_F32_X6,
    "bf16_9x": P.BF16_BF16_F32_X9,
    "tf32": P.TF32_TF32_F32,
    "tf32_3x": P.TF32_TF32_F32_X3,
}


def round_tf32(x):
    """float32 -> nearest TF32 value (10 explicit mantissa bits), ties away from zero."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def round_bf16(x):
    """float32 -> nearest bf16 value (ties to even), as float32."""
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def split(x, fmt, pieces):
    """`x` (float32) as `pieces` float32 arrays of `fmt` values, largest first, summing to ~x."""
    rnd = {"bf16": round_bf16, "tf32": round_tf32}[fmt]
    out, rest = [], x
    for _ in range(pieces):
        piece = rnd(rest)
        out.append(piece)
        rest = rest - piece
    return out


def emulated_dot_general(lhs, rhs, dimension_numbers, setting, preferred_element_type=None):
    """`lax.dot_general` of float32 operands computed as `setting`'s split algorithm.

    The piece products are one batched float32 product (the pairs stacked on a new
    leading batch axis: one dot in the program, which keeps compilation short), summed
    in `SETTINGS` order, smallest terms first.
    """
    fmt, pieces, pairs = SETTINGS[setting]
    if fmt is None:
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=HIGHEST, preferred_element_type=jnp.float32)
    else:
        a, b = split(lhs, fmt, pieces), split(rhs, fmt, pieces)
        lhs_k = jnp.stack([a[i] for i, _ in pairs])
        rhs_k = jnp.stack([b[j] for _, j in pairs])
        (lc, rc), (lb, rb) = dimension_numbers
        shift = lambda dims: tuple(d + 1 for d in dims)  # noqa: E731
        dims = ((shift(lc), shift(rc)), ((0, *shift(lb)), (0, *shift(rb))))
        terms = jax.lax.dot_general(lhs_k, rhs_k, dims, precision=HIGHEST, preferred_element_type=jnp.float32)
        out = terms[0]
        for k in range(1, len(pairs)):
            out = out + terms[k]
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def _setting_of(precision, override):
    if precision is not None and precision in override:
        return override[precision]
    if precision not in PRECISION_SETTINGS:
        raise NotImplementedError(f"no emulation for dot_general precision {precision!r}")
    return PRECISION_SETTINGS[precision]


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval_jaxpr(jaxpr, consts, args, override):
    """Evaluate `jaxpr` with its float32 dot_generals replaced; sub-programs recursively.

    `override` holds the relabelling and, under the key "emulate", whether products are
    emulated (True) or bound with the setting's preset for the device (False).
    """
    env = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        outvals = _eval_eqn(eqn, invals, override)
        if not eqn.primitive.multiple_results:
            outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def _closed(closed_jaxpr, override):
    return lambda *args: _eval_jaxpr(closed_jaxpr.jaxpr, closed_jaxpr.consts, args, override)


def _eval_eqn(eqn, invals, override):
    name, params = eqn.primitive.name, eqn.params
    if name == "dot_general":
        lhs, rhs = invals
        precision = params["precision"]
        if lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32:
            setting = _setting_of(precision, override)
            if override["emulate"]:
                return emulated_dot_general(
                    lhs, rhs, params["dimension_numbers"], setting, params.get("preferred_element_type")
                )
            if precision in override:  # relabelled: the device's own algorithm for the setting
                return eqn.primitive.bind(lhs, rhs, **{**params, "precision": SETTING_PRESETS[setting]})
        return eqn.primitive.bind(*invals, **params)
    if name in ("pjit", "jit", "closed_call", "core_call"):
        inner = params.get("jaxpr", params.get("call_jaxpr"))
        return _closed(inner, override)(*invals)
    if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        inner = params.get("call_jaxpr", params.get("fun_jaxpr"))
        return _closed(inner, override)(*invals)
    if name in ("remat", "checkpoint"):
        return _eval_jaxpr(params["jaxpr"], (), invals, override)
    if name == "scan":
        return _eval_scan(params, invals, override)
    if name == "cond":
        index, *ops = invals
        branches = [functools.partial(lambda b, ops: _closed(b, override)(*ops), b) for b in params["branches"]]
        return jax.lax.switch(index, branches, ops)
    if name == "while":
        return _eval_while(params, invals, override)
    if any(_has_dot(j) for j in jcore.jaxprs_in_params(params)):
        raise NotImplementedError(f"emulation does not handle products inside {name!r}")
    return eqn.primitive.bind(*invals, **params)


def _has_dot(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(
        e.primitive.name == "dot_general" or any(_has_dot(j) for j in jcore.jaxprs_in_params(e.params))
        for e in jaxpr.eqns
    )


def _eval_scan(params, invals, override):
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, init, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    body = _closed(params["jaxpr"], override)

    def step(carry, x):
        out = body(*consts, *carry, *x)
        return out[:n_carry], out[n_carry:]

    carry, ys = jax.lax.scan(
        step, list(init), list(xs), length=params["length"], reverse=params["reverse"], unroll=params["unroll"]
    )
    return [*carry, *ys]


def _eval_while(params, invals, override):
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    cond, body = _closed(params["cond_jaxpr"], override), _closed(params["body_jaxpr"], override)
    return jax.lax.while_loop(lambda c: cond(*cconsts, *c)[0], lambda c: body(*bconsts, *c), list(init))


def _rewritten(fn, override, emulate_products):
    override = {**(override or {}), "emulate": emulate_products}

    def run(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval_jaxpr(closed.jaxpr, closed.consts, jax.tree.leaves(args), override)
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return run


def emulate(fn, override=None):
    """`fn` with every float32 product computed as its precision's algorithm (module doc).

    Returns a jitted function of the same arguments and output structure, compiled for
    the CPU at XLA's lowest backend optimisation level (the same arithmetic; the
    emulated programs compile 3x faster). `override`: `{precision parameter: setting}`,
    applied before the built-in mapping.
    """
    return jax.jit(_rewritten(fn, override, True), compiler_options={"xla_backend_optimization_level": 0})


def relabel(fn, override):
    """`fn` jitted with the products `override` names bound with their setting's preset
    (`SETTING_PRESETS`): the device's own split algorithm, e.g. a HIGHEST program run
    with BF16_BF16_F32_X3 products on a GPU."""
    return jax.jit(_rewritten(fn, override, False))


# --------------------------------------------------------------------------- study
#: The package's settings and the ones the study rejects, in the order tables show them.
STUDY_SETTINGS = ("highest", "bf16_6x", "tf32_3x", "bf16_9x", "bf16_3x", "bf16", "tf32")


def gpu_precision(setting):
    """(matmul_precision for the package, override for `emulate`) that run `setting`.

    Offered settings are traced as their GPU preset (so the program carries what a GPU
    gets); the others are traced as "highest" with every HIGHEST product re-labelled.
    """
    from gg_jax import linalg

    preset = SETTING_PRESETS[setting]
    if preset in linalg.MATMUL_PRECISIONS.values():
        return preset, {}
    return HIGHEST, {(HIGHEST, HIGHEST): setting}


def norm_rel_err(actual, expected):
    """||actual - expected||_F / ||expected||_F, in float64."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.linalg.norm((a - e).ravel()) / np.linalg.norm(e.ravel()))


def _orthonormal(rng, n, c):
    q, _ = np.linalg.qr(rng.standard_normal((n, c)))
    return q


def spd_matrices(rng, batch, c, cond):
    """`[batch, c, c]` SPD matrices, eigenvalues log-spaced from 1 down to 1/cond."""
    w = np.logspace(0.0, -np.log10(cond), c)
    qs = [_orthonormal(rng, c, c) for _ in range(batch)]
    return np.stack([(q * w) @ q.T for q in qs]).astype(np.float32)


def spd_features(rng, batch, n, c, cond):
    """`[batch, n, c]` features (n > c) whose covariance has eigenvalues 1 .. 1/cond (log-spaced)."""
    w = np.logspace(0.0, -np.log10(cond), c)
    ones = np.full((n, 1), 1.0 / np.sqrt(n))
    out = []
    for _ in range(batch):
        m = rng.standard_normal((n, c))
        u, _ = np.linalg.qr(m - ones @ (ones.T @ m))  # orthonormal columns, each centred
        out.append(np.sqrt(n) * (u * np.sqrt(w)) @ _orthonormal(rng, c, c).T + rng.standard_normal(c))
    return np.stack(out).astype(np.float32)


def relu_features(rng, batch, n, c):
    """`[batch, n, c]` ReLU features with n < c positions: a rank-deficient covariance
    (near-singular once the 1e-7 ridge is added), as a 7x7 map of 256 channels gives."""
    return np.maximum(rng.standard_normal((batch, n, c)), 0.0).astype(np.float32)


def root_case(matmul_precision, num_iters=5):
    """[..., C, C] SPD -> iSQRT root (K=5)."""
    from gg_jax import linalg

    return lambda a: linalg.sqrtm_newton_schulz(a, num_iters, matmul_precision=matmul_precision)


def pipeline_case(matmul_precision, num_iters=5):
    """[..., N, C] features -> covariance -> iSQRT root -> i >= j vector (the iSQRT-COV head)."""
    from gg_jax import linalg

    def fn(x):
        s = linalg.covariance(x, matmul_precision=matmul_precision)
        return linalg.triu_vector(linalg.sqrtm_newton_schulz(s, num_iters, matmul_precision=matmul_precision))

    return fn


def head_case(matmul_precision):
    """(NHWC features, variables) -> GeneralizedGaussianCovariance (T=3, K=5) in eval mode;
    convolutions and BatchNorm in the features' dtype (float64 for the reference)."""
    from gg_jax import layers

    def fn(x, variables):
        head = layers.GeneralizedGaussianCovariance(matmul_precision=matmul_precision, dtype=x.dtype)
        return head.apply(variables, x, train=False)

    return fn


def _with_gradient(fn):
    """(x, g, *args) -> (fn(x, *args), d<fn(x, *args), g>/dx). `g` and `args` (e.g. layer
    variables) are arguments: as constants XLA would fold them into the program at
    compile time, slowly."""

    def both(x, g, *args):
        out, vjp = jax.vjp(lambda x: fn(x, *args), x)
        return out, vjp(g.astype(out.dtype))[0]

    return both


def float64_reference(make_fn, x, g, args=()):
    """(output, input gradient) of `make_fn("highest")` in float64 (x64 on, on the CPU)."""
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        args64 = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
        out, grad = jax.jit(_with_gradient(make_fn("highest")))(
            np.asarray(x, np.float64), np.asarray(g, np.float64), *args64
        )
        assert out.dtype == jnp.float64
        return np.asarray(out), np.asarray(grad)


def run_setting(make_fn, x, g, setting, emulated=True, args=()):
    """(output, input gradient) of `make_fn` at `setting` on float32 `x`, cotangent `g`:
    emulated on the CPU, or (`emulated=False`) with the device's own products."""
    mp, override = gpu_precision(setting)
    fn = _with_gradient(make_fn(mp))
    if emulated:
        fn = emulate(fn, override)
    else:
        fn = relabel(fn, override) if override else jax.jit(fn)
    args = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), args)
    out, grad = fn(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32), *args)
    return np.asarray(out), np.asarray(grad)


def measure(make_fn, x, g, settings=STUDY_SETTINGS, ref=None, emulated=True, classes=None, args=()):
    """{setting: (forward error, gradient error)} of `make_fn(matmul_precision)` on float32
    `x` (and `args`, not differentiated) against float64 (cotangent `g`). `classes`:
    {name: index array into the batch} to get {name: {setting: errors}} from one run of
    the stacked classes instead."""
    ref_out, ref_grad = float64_reference(make_fn, x, g, args) if ref is None else ref
    results = {name: {} for name in (classes or {"all": slice(None)})}
    for setting in settings:
        out, grad = run_setting(make_fn, x, g, setting, emulated, args)
        for name, idx in (classes or {"all": slice(None)}).items():
            results[name][setting] = (norm_rel_err(out[idx], ref_out[idx]), norm_rel_err(grad[idx], ref_grad[idx]))
    return results if classes else results["all"]


def accepted(errors, factor=2.0):
    """Settings whose forward and gradient errors are both within `factor` x "highest"'s."""
    fwd0, grad0 = errors["highest"]
    return [s for s, (f, g) in errors.items() if f <= factor * fwd0 and g <= factor * grad0]


def golden_tensors(name="resnet23_3g"):
    """The reference's tensors (`reduced` NCHW features, `covariance`, `sqrt`, ...)."""
    return helpers.golden(name)


def golden_head_variables(name="resnet23_3g"):
    """Variables of `GeneralizedGaussianCovariance()` (T=3) that produced the golden tensors
    from `reduced`: the converted reference checkpoint's re-weighting blocks."""
    from tests.reference.reference_weights import make_state_dict

    sd = make_state_dict(name, seed=0, layout=helpers.LAYOUT)
    blocks = []
    for t in (1, 2, 3):  # AtMp{t}.* -> ReweightingBlock variables (as gg_jax.convert maps them)
        b = {k[len(f"AtMp{t}.") :]: v for k, v in sd.items() if k.startswith(f"AtMp{t}.")}
        convs = sorted({k.split(".")[0] for k in b if k.endswith(".weight") and b[k].ndim == 4})
        bns = sorted({k.split(".")[0] for k in b if k.endswith(".running_mean")})
        params = {c: {"kernel": b[f"{c}.weight"].transpose(2, 3, 1, 0)} for c in convs}
        params.update({n: {"scale": b[f"{n}.weight"], "bias": b[f"{n}.bias"]} for n in bns})
        stats = {n: {"mean": b[f"{n}.running_mean"], "var": b[f"{n}.running_var"]} for n in bns}
        blocks.append({"params": params, "batch_stats": stats})
    stacked = jax.tree.map(lambda *a: np.stack(a), *blocks)
    return {col: {"reweighting": {"blocks": {"block": stacked[col]}}} for col in ("params", "batch_stats")}
