"""The head's product precision: the option, its platform mapping, what the GPU program
carries, and the accuracy of every setting by emulation against float64.

Accuracy is measured on CPU with `tests/reference/precision_emulation.py`: the float32 products of
the traced program (forward and backward) are recomputed as bf16 / TF32 split products
with float32 accumulation, what `jax.lax.DotAlgorithmPreset` computes on a GPU. A setting
is acceptable if its relative error (Frobenius norm) against float64, of the output and
of the input gradient, is within 2x of float32 HIGHEST's on every input class: the
golden tensors of the reference, random SPD matrices and features with condition numbers
1e2 / 1e4 / 1e6, and near-singular covariances of ReLU features (N < C positions). The
same study, on a GPU with the real products: benchmarks/bench_precision.py.

Product counts of the head's GPU program (`tests/reference/program_counts.py`) are pinned at the end.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gg_jax import layers, linalg, models
from tests.reference.precision_emulation import (
    emulate,
    emulated_dot_general,
    golden_head_variables,
    golden_tensors,
    head_case,
    measure,
    pipeline_case,
    relu_features,
    root_case,
    spd_features,
    spd_matrices,
    split,
)
from tests.reference.precision_emulation import (
    norm_rel_err as rel_err,
)
from tests.reference.program_counts import count_products

P = jax.lax.DotAlgorithmPreset
HIGHEST = jax.lax.Precision.HIGHEST
ACCEPTED = ["highest", "bf16_6x", "tf32_3x"]  # what linalg.MATMUL_PRECISIONS offers
REJECTED = ["bf16_3x", "tf32"]  # a 2-piece bf16 split; a single TF32 pass (GPUs' default precision)
FACTOR = 2.0


# ------------------------------------------------------------------------ the option
def test_names_platform_mapping_and_defaults():
    assert list(linalg.MATMUL_PRECISIONS) == ACCEPTED
    assert linalg.MATMUL_PRECISIONS == {
        "highest": HIGHEST,
        "bf16_6x": P.BF16_BF16_F32_X6,
        "tf32_3x": P.TF32_TF32_F32_X3,
    }
    assert {p: linalg.default_matmul_precision(p) for p in ("cpu", "tpu", "cuda", "gpu", "rocm", "metal")} == {
        "cpu": "highest",
        "tpu": "highest",
        "cuda": "tf32_3x",
        "gpu": "tf32_3x",
        "rocm": "highest",
        "metal": "highest",
    }
    for name, value in linalg.MATMUL_PRECISIONS.items():
        assert linalg.lax_precision(name, platform="cuda") == value
        # CPUs and TPUs compute every setting as HIGHEST (TPUs: 6 bf16 passes; no TF32).
        assert linalg.lax_precision(name, platform="cpu") == HIGHEST
        assert linalg.lax_precision(name, platform="tpu") == HIGHEST
        # float64 products stay float64; a preset value is used as given on any platform.
        assert linalg.lax_precision(name, jnp.float64, platform="cuda") == HIGHEST
        assert linalg.lax_precision(value, platform="cpu") == value
    assert linalg.lax_precision("auto", platform="cuda") == P.TF32_TF32_F32_X3
    assert linalg.lax_precision("auto", platform="cpu") == HIGHEST
    assert linalg.lax_precision() == HIGHEST  # this machine: the default backend is the CPU
    with pytest.raises(ValueError, match="'auto', 'highest', 'bf16_6x', 'tf32_3x'"):
        linalg.lax_precision("bf16")
    with pytest.raises(ValueError, match="not one of the float32-accurate settings"):
        linalg.lax_precision(P.BF16_BF16_F32_X3)
    with pytest.raises(ValueError, match="matmul_precision='fast' must be 'auto', 'highest', 'bf16_6x' or 'tf32_3x'"):
        layers.CovariancePooling(matmul_precision="fast").init(
            jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 3)), train=False
        )


def test_cpu_must_not_get_a_tf32_preset():
    """Why names run as HIGHEST on CPU: XLA:CPU rejects the TF32 presets (and computes the
    bf16 ones in float32 anyway). Every CPU program of the heads multiplies at HIGHEST."""
    a = jnp.ones((4, 4), jnp.float32)
    with pytest.raises(ValueError, match="not supported by dot_general on CPU"):
        jax.jit(lambda a: jnp.matmul(a, a, precision=P.TF32_TF32_F32_X3))(a)
    x = jnp.ones((2, 3, 3, 4), jnp.float32)
    for name in ACCEPTED:
        head = layers.GeneralizedGaussianCovariance(num_blocks=0, matmul_precision=name)
        text = jax.jit(jax.grad(lambda x, head=head: head.apply({}, x, train=False).sum())).lower(x).as_text()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) >= 10 and all("precision = [HIGHEST, HIGHEST]" in line for line in dots), name


def _cuda_dots(fn, *args):
    text = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    return [line for line in text.splitlines() if "stablehlo.dot_general" in line]


# What each value looks like on a StableHLO dot.
ALGORITHM_TEXT = {
    "highest": "precision = [HIGHEST, HIGHEST]",
    "bf16_6x": "lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32, "
    "lhs_component_count = 1, rhs_component_count = 1, num_primitive_operations = 6",
    "tf32_3x": "lhs_precision_type = tf32, rhs_precision_type = tf32, accumulation_type = f32, "
    "lhs_component_count = 1, rhs_component_count = 1, num_primitive_operations = 3",
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_gpu_program_uses_the_setting_for_every_product(name):
    """Lowered for CUDA (`jax.export`, no GPU needed), forward and backward of the 3G
    (with and without the robust estimator), iSQRT, B-CNN and G2DeNet-by-Newton-Schulz
    heads: every dot carries the setting (the 1x1 convolutions are convolutions there)."""
    value = linalg.MATMUL_PRECISIONS[name]
    x = jax.ShapeDtypeStruct((2, 3, 3, 4), jnp.float32)
    heads = [
        layers.GeneralizedGaussianCovariance(num_blocks=1, hidden=2, matmul_precision=value),
        layers.GeneralizedGaussianCovariance(num_blocks=0, lam=0.5, matmul_precision=value),
        layers.CovariancePooling(matmul_precision=value),
        layers.BilinearPooling(batch_norm=False, matmul_precision=value),
        layers.GaussianEmbedding(sqrt_method="newton_schulz", matmul_precision=value),
    ]
    variables = [jax.eval_shape(functools.partial(h.init, train=False), jax.random.PRNGKey(0), x) for h in heads]

    def loss(variables, x):
        return sum(jnp.sum(jnp.sin(h.apply(v, x, train=False))) for h, v in zip(heads, variables))

    dots = _cuda_dots(jax.grad(loss, argnums=(0, 1)), variables, x)
    # Dots in the program text (a scan body's once): per Newton-Schulz root with K = 5,
    # 1 + 3 (the scan body) + 2 forward and twice that backward, per covariance or Gram
    # 1 + 1: 20 each for the 3G, robust 3G, iSQRT and G2DeNet heads, 2 for B-CNN.
    assert len(dots) == 4 * 20 + 2, len(dots)
    for line in dots:
        assert ALGORITHM_TEXT[name] in line, line
    # The exact re-weighting (Eqn. 9 computed: inverse roots, weighted covariances) too.
    exact = layers.GeneralizedGaussianCovariance(num_blocks=2, reweighting="exact", matmul_precision=value)
    v = jax.eval_shape(functools.partial(exact.init, train=False), jax.random.PRNGKey(0), x)
    dots = _cuda_dots(jax.grad(lambda v, x: jnp.sum(jnp.sin(exact.apply(v, x, train=False))), argnums=(0, 1)), v, x)
    assert len(dots) > 20 and all(ALGORITHM_TEXT[name] in line for line in dots), dots
    # eigh (MPN-COV): its products carry the setting too (checked on the jaxpr: the
    # eigendecomposition itself needs the CUDA plugin to be lowered).
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(linalg.sqrtm_eigh(a, matmul_precision=value) ** 2)))(
        jnp.eye(4) * 2.0
    )
    precisions = [e.params["precision"] for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(precisions) == 5
    assert all(p == value or p == (value, value) for p in precisions), precisions


def _all_eqns(jaxpr):
    out = []
    for e in jaxpr.eqns:
        out.append(e)
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            out.extend(_all_eqns(getattr(sub, "jaxpr", sub)))
    return out


def test_models_create_passes_the_option_to_the_head():
    assert "matmul_precision" in models.options("resnet50_3g")
    model = models.create("resnet50_3g", num_classes=10, matmul_precision="bf16_6x")
    head = model.head.clone(dtype=jnp.bfloat16)
    assert head.matmul_precision == "bf16_6x" and head.reduction_dim == 256
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
    assert jax.eval_shape(functools.partial(model.apply, train=False), variables, x).shape == (1, 10)
    with pytest.raises(ValueError, match="matmul_precision='fp32' must be 'auto', 'highest'"):
        models.create("resnet50_3g", num_classes=10, matmul_precision="fp32")


# --------------------------------------------------------------------- the emulation
def test_emulated_products_compute_the_split_algorithms():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((3, 48, 40)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 40, 32)), jnp.float32)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    # Three bf16 pieces hold a float32 exactly; two TF32 pieces up to 2^-22 of it.
    np.testing.assert_array_equal(sum(split(a, "bf16", 3)), a)
    assert np.all(np.abs(np.asarray(sum(split(a, "tf32", 2))) - a) <= 2.0**-22 * np.abs(a))
    dims = (((2,), (1,)), ((0,), (0,)))
    err = {s: rel_err(emulated_dot_general(a, b, dims, s), exact) for s in ("highest", "bf16", "bf16_3x", "bf16_6x")}
    err["tf32"], err["tf32_3x"] = (rel_err(emulated_dot_general(a, b, dims, s), exact) for s in ("tf32", "tf32_3x"))
    # One pass: the operands' rounding (bf16 2^-9, TF32 2^-12 per element), no better.
    bf16_once = np.asarray(a.astype(jnp.bfloat16), np.float64) @ np.asarray(b.astype(jnp.bfloat16), np.float64)
    assert rel_err(emulated_dot_general(a, b, dims, "bf16"), bf16_once) < 1e-6
    assert 1e-3 < err["bf16"] < 1e-2 and 1e-4 < err["tf32"] < 1e-3
    assert 1e-6 < err["bf16_3x"] < 1e-4
    for s in ("bf16_6x", "tf32_3x"):
        assert err[s] < 2 * err["highest"] < 1e-6, err
    # Programs: HIGHEST products run as float32 (bitwise the same); relabelled, as bf16.
    f = jax.grad(lambda a: jnp.sum(jnp.sin(jnp.matmul(a, b, precision=HIGHEST))))
    np.testing.assert_array_equal(emulate(f)(a), jax.jit(f)(a))
    g_bf16 = emulate(f, {(HIGHEST, HIGHEST): "bf16"})(a)
    assert 1e-4 < rel_err(g_bf16, jax.jit(f)(a)) < 1e-1  # the backward's products are emulated too


def _report(case, errors):
    rows = [f"{case}: " + ", ".join(f"{s} {f:.2e}/{g:.2e}" for s, (f, g) in errors.items())]
    print("\n".join(rows))


def _check(case, errors, bound):
    """Accepted settings within 2x of HIGHEST (forward and gradient); rejected ones not;
    HIGHEST's own errors are float32 rounding (below `bound`)."""
    _report(case, errors)
    fwd0, grad0 = errors["highest"]
    assert 1e-8 < fwd0 < bound and 1e-8 < grad0 < bound, (case, errors["highest"])
    for s in ACCEPTED:
        f, g = errors[s]
        assert f <= FACTOR * fwd0 and g <= FACTOR * grad0, (case, s, errors)
    for s in REJECTED:
        if s in errors:
            f, g = errors[s]
            assert f > 5 * FACTOR * fwd0 and g > 5 * FACTOR * grad0, (case, s, errors)


CONDS = (1e2, 1e4, 1e6)


def _classes(n_per, names):
    return {name: np.arange(i * n_per, (i + 1) * n_per) for i, name in enumerate(names)}


def test_root_accuracy_on_ill_conditioned_spd_matrices():
    """iSQRT root (K=5) and its gradient on SPD matrices with condition numbers 1e2..1e6."""
    rng = np.random.default_rng(2)
    c, per = 32, 2
    a = np.concatenate([spd_matrices(rng, per, c, k) for k in CONDS])
    g = rng.standard_normal(a.shape).astype(np.float32)
    names = [f"root, cond {k:.0e}" for k in CONDS]
    results = measure(root_case, a, g, ACCEPTED + REJECTED, classes=_classes(per, names))
    for name in names:
        _check(name, results[name], 3e-6)


def test_pipeline_accuracy_on_ill_conditioned_and_relu_features():
    """Features -> covariance -> root -> vector, and its gradient: features whose
    covariance has condition number 1e2..1e6 (N = 4C), and ReLU features with N < C
    (rank-deficient covariance plus the 1e-7 ridge: near-singular)."""
    rng = np.random.default_rng(3)
    c, per = 32, 2
    x = np.concatenate([spd_features(rng, per, 4 * c, c, k) for k in CONDS])
    g = rng.standard_normal((len(x), c * (c + 1) // 2)).astype(np.float32)
    names = [f"pipeline, cond {k:.0e}" for k in CONDS]
    results = measure(pipeline_case, x, g, ACCEPTED + REJECTED, classes=_classes(per, names))
    for name in names:
        _check(name, results[name], 3e-6)
    x = relu_features(rng, 3, 24, c)
    g = rng.standard_normal((3, c * (c + 1) // 2)).astype(np.float32)
    _check("pipeline, ReLU N=24 < C=32", measure(pipeline_case, x, g, ACCEPTED + REJECTED), 3e-6)


def test_golden_head_accuracy():
    """On the reference's tensors (resnet23_3g): the whole 3G head (three re-weighting
    blocks, covariance, root, vector; eval mode, the reference's weights) from the golden
    `reduced` features (7x7 positions, 256 channels: a near-singular covariance).
    (The root of the golden covariance alone: benchmarks/bench_precision.py.)"""
    z = golden_tensors()
    rng = np.random.default_rng(4)
    x = z["reduced"].transpose(0, 2, 3, 1).astype(np.float32)
    g = rng.standard_normal(z["vector"].shape)
    errors = measure(head_case, x, g, ACCEPTED, args=(golden_head_variables(),))
    _check("golden 3G head", errors, 5e-6)


# ------------------------------------------------------------------ product counts
def test_head_product_counts_of_the_gpu_program():
    """Products per train step (forward + backward) of the GPU program of the 3G head
    (T = 3 blocks, K = 5) and of iSQRT-COV, pinned: 12 C x C products forward and 24
    backward (Newton-Schulz), the covariance one product each way (its gradient uses
    symmetry: one product instead of two), and per re-weighting block 6 convolutions
    forward (map1/map2 and map3/map4 each one convolution) and 12 backward."""
    c, n = 8, 16
    x = jax.ShapeDtypeStruct((2, 4, 4, c), jnp.float32)
    for head, conv_fwd in (
        (layers.GeneralizedGaussianCovariance(num_blocks=3, hidden=4), 3 * 6),
        (layers.CovariancePooling(method="isqrt"), 0),
    ):
        variables = jax.eval_shape(functools.partial(head.init, train=False), jax.random.PRNGKey(0), x)
        params, stats = variables.get("params", {}), variables.get("batch_stats", {})

        def forward(params, stats, x, head=head):
            return head.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])[0]

        def loss(params, stats, x, g):
            return jnp.vdot(forward(params, stats, x), g)

        g = jax.ShapeDtypeStruct((2, c * (c + 1) // 2), jnp.float32)
        fwd, _ = count_products(forward, params, stats, x, feature_sizes={n})
        both, flops = count_products(jax.value_and_grad(loss, argnums=(0, 2)), params, stats, x, g, feature_sizes={n})
        assert fwd == {"CxC": 12, "features": 1, **({"conv": conv_fwd} if conv_fwd else {})}, fwd
        assert both["CxC"] == 36 and both["features"] == 2 and both.get("conv", 0) == 3 * conv_fwd, both
        assert flops["CxC"] == 36 * 2 * 2 * c**3 and flops["features"] == 2 * 2 * 2 * n * c * c
