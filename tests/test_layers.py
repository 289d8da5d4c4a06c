"""gg_jax.layers: the 3G layer and the baseline pooling heads, module by module.

The golden tensors (tests/data/resnet23_3g_golden.npz) come from the released PyTorch
3G-Net loaded with `make_state_dict('resnet23_3g', seed=0)`; here only the head runs, on
the golden `reduced` features, with the `AtMp1..3` weights mapped into the layer by a
helper of this file (tests/test_models.py checks the whole model through gg_jax.convert).
Everything else uses small shapes and NumPy references of the documented computation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gg_jax import convert, cpu, layers, linalg
from gg_jax.backbones import blocks
from tests import helpers
from tests.helpers import LAYOUT, assert_close, nhwc
from tests.reference.reference_weights import make_state_dict

BN_EPS = 1e-5
CONVS = ("map1", "map2", "map21", "map3", "map4", "atmap1", "atmap2", "atmap3")
BNS = ("bn1", "bn2", "bn21", "bn3", "bn4", "bnat1")


def leaves_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ------------------------------------------------------------------------- golden head
def block_variables(state_dict, t):
    """`AtMp{t}.*` of a reference state_dict -> ReweightingBlock variables.

    OIHW conv weights -> HWIO kernels; BN weight/bias -> scale/bias;
    running_mean/var -> batch_stats mean/var.
    """
    sd = {k[len(f"AtMp{t}.") :]: v for k, v in state_dict.items() if k.startswith(f"AtMp{t}.")}
    params = {c: {"kernel": sd[f"{c}.weight"].transpose(2, 3, 1, 0)} for c in CONVS}
    stats = {}
    for b in BNS:
        params[b] = {"scale": sd[f"{b}.weight"], "bias": sd[f"{b}.bias"]}
        stats[b] = {"mean": sd[f"{b}.running_mean"], "var": sd[f"{b}.running_var"]}
    return {"params": params, "batch_stats": stats}


def stacked(blocks):
    """Per-block variables stacked on a leading axis, as `UnrolledReweighting` stores them."""
    return jax.tree.map(lambda *a: np.stack(a), *blocks)


@pytest.fixture(scope="module")
def golden():
    z = helpers.golden("resnet23_3g")
    state_dict = make_state_dict("resnet23_3g", seed=0, layout=LAYOUT)
    blocks = [block_variables(state_dict, t) for t in (1, 2, 3)]
    return dict(z), state_dict, blocks


def head_variables(blocks):
    s = stacked(blocks)
    return {
        "params": {"reweighting": {"blocks": {"block": s["params"]}}},
        "batch_stats": {"reweighting": {"blocks": {"block": s["batch_stats"]}}},
    }


def test_golden_head_reproduces_reference_intermediates(golden):
    """GeneralizedGaussianCovariance with the AtMp1..3 weights on `reduced` gives
    reweighted1..3, covariance, sqrt and vector of the released code (eval mode)."""
    z, state_dict, blocks = golden
    variables = head_variables(blocks)
    # Our mapping is the one gg_jax.convert applies to whole checkpoints.
    converted = convert.from_torch(state_dict, "resnet23_3g")
    assert leaves_equal(variables["params"]["reweighting"], converted["params"]["head"]["reweighting"])
    assert leaves_equal(variables["batch_stats"]["reweighting"], converted["batch_stats"]["head"]["reweighting"])

    head = layers.GeneralizedGaussianCovariance()  # T=3, K=5, lam=1: the released head
    assert jax.tree.map(
        np.shape,
        jax.eval_shape(
            functools.partial(head.init, train=False),
            jax.random.PRNGKey(0),
            jax.ShapeDtypeStruct((2, 7, 7, 256), jnp.float32),
        ),
    ) == jax.tree.map(np.shape, variables)
    vector, state = jax.jit(lambda v, x: head.apply(v, x, train=False, mutable=["intermediates"]))(
        variables, nhwc(z["reduced"])
    )
    it = state["intermediates"]
    reweighted = it["reweighting"]["reweighted"][0]
    assert reweighted.shape == (3, 2, 7, 7, 256)
    for t in range(3):
        assert_close(reweighted[t], nhwc(z[f"reweighted{t + 1}"]), name=f"reweighted{t + 1}")
    assert_close(it["covariance"][0], z["covariance"], name="covariance")
    assert_close(it["sqrt"][0], z["sqrt"], name="sqrt")
    assert vector.dtype == jnp.float32 and vector.shape == (2, 32896)
    assert_close(vector, z["vector"], name="vector")


def test_golden_single_blocks_and_pooling_heads(golden):
    """Each ReweightingBlock maps the golden X_{t-1} (and X) to X_t; iSQRT-COV / plain
    covariance pooling of the golden reweighted3 give the golden vector / covariance."""
    z, _, blocks = golden
    x = nhwc(z["reduced"])
    block = layers.ReweightingBlock()
    apply_block = jax.jit(lambda v, xh, x: block.apply(v, xh, x, train=False))
    previous = x
    for t in (1, 2, 3):
        out = apply_block(blocks[t - 1], previous, x)
        assert_close(out, nhwc(z[f"reweighted{t}"]), name=f"block {t}")
        previous = nhwc(z[f"reweighted{t}"])
    # Block 1 with the default second input (X = Xh).
    assert_close(block.apply(blocks[0], x, train=False), nhwc(z["reweighted1"]), name="block 1, x=None")
    x3 = nhwc(z["reweighted3"])
    isqrt = layers.CovariancePooling(method="isqrt").apply({}, x3, train=False)
    assert_close(isqrt, z["vector"], name="isqrt vector")
    plain = layers.CovariancePooling(method="plain").apply({}, x3, train=False)
    il = np.tril_indices(256)
    assert_close(plain, z["covariance"][:, il[0], il[1]], name="plain vector")


# -------------------------------------------------------------------- NumPy reference
def np_bn(v, p, s):
    return (v - s["mean"]) / np.sqrt(s["var"] + BN_EPS) * p["scale"] + p["bias"]


def np_block(p, s, xh, x, variant):
    """ReweightingBlock in eval mode, NumPy float64, as documented (paper Fig. 3 / Fig. 5)."""
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    conv = lambda name, v: v @ np.asarray(p[name]["kernel"], np.float64)[0, 0]  # noqa: E731
    bn = lambda name, v: np_bn(v, p[name], s[name])  # noqa: E731
    if variant == "3g":
        a = bn("bn1", conv("map1", xh)) * bn("bn2", conv("map2", xh))
        zz = relu(a + bn("bn21", conv("map21", x)))
        feat = relu(bn("bn3", conv("map3", zz))) * relu(bn("bn4", conv("map4", zz)))
    elif variant == "urm_v2":
        feat = bn("bn1", conv("map1", xh)) * bn("bn2", conv("map2", xh))
    else:
        feat = xh
    score = conv("atmap2", relu(bn("bnat1", conv("atmap1", feat))))
    if variant == "3g":
        score = score + conv("atmap3", score)
    return xh / (1.0 + np.exp(-score))


def randomise(variables, seed):
    """Replace every leaf by random values (BN variances positive), keeping shapes."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
    out = []
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path)
        if key.endswith("['var']") or key.endswith("['scale']"):
            out.append(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
        else:
            out.append((0.5 * rng.standard_normal(leaf.shape)).astype(np.float32))
    return jax.tree_util.tree_unflatten(tree, out)


def random_variables(module, x, seed, **kwargs):
    """Random variables of `module` for input `x` (shapes from `jax.eval_shape`: no init run)."""
    shapes = jax.eval_shape(functools.partial(module.init, train=False, **kwargs), jax.random.PRNGKey(0), x)
    return randomise(shapes, seed)


C, HW, HIDDEN = 8, 4, 4


def small_features(seed=0, batch=2, c=C):
    return np.random.default_rng(seed).standard_normal((batch, HW, HW, c)).astype(np.float32)


@pytest.mark.parametrize("variant", ["3g", "urm_v1", "urm_v2"])
def test_unrolled_reweighting_variants_match_numpy(variant):
    module = layers.UnrolledReweighting(num_blocks=2, hidden=HIDDEN, reweighting=variant)
    x = small_features(1)
    variables = random_variables(module, x, seed=2)
    out, state = jax.jit(functools.partial(module.apply, train=False, mutable=["intermediates"]))(variables, x)
    per_block = state["intermediates"]["reweighted"][0]
    p = variables["params"]["blocks"]["block"]
    s = variables["batch_stats"]["blocks"]["block"]
    xh = x.astype(np.float64)
    for t in range(2):
        take = lambda tree, t=t: jax.tree.map(lambda a: np.asarray(a)[t], tree)  # noqa: E731
        xh = np_block(take(p), take(s), xh, x.astype(np.float64), variant)
        assert_close(per_block[t], xh, rtol=1e-5, name=f"{variant} block {t}")
    assert_close(out, xh, rtol=1e-5, name=variant)
    # The variants own exactly the convolutions they use.
    expected = {
        "3g": set(CONVS) | set(BNS),
        "urm_v1": {"atmap1", "bnat1", "atmap2"},
        "urm_v2": {"map1", "bn1", "map2", "bn2", "atmap1", "bnat1", "atmap2"},
    }[variant]
    assert set(p) == expected


def test_unrolled_reweighting_stacks_blocks_on_a_leading_axis():
    x = small_features(3)
    module = layers.UnrolledReweighting(num_blocks=3, hidden=HIDDEN)
    variables = jax.jit(functools.partial(module.init, train=False))(jax.random.PRNGKey(0), x)
    block = layers.ReweightingBlock(hidden=HIDDEN)
    one = jax.eval_shape(functools.partial(block.init, train=False), jax.random.PRNGKey(0), x)
    # nn.scan: the stacked tree is one block's tree with a leading [T] axis on every leaf.
    assert set(variables) == {"params", "batch_stats"}
    for col in ("params", "batch_stats"):
        stacked_tree = variables[col]["blocks"]["block"]
        assert jax.tree.map(np.shape, stacked_tree) == jax.tree.map(lambda a: (3,) + a.shape, one[col])
    assert variables["params"]["blocks"]["block"]["map1"]["kernel"].shape == (3, 1, 1, C, C)
    # Separate weights per block (independent initialisation).
    k = np.asarray(variables["params"]["blocks"]["block"]["map1"]["kernel"])
    assert not np.allclose(k[0], k[1]) and not np.allclose(k[1], k[2])

    # Applying the stack equals applying each block's slice in turn with ReweightingBlock.
    variables = randomise(variables, seed=4)
    out = jax.jit(functools.partial(module.apply, train=False))(variables, x)
    xh = x
    apply_block = jax.jit(functools.partial(block.apply, train=False))
    for t in range(3):
        xh = apply_block(
            jax.tree.map(lambda a, t=t: a[t], {c: variables[c]["blocks"]["block"] for c in variables}), xh, x
        )
    assert_close(out, xh, rtol=1e-5)
    # A rolled loop computes the same.
    rolled = jax.jit(
        functools.partial(layers.UnrolledReweighting(num_blocks=3, hidden=HIDDEN, unroll=False).apply, train=False)
    )(variables, x)
    assert_close(rolled, out, rtol=1e-5)


def test_zero_blocks_is_identity_without_parameters():
    x = small_features(5)
    module = layers.UnrolledReweighting(num_blocks=0)
    assert module.init(jax.random.PRNGKey(0), x, train=False) == {}
    np.testing.assert_array_equal(module.apply({}, x, train=False), x)
    with pytest.raises(ValueError, match="num_blocks=-1 must be an integer >= 0"):
        layers.UnrolledReweighting(num_blocks=-1)


# -------------------------------------------------------------------- heads and shapes
def triangle(c):
    return c * (c + 1) // 2


def gg(**options):
    """A GeneralizedGaussianCovariance factory (small hidden width) with fixed options."""
    return lambda **kw: layers.GeneralizedGaussianCovariance(hidden=HIDDEN, **options, **kw)


# name -> (factory(**kw), output width for C channels, top-level parameter children)
HEADS = {
    "3g": (gg(), triangle(C), {"reweighting"}),  # T = 3
    "3g_T0": (gg(num_blocks=0), triangle(C), set()),
    "3g_T1": (gg(num_blocks=1), triangle(C), {"reweighting"}),
    "3g_T5": (gg(num_blocks=5), triangle(C), {"reweighting"}),
    "urm_v1": (gg(num_blocks=1, reweighting="urm_v1"), triangle(C), {"reweighting"}),
    "urm_v2": (gg(num_blocks=1, reweighting="urm_v2"), triangle(C), {"reweighting"}),
    "3g_no_estimator": (gg(num_blocks=1, estimator=False), triangle(C), {"reweighting"}),
    "3g_lam05": (gg(num_blocks=1, lam=0.5), triangle(C), {"reweighting"}),
    "3g_eigh": (gg(num_blocks=1, sqrt_method="eigh"), triangle(C), {"reweighting"}),
    "isqrt": (lambda **kw: layers.CovariancePooling(method="isqrt", **kw), triangle(C), set()),
    "mpncov": (lambda **kw: layers.CovariancePooling(method="mpncov", **kw), triangle(C), set()),
    "plain": (lambda **kw: layers.CovariancePooling(method="plain", **kw), triangle(C), set()),
    "bcnn": (lambda **kw: layers.BilinearPooling(**kw), C * C, {"bn"}),
    "bcnn_no_bn": (lambda **kw: layers.BilinearPooling(batch_norm=False, **kw), C * C, set()),
    "g2de": (lambda **kw: layers.GaussianEmbedding(**kw), triangle(C + 1), set()),
    "g2de_ns": (lambda **kw: layers.GaussianEmbedding(sqrt_method="newton_schulz", **kw), triangle(C + 1), set()),
    "gap": (lambda **kw: layers.GlobalAveragePooling(**kw), C, set()),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_output_shapes_and_parameters(name):
    factory, width, children = HEADS[name]
    x = jax.ShapeDtypeStruct((3, 5, 6, C), jnp.float32)
    for head, in_c, params in (
        (factory(), C, children),
        (factory(reduction_dim=C), 2 * C, children | {"reduce"}),
        (factory(in_features=C), C, children),
    ):
        xin = jax.ShapeDtypeStruct(x.shape[:-1] + (in_c,), jnp.float32)
        variables = jax.eval_shape(functools.partial(head.init, train=False), jax.random.PRNGKey(0), xin)
        assert set(variables.get("params", {})) == params, name
        out = jax.eval_shape(functools.partial(head.apply, train=False), variables, xin)
        assert out.shape == (3, width) and out.dtype == jnp.float32, (name, out)
    if name.startswith("3g_T") or name in ("3g", "urm_v1"):
        t = {"3g": 3, "3g_T0": 0, "3g_T1": 1, "3g_T5": 5, "urm_v1": 1}[name]
        rw = variables.get("params", {}).get("reweighting", {})
        assert (rw["blocks"]["block"]["atmap1"]["kernel"].shape[0] if rw else 0) == t


def _apply(head, x, seed=0):
    variables = random_variables(head, x, seed)
    return jax.jit(functools.partial(head.apply, train=False, mutable=["intermediates"]))(variables, x), variables


def test_head_values_against_linalg_pipelines():
    """Each head computes what it documents, from the same pieces."""
    x = small_features(6)
    f = x.reshape(2, -1, C).astype(np.float64)
    cov = np.asarray(linalg.covariance(x.reshape(2, -1, C)))
    tri = lambda m, lower=True: np.asarray(linalg.triu_vector(m, lower=lower))  # noqa: E731

    (v_t0, _), _ = _apply(layers.GeneralizedGaussianCovariance(num_blocks=0), x)
    isqrt = layers.CovariancePooling(method="isqrt").apply({}, x, train=False)
    # T = 0 is iSQRT-COV; two differently compiled programs agree to float32 rounding, not bitwise.
    assert_close(v_t0, isqrt, rtol=1e-6)
    assert_close(isqrt, tri(linalg.sqrtm_newton_schulz(cov, 5)), rtol=1e-6)
    assert_close(
        layers.CovariancePooling(method="isqrt", num_iters=3).apply({}, x, train=False),
        tri(linalg.sqrtm_newton_schulz(cov, 3)),
        rtol=1e-6,
    )
    assert_close(
        layers.CovariancePooling(method="mpncov").apply({}, x, train=False), tri(linalg.sqrtm_eigh(cov)), rtol=1e-6
    )
    assert_close(
        layers.CovariancePooling(method="mpncov", power=0.25).apply({}, x, train=False),
        tri(linalg.sqrtm_eigh(cov, 0.25)),
        rtol=1e-6,
    )
    assert_close(layers.CovariancePooling(method="plain").apply({}, x, train=False), tri(cov), rtol=1e-6)
    assert_close(
        layers.CovariancePooling(method="plain", lower_triangle=False).apply({}, x, train=False),
        tri(cov, False),
        rtol=1e-6,
    )

    # 3G variants: the estimator applied to the covariance of the re-weighted features.
    for kw, root in (
        ({}, lambda s: linalg.sqrtm_newton_schulz(s, 5)),
        ({"estimator": False}, lambda s: s),
        ({"lam": 0.5}, lambda s: linalg.regularized_sqrtm(s, 0.5)),
        ({"lam": 0.5, "sqrt_method": "eigh"}, lambda s: linalg.regularized_sqrtm(s, 0.5, "eigh")),
        ({"sqrt_method": "eigh"}, linalg.sqrtm_eigh),
        ({"num_iters": 2, "lower_triangle": False}, lambda s: linalg.sqrtm_newton_schulz(s, 2)),
    ):
        head = layers.GeneralizedGaussianCovariance(num_blocks=1, hidden=HIDDEN, **kw)
        (out, state), _ = _apply(head, x)
        it = state["intermediates"]
        xh = it["reweighting"]["reweighted"][0][-1]
        s = linalg.covariance(xh.reshape(2, -1, C))
        assert_close(it["covariance"][0], s, rtol=1e-6)
        assert ("sqrt" in it) == kw.get("estimator", True)
        assert_close(out, tri(root(s), kw.get("lower_triangle", True)), rtol=1e-5, name=str(kw))

    # G2DeNet: root of [[S + mu mu^T, mu], [mu^T, 1]].
    m = linalg.gaussian_embedding_matrix(x.reshape(2, -1, C))
    assert_close(layers.GaussianEmbedding().apply({}, x, train=False), tri(linalg.sqrtm_eigh(m)), rtol=1e-6)
    assert_close(
        layers.GaussianEmbedding(sqrt_method="newton_schulz").apply({}, x, train=False),
        tri(linalg.sqrtm_newton_schulz(m, 5)),
        rtol=1e-6,
    )
    # B-CNN: X^T X / N (no centring), signed sqrt, l2; BatchNorm (eval, fresh stats) after it.
    gram = np.swapaxes(f, 1, 2) @ f / f.shape[1]
    ss = np.sign(gram) * np.sqrt(np.abs(gram) + 1e-8)
    ref = (ss / np.linalg.norm(ss.reshape(2, -1), axis=-1)[:, None, None]).reshape(2, -1)
    assert_close(layers.BilinearPooling(batch_norm=False).apply({}, x, train=False), ref, rtol=1e-5)
    bcnn = layers.BilinearPooling()
    bn_out = bcnn.apply(bcnn.init(jax.random.PRNGKey(0), x, train=False), x, train=False)  # fresh BN statistics
    assert_close(bn_out, ref / np.sqrt(1.0 + BN_EPS), rtol=1e-5)
    assert_close(layers.GlobalAveragePooling().apply({}, x, train=False), f.mean(axis=1), rtol=1e-6)


def test_reduction_dim_is_a_channel_reduction_first():
    x = small_features(7, c=2 * C)
    head = layers.GeneralizedGaussianCovariance(num_blocks=1, hidden=HIDDEN, reduction_dim=C)
    variables = random_variables(head, x, seed=8)
    assert variables["params"]["reduce"]["layer_reduce"]["kernel"].shape == (1, 1, 2 * C, C)
    out = head.apply(variables, x, train=False)
    reduced = layers.ChannelReduction(C).apply({c: variables[c]["reduce"] for c in variables}, x, train=False)
    p, s = variables["params"]["reduce"], variables["batch_stats"]["reduce"]
    expected = np.maximum(
        np_bn(x.astype(np.float64) @ p["layer_reduce"]["kernel"][0, 0], p["layer_reduce_bn"], s["layer_reduce_bn"]), 0.0
    )
    assert_close(reduced, expected, rtol=1e-5)
    rest = layers.GeneralizedGaussianCovariance(num_blocks=1, hidden=HIDDEN)
    rest_vars = {c: {k: v for k, v in variables[c].items() if k != "reduce"} for c in variables}
    assert_close(out, rest.apply(rest_vars, reduced, train=False), rtol=1e-5)


def test_3g_head_takes_features_of_any_finite_scale():
    """Features whose covariance overflows float32 (from ~1e18) give finite, correct outputs.

    The head then works on the features divided by a power of two (`linalg.scaled_covariance`):
    at 2^100 (~1.3e30; covariance ~2^200) it must give 2^100 times its output on the unscaled
    features (cov_eps = 0, as eps / 4^100 underflows), or for lam < 1, which is not homogeneous,
    the float64 estimator. Both sides compute the same float32 products in differently compiled
    programs: 16-term covariance sums agree to ~16 * 2^-24 = 1e-6, and the roots of these
    well-conditioned matrices pass that on: rtol 1e-5 of the largest entry.
    """
    x = small_features(30)
    k = 100
    big = x * np.float32(2.0**k)
    for kw in ({}, {"reweighting": "exact", "exact_beta": 0.6}, {"num_iters": 3}):
        head = layers.GeneralizedGaussianCovariance(num_blocks=0 if not kw.get("reweighting") else 2, cov_eps=0.0, **kw)
        (out, state), _ = _apply(head, big)
        (small_out, _), _ = _apply(head, x)
        assert np.isfinite(out).all(), kw
        assert_close(out, np.float64(2.0**k) * np.asarray(small_out, np.float64), rtol=1e-5, name=str(kw))
        assert np.isinf(state["intermediates"]["covariance"][0]).any()  # not representable: inf, as documented
    for method in ("isqrt", "mpncov"):  # iSQRT-COV and MPN-COV: the same scaling.
        head = layers.CovariancePooling(method=method, cov_eps=0.0)
        (out, _), _ = _apply(head, big)
        (small_out, _), _ = _apply(head, x)
        assert_close(out, np.float64(2.0**k) * np.asarray(small_out, np.float64), rtol=1e-5, name=method)
    # lam < 1 (eigh): Theorem 1's estimator of the float64 covariance.
    head = layers.GeneralizedGaussianCovariance(num_blocks=0, lam=0.5, sqrt_method="eigh")
    (out, _), _ = _apply(head, big)
    f = big.reshape(2, -1, C).astype(np.float64)
    f = f - f.mean(axis=1, keepdims=True)
    w, v = np.linalg.eigh(np.swapaxes(f, 1, 2) @ f / f.shape[1])
    root = (v * (np.sqrt(1.0 + w / 0.5) - 1.0)[:, None, :]) @ np.swapaxes(v, 1, 2)  # c = (1 - lam) / lam = 1
    assert_close(out, np.stack([r[np.tril_indices(C)] for r in root]), rtol=1e-5)
    # The reported case: the reduction's BatchNorm in eval mode passes the input's scale on.
    head = layers.GeneralizedGaussianCovariance(num_blocks=0, reduction_dim=C)
    variables = random_variables(head, small_features(31, c=2 * C), seed=32)
    for scale in (1e20, 1e30):
        out = head.apply(variables, small_features(31, c=2 * C) * np.float32(scale), train=False)
        assert np.isfinite(out).all() and np.abs(out).max() > 1e-3 * scale, scale


# ----------------------------------------------------------------------------- errors
def test_wrong_rank_or_channels_raise_value_errors():
    key = jax.random.PRNGKey(0)
    for factory, _, _ in HEADS.values():
        head = factory()
        with pytest.raises(ValueError, match=r"NHWC.*\[batch, height, width, channels\].*rank 3"):
            head.init(key, jnp.ones((2, 16, C)), train=False)
        with pytest.raises(ValueError, match=rf"configured for {C} input channels but got {C + 2}"):
            factory(in_features=C).init(key, jnp.ones((2, 3, 3, C + 2)), train=False)
    for module in (layers.ReweightingBlock(), layers.UnrolledReweighting()):
        with pytest.raises(ValueError, match=r"rank 5 with shape \(1, 2, 3, 3, 8\)"):
            module.init(key, jnp.ones((1, 2, 3, 3, 8)), train=False)
    # Variables of one width applied to another: a ValueError saying what was expected.
    x = small_features(9)
    for head, label in (
        (layers.GeneralizedGaussianCovariance(num_blocks=1, hidden=HIDDEN), "ReweightingBlock"),
        (layers.GeneralizedGaussianCovariance(num_blocks=1, hidden=HIDDEN, reweighting="urm_v1"), "ReweightingBlock"),
        (layers.CovariancePooling(reduction_dim=4), "ChannelReduction"),
        (layers.BilinearPooling(), "BilinearPooling"),
    ):
        variables = jax.eval_shape(functools.partial(head.init, train=False), key, x)
        with pytest.raises(ValueError, match=rf"{label} has parameters for {C} input channels but got {C - 2}"):
            jax.eval_shape(functools.partial(head.apply, train=False), variables, x[..., :-2])
    # Unknown options name the valid ones.
    with pytest.raises(ValueError, match="'3g', 'urm_v1', 'urm_v2' or 'exact'"):
        layers.GeneralizedGaussianCovariance(reweighting="urm_v3")
    with pytest.raises(ValueError, match="'isqrt', 'mpncov' or 'plain'"):
        layers.CovariancePooling(method="svd").init(key, x, train=False)
    with pytest.raises(ValueError, match="'newton_schulz' or 'eigh'"):
        layers.GeneralizedGaussianCovariance(num_blocks=0, sqrt_method="svd").init(key, x, train=False)
    with pytest.raises(ValueError, match=r"lam=2.0 must be in \(0, 1\]"):
        layers.GeneralizedGaussianCovariance(num_blocks=0, lam=2.0)
    # Every option out of its range, named in one message (the model options of a config too).
    with pytest.raises(ValueError, match=r"num_iters=0 must be an integer >= 1 .*; reduction_dim=-5 must be"):
        layers.CovariancePooling(reduction_dim=-5, num_iters=0)


# ------------------------------------------------------------------- dtypes and modes
# One of each kind of head for the (compile-heavy) value tests below.
REPRESENTATIVE = ["3g_T1", "urm_v2", "3g_lam05", "isqrt", "mpncov", "plain", "bcnn", "g2de", "gap"]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_bf16_features_give_float32_output_equal_to_float32_path(name):
    """bf16 backbone features into a float32 head: float32 output equal to feeding the
    same values as float32. Heads without convolutions also give it with dtype=bf16.
    (Equal up to float32 rounding: each input dtype compiles its own program.)"""
    factory = HEADS[name][0]
    x32 = jnp.asarray(small_features(10), jnp.bfloat16).astype(jnp.float32)
    head = factory()
    variables = random_variables(head, x32, seed=11)
    fn = jax.jit(lambda v, x: head.apply(v, x, train=False))
    ref = fn(variables, x32)
    out = fn(variables, x32.astype(jnp.bfloat16))
    assert out.dtype == ref.dtype == jnp.float32
    assert_close(out, ref, rtol=1e-6)
    if "reweighting" not in variables.get("params", {}):
        head16 = factory(dtype=jnp.bfloat16)
        out16 = jax.jit(lambda v, x: head16.apply(v, x, train=False))(variables, x32.astype(jnp.bfloat16))
        assert out16.dtype == jnp.float32
        assert_close(out16, ref, rtol=1e-6)


def test_bf16_head_keeps_covariance_sqrt_and_vector_in_float32():
    x = small_features(12, c=16)
    head32 = layers.GeneralizedGaussianCovariance(num_blocks=2, hidden=HIDDEN)
    head16 = layers.GeneralizedGaussianCovariance(num_blocks=2, hidden=HIDDEN, dtype=jnp.bfloat16)
    variables = random_variables(head32, x, seed=13)
    # Parameters stay float32 in a bf16 head.
    shapes = jax.eval_shape(functools.partial(head16.init, train=False), jax.random.PRNGKey(0), x)
    assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out16, state = jax.jit(functools.partial(head16.apply, train=False, mutable=["intermediates"]))(variables, x)
    it = state["intermediates"]
    reweighted = it["reweighting"]["reweighted"][0]
    assert reweighted.dtype == jnp.bfloat16  # the 1x1 convolutions run in bf16 ...
    for k in ("covariance", "sqrt"):  # ... the statistics in float32
        assert it[k][0].dtype == jnp.float32, k
    assert out16.dtype == jnp.float32
    feats = reweighted[-1].reshape(2, -1, 16)
    # (Equal up to float32 rounding: the head is jitted, the references run op by op.)
    f32_cov = linalg.covariance(feats.astype(jnp.float32))
    assert_close(it["covariance"][0], f32_cov, rtol=1e-6)
    assert_close(it["sqrt"][0], linalg.sqrtm_newton_schulz(it["covariance"][0], 5), rtol=1e-6)
    np.testing.assert_array_equal(out16, linalg.triu_vector(it["sqrt"][0]))
    # The float32 statistic differs from one accumulated in bf16 (it is not computed so).
    centred = feats - feats.mean(axis=1, keepdims=True)
    bf16_cov = jnp.einsum("bnc,bnd->bcd", centred, centred, preferred_element_type=jnp.bfloat16) / feats.shape[1]
    with pytest.raises(AssertionError):
        assert_close(bf16_cov, f32_cov, rtol=1e-5)
    # bf16 convolutions: close to the float32 head, not equal.
    out32 = jax.jit(functools.partial(head32.apply, train=False))(variables, x)
    err = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0 < err < 0.05, err


def test_train_mode_uses_batch_statistics_and_updates_running_averages():
    x = small_features(14, c=2 * C)
    head = layers.GeneralizedGaussianCovariance(num_blocks=2, hidden=HIDDEN, reduction_dim=C)
    variables = random_variables(head, x, seed=15)
    old = variables["batch_stats"]
    apply_eval = jax.jit(functools.partial(head.apply, train=False))
    out_eval = apply_eval(variables, x)
    out_train, updates = jax.jit(functools.partial(head.apply, train=True, mutable=["batch_stats"]))(variables, x)
    new = updates["batch_stats"]
    assert jax.tree.structure(new) == jax.tree.structure(old)
    assert not np.allclose(out_train, out_eval, rtol=1e-3)

    # The reduction's BN saw conv(x): its update is 0.9 * old + 0.1 * batch statistics
    # (Flax's biased variance over the B*H*W positions).
    y = (x.astype(np.float64) @ variables["params"]["reduce"]["layer_reduce"]["kernel"][0, 0]).reshape(-1, C)
    o, n = old["reduce"]["layer_reduce_bn"], new["reduce"]["layer_reduce_bn"]
    assert_close(n["mean"], 0.9 * o["mean"] + 0.1 * y.mean(0), rtol=1e-5)
    assert_close(n["var"], 0.9 * o["var"] + 0.1 * y.var(0), rtol=1e-5)

    # Every BN normalised with its batch statistics: using them as running statistics in
    # eval mode reproduces the training-mode output.
    batch = jax.tree.map(lambda n, o: (np.asarray(n, np.float64) - 0.9 * np.asarray(o, np.float64)) / 0.1, new, old)
    as_running = {"params": variables["params"], "batch_stats": jax.tree.map(lambda a: a.astype(np.float32), batch)}
    assert_close(apply_eval(as_running, x), out_train, rtol=1e-4)
    # Eval mode does not need (or change) mutable state.
    out2, unchanged = jax.jit(functools.partial(head.apply, train=False, mutable=["batch_stats"]))(variables, x)
    assert leaves_equal(unchanged["batch_stats"], old)
    assert_close(out2, out_eval, rtol=1e-6)  # Another program (mutable output): float32 rounding.


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_all_zero_features_finite_and_nan_reported(name):
    """An all-zero map gives finite outputs and training gradients; NaN in gives NaN out."""
    head = HEADS[name][0]()
    zeros = np.zeros((2, HW, HW, C), np.float32)
    bad = small_features(16)
    bad[0, 1, 2, 3] = np.nan
    variables = random_variables(head, zeros, seed=17)
    params = variables.get("params", {})

    def train_loss(params, x):
        out, _ = head.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out * jnp.arange(out.shape[-1]))

    @jax.jit
    def run(params, zeros, bad):
        apply = lambda x: head.apply({**variables, "params": params}, x, train=False)  # noqa: E731
        return apply(zeros), jax.grad(train_loss, argnums=(0, 1))(params, zeros), apply(bad)

    out, grads, out_bad = run(params, zeros, bad)
    assert np.isfinite(out).all()
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    out_bad = np.asarray(out_bad)
    assert np.isnan(out_bad[0]).any()  # NaN in, NaN out: not silently replaced
    assert np.isfinite(out_bad[1]).all()  # in eval mode samples are independent


@pytest.mark.parametrize("conv", [blocks.Conv, cpu.Conv], ids=["nn.Conv", "cpu.Conv"])
def test_parallel_conv1x1_is_the_separate_convolutions(conv):
    """`conv1x1_parallel` (map1/map2 and map3/map4 of the re-weighting block as one
    convolution each) creates the same parameters as separate `conv1x1`s (names, shapes,
    initial values: checkpoints and the converter see no difference) and computes the
    same outputs, to float32 rounding, also in bf16."""
    import flax.linen as nn

    names = ("map1", "map2")

    class Separate(layers.common.ConvModule):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            return [self.conv1x1(C, self.dtype, name=n)(x) for n in names]

    class Parallel(layers.common.ConvModule):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            return self.conv1x1_parallel(x, C, self.dtype, names)

    x = small_features(21)
    key = jax.random.PRNGKey(5)
    variables = Separate(conv=conv).init(key, x)
    assert leaves_equal(Parallel(conv=conv).init(key, x), variables)
    for dtype, rtol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        want = Separate(dtype, conv=conv).apply(variables, x)
        got = jax.jit(Parallel(dtype, conv=conv).apply)(variables, x)
        for g, w, n in zip(got, want, names):
            assert g.dtype == w.dtype == dtype
            assert_close(g, w, rtol=rtol, name=n)
