"""The exact re-weighting head option: `GeneralizedGaussianCovariance(reweighting='exact')`.

The T steps of paper Eqn. (9) are implemented here once more, literally and in NumPy float64
(the sum over j != n of Eqn. (7) written out, the Newton-Schulz inverse root of Eqn. (10)
iterated as printed, or an exact inverse root by eigendecomposition), and compared with
`mggd.reweighted_covariance` (float64) and the float32 head (jitted).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gg_jax import layers, linalg, mggd, models
from tests.helpers import rel_err


def features(seed, shape=(2, 6, 6, 8)):
    """Non-negative, long-tailed maps (squared normals) like post-ReLU activations."""
    return (np.random.default_rng(seed).standard_normal(shape) ** 2).astype(np.float32)


def np_inv_sqrt_newton_schulz(a, num_iters):
    """Eqn. (10): Q_0 = a / tr(a), P_0 = I; Q_k = Q_{k-1} T / ..., P_k = T P_{k-1}; P_K / sqrt(tr(a))."""
    trace = np.trace(a)
    q, p = a / trace, np.eye(len(a))
    for _ in range(num_iters):
        t = 0.5 * (3 * np.eye(len(a)) - p @ q)
        q, p = q @ t, t @ p
    return p / np.sqrt(trace)


def np_inv_sqrt_eigh(a, num_iters=None):
    w, v = np.linalg.eigh(a)
    return (v / np.sqrt(w)) @ v.T


def np_eqn9(x, num_steps, beta, c=None, num_iters=5, eps=1e-7, inv_sqrt=np_inv_sqrt_newton_schulz):
    """Sigma_T of the centred positions x [N, d] and the weights of each step, in float64."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    xc = x - x.mean(axis=0)
    sigma = xc.T @ xc / n + eps * np.eye(d)
    weights = []
    for _ in range(num_steps):
        p = inv_sqrt(sigma, num_iters)
        big_y = (xc @ p) @ (xc @ p).T  # Y = X^T Sigma^-1 X, [N, N]
        y = np.diag(big_y)
        if c is None:  # Eqns. (7)-(8): c_n = sum_{j != n} y_j^beta
            c_n = np.array([sum(y[j] ** beta for j in range(n) if j != i) for i in range(n)])
        else:
            c_n = np.full(n, float(c))
        w = n * d / (y + c_n * y ** (1 - beta))  # Eqn. (9)
        w = w / w.mean()
        weights.append(w)
        sigma = (xc * w[:, None]).T @ xc / n + eps * np.eye(d)
    return sigma, np.array(weights)


def np_head(x_nhwc, num_steps, beta, c=None, num_iters=5):
    """The whole head: Eqn. (9) steps, Newton-Schulz square root, i >= j vector."""
    out = []
    for img in np.asarray(x_nhwc, np.float64):
        sigma, _ = np_eqn9(img.reshape(-1, img.shape[-1]), num_steps, beta, c, num_iters)
        trace = np.trace(sigma)
        q, p = sigma / trace, np.eye(len(sigma))
        for _ in range(num_iters):
            t = 0.5 * (3 * np.eye(len(sigma)) - p @ q)
            q, p = q @ t, t @ p
        root = q * np.sqrt(trace)
        out.append(root[np.tril_indices(len(root))])
    return np.stack(out)


@functools.cache
def _apply(head, mutable=False):
    fn = functools.partial(head.apply, train=False, mutable=["intermediates"] if mutable else False)
    return jax.jit(fn)


def test_beta_one_with_eqn7_c_is_the_isqrt_cov_head():
    x = features(0)
    isqrt = layers.CovariancePooling(method="isqrt")
    expected = _apply(isqrt)({}, x)
    for beta in (1.0, None):  # fixed, and learned (log_beta starts at 0: beta = 1)
        head = layers.GeneralizedGaussianCovariance(num_blocks=3, reweighting="exact", exact_beta=beta)
        shapes = jax.eval_shape(functools.partial(head.init, train=False), jax.random.PRNGKey(0), x)
        variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        out, state = _apply(head, True)(variables, x)
        # Different programs (XLA may reassociate differently): float32 rounding, not bitwise.
        assert rel_err(out, expected) < 1e-5
        it = state["intermediates"]
        np.testing.assert_allclose(it["reweighting"]["weights"][0], 1.0, rtol=1e-5)
        assert it["reweighting"]["weights"][0].shape == (3, 2, 6, 6)
        assert it["reweighting"]["reweighted"][0].shape == (3, 2, 6, 6, 8)
    assert set(variables["params"]["reweighting"]) == {"log_beta"} and "batch_stats" not in variables


@pytest.mark.parametrize("beta, c", [(0.5, None), (0.7, 2.0), (1.6, 0.0)])
def test_reweighted_covariance_float64_matches_numpy_eqn9(x64, beta, c):
    x = features(1, (2, 36, 8)).astype(np.float64)
    sigma, weights = mggd.reweighted_covariance(x, num_steps=2, beta=beta, c=c, num_iters=5)
    assert sigma.dtype == jnp.float64 and sigma.shape == (2, 8, 8) and weights.shape == (2, 2, 36)
    for b in range(2):
        expected_sigma, expected_w = np_eqn9(x[b], 2, beta, c, num_iters=5)
        assert rel_err(sigma[b], expected_sigma) < 1e-11
        assert rel_err(weights[:, b], expected_w) < 1e-11
    assert np.ptp(np.asarray(weights)) > 0.1  # the weights do something
    if beta != 0.5:
        return
    # With enough Newton-Schulz iterations, Y = X^T Sigma^-1 X with the exact inverse.
    sigma, _ = mggd.reweighted_covariance(x, num_steps=2, beta=beta, c=c, num_iters=30)
    expected_sigma, _ = np_eqn9(x[0], 2, beta, c, inv_sqrt=np_inv_sqrt_eigh)
    assert rel_err(sigma[0], expected_sigma) < 1e-9
    # T = 0 is the plain covariance.
    sigma0, weights0 = mggd.reweighted_covariance(x, num_steps=0, beta=beta, c=c)
    np.testing.assert_allclose(sigma0, linalg.covariance(x), rtol=1e-14)
    assert weights0.shape == (0, 2, 36)


def test_exact_head_float32_matches_numpy_float64():
    x = features(2)
    for beta, c in ((0.5, None), (0.8, 3.0)):
        head = layers.GeneralizedGaussianCovariance(num_blocks=2, reweighting="exact", exact_beta=beta, exact_c=c)
        out = _apply(head)({}, x)
        assert out.dtype == jnp.float32 and out.shape == (2, 36)
        assert rel_err(out, np_head(x, 2, beta, c)) < 1e-4
    # More channels than positions (N = 9 < C = 16): Sigma is singular up to eps; the truncated
    # Newton-Schulz inverse root stays finite, and so does everything after it.
    x = features(3, (1, 3, 3, 16))
    head = layers.GeneralizedGaussianCovariance(num_blocks=3, reweighting="exact", exact_beta=0.5)
    out = _apply(head)({}, x)
    assert np.all(np.isfinite(out)) and rel_err(out, np_head(x, 3, 0.5)) < 1e-3


def test_learned_beta_and_c_get_gradients():
    x = features(4)
    head = layers.GeneralizedGaussianCovariance(num_blocks=2, reweighting="exact", exact_c=2.0, exact_learn_c=True)
    variables = jax.jit(functools.partial(head.init, train=False))(jax.random.PRNGKey(0), x)
    params = variables["params"]["reweighting"]
    assert set(params) == {"log_beta", "log_c"}
    np.testing.assert_allclose(params["log_beta"], 0.0)
    np.testing.assert_allclose(params["log_c"], np.log(2.0), rtol=1e-6)

    def loss(params, x):
        out = head.apply({"params": params}, x, train=True)
        return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.shape[-1]))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    for name in ("log_beta", "log_c"):
        g = grads[0]["reweighting"][name]
        assert np.isfinite(g) and g != 0, name
    assert np.all(np.isfinite(grads[1])) and np.any(grads[1] != 0)


def test_option_errors():
    """Refused when the head is constructed, before any variable exists, naming the option."""
    for kwargs, match in (
        (dict(exact_beta=0.0), "exact_beta=0.0 must be None .learned. or a number > 0"),
        (dict(exact_c=-1.0), "exact_c=-1.0 must be None"),
        (dict(exact_learn_c=True), "exact_learn_c=True needs the initial exact_c > 0"),
        (dict(exact_num_iters=0), "exact_num_iters=0 must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            layers.GeneralizedGaussianCovariance(num_blocks=1, reweighting="exact", **kwargs)
    with pytest.raises(ValueError, match="exact_beta only applies with reweighting='exact'"):
        layers.GeneralizedGaussianCovariance(exact_beta=0.5)


def test_models_create_passes_the_exact_options():
    for option in ("reweighting", "exact_beta", "exact_c", "exact_learn_c", "exact_num_iters"):
        assert option in models.options("resnet50_3g")
    model = models.create("resnet18_3g", num_classes=10, reweighting="exact", exact_beta=0.5, reduction_dim=16)
    images = jax.ShapeDtypeStruct((2, 48, 48, 3), jnp.float32)
    shapes = jax.eval_shape(lambda rng, x: model.init(rng, x, train=False), jax.random.PRNGKey(0), images)
    assert set(shapes["params"]["head"]) == {"reduce"}  # no learned re-weighting parameters
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, images)
    assert logits.shape == (2, 10)
    learned = models.create("resnet18_3g", num_classes=10, reweighting="exact", reduction_dim=16)
    shapes = jax.eval_shape(lambda rng, x: learned.init(rng, x, train=False), jax.random.PRNGKey(0), images)
    assert shapes["params"]["head"]["reweighting"]["log_beta"].shape == ()


def _dot_lines(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return [line for line in text.splitlines() if "dot_general" in line or "stablehlo.dot " in line]


def test_matmuls_use_highest_precision():
    """Every matmul of the exact re-weighting and of gg_jax.mggd, forward (bf16 input) and backward,
    is a float32 dot_general at precision HIGHEST (as test_linalg checks for gg_jax.linalg)."""
    x = jnp.asarray(features(6, (2, 16, 4)))
    head = layers.GeneralizedGaussianCovariance(num_blocks=2, reweighting="exact", exact_c=1.0, exact_learn_c=True)
    params = {"params": {"reweighting": {"log_beta": jnp.float32(-0.5), "log_c": jnp.float32(0.0)}}}
    nhwc = x.reshape(2, 4, 4, 4)
    sigma = jnp.asarray(np.stack([np.eye(4)] * 2), jnp.float32)
    params_mggd = mggd.MGGD(sigma, jnp.full(2, 0.7), jnp.ones(2))
    programs = {
        "reweighted_covariance bf16": (
            lambda x: mggd.reweighted_covariance(x, num_steps=2, beta=0.5),
            x.astype(jnp.bfloat16),
        ),
        "head grad": (jax.grad(lambda v: jnp.sum(jnp.sin(head.apply(v, nhwc, train=False)))), params),
        "head input grad": (jax.grad(lambda x: jnp.sum(jnp.sin(head.apply(params, x, train=False)))), nhwc),
        "fit": (lambda x: mggd.fit(x), x),
        "fit lam": (lambda x: mggd.fit(x, lam=0.5), x),
        "log_prob grad": (jax.grad(lambda x: jnp.sum(mggd.log_prob(x, params_mggd))), x.astype(jnp.bfloat16)),
        "sample": (lambda k: mggd.sample(k, params_mggd, 5), jax.random.PRNGKey(0)),
    }
    checked = 0
    for label, (fn, arg) in programs.items():
        for line in _dot_lines(fn, arg):
            assert "precision = [HIGHEST, HIGHEST]" in line, (label, line)
            assert "bf16" not in line and "f16" not in line, (label, line)
            checked += 1
    assert checked >= 20, checked
