"""gg_jax.linalg against float64 NumPy/SciPy references, properties and gradients.

Float64 checks run inside `jax.enable_x64(True)` (the `x64` fixture), which restores the
previous setting afterwards, so no other test sees 64-bit mode; gg_jax.linalg keeps
float64 input in float64, so those comparisons are at ~1e-12. The float32 path (what the
models run) is compared against the same float64 references with float32 tolerances.

The closed-form backward of the square-root covariance layer (paper Eqns. 15-18, the
iSQRT-COV backward) is implemented here in NumPy float64 as an oracle independent of
JAX's autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.test_util import check_grads

from gg_jax import linalg
from tests.helpers import rel_err


def random_features(rng, shape):
    return rng.standard_normal(shape)


def random_spd(rng, batch, c, ridge=0.1):
    """`[*batch, c, c]` SPD matrices: sample covariances of 4c points plus a ridge."""
    n = 4 * c
    m = rng.standard_normal(tuple(batch) + (n, c))
    return np.swapaxes(m, -1, -2) @ m / n + ridge * np.eye(c)


def np_covariance(x, eps=1e-7):
    xc = x - x.mean(axis=-2, keepdims=True)
    return np.swapaxes(xc, -1, -2) @ xc / x.shape[-2] + eps * np.eye(x.shape[-1])


def np_newton_schulz(a, num_iters):
    """The reference's iSQRT in float64 NumPy: every iterate, plain loop, no shortcuts.

    Returns (sqrt, inv_sqrt, ys, zs, ts, trace) with ys[k], zs[k] = Y_k, Z_k (k = 0..K).
    """
    eye = np.eye(a.shape[-1])
    tr = np.trace(a, axis1=-2, axis2=-1)[..., None, None]
    y, z = a / tr, np.broadcast_to(eye, a.shape)
    ys, zs, ts = [y], [z], []
    for _ in range(num_iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
        ys.append(y)
        zs.append(z)
        ts.append(t)
    return y * np.sqrt(tr), z / np.sqrt(tr), ys, zs, ts, tr


def scipy_sqrtm(a):
    out = np.stack([scipy.linalg.sqrtm(m) for m in a.reshape((-1,) + a.shape[-2:])])
    return np.real(out).reshape(a.shape)


def scipy_power(a, p):
    out = np.stack([scipy.linalg.fractional_matrix_power(m, p) for m in a.reshape((-1,) + a.shape[-2:])])
    return np.real(out).reshape(a.shape)


def vec_order(c, lower):
    """(i, j) pairs of the vectorisation, by definition: row-major, i >= j (or i <= j)."""
    return [(i, j) for i in range(c) for j in range(c) if (i >= j if lower else i <= j)]


# --------------------------------------------------------------------------- covariance
def test_covariance_float64_matches_numpy(x64):
    x = random_features(np.random.default_rng(0), (2, 3, 20, 6))
    s = linalg.covariance(x, eps=1e-3)
    assert s.dtype == jnp.float64 and s.shape == (2, 3, 6, 6)
    assert rel_err(s, np_covariance(x, 1e-3)) < 1e-13
    # Same as NumPy's biased covariance (divide by N) of the positions.
    assert rel_err(s[1, 2], np.cov(x[1, 2], rowvar=False, bias=True) + 1e-3 * np.eye(6)) < 1e-13


def test_covariance_float32_matches_float64_reference():
    x = random_features(np.random.default_rng(1), (3, 49, 16))
    s = linalg.covariance(x.astype(np.float32))
    assert s.dtype == jnp.float32
    assert rel_err(s, np_covariance(x)) < 2e-6


def test_covariance_rejects_vectors():
    with pytest.raises(ValueError, match=r"\[\.\.\., N, C\]"):
        linalg.covariance(jnp.ones(5))


# ------------------------------------------------------------------------ Newton-Schulz
@pytest.mark.parametrize("num_iters", [1, 2, 5])
def test_newton_schulz_float64_matches_numpy_iteration(x64, num_iters):
    a = random_spd(np.random.default_rng(2), (2,), 8)
    sqrt_ref, inv_ref, *_ = np_newton_schulz(a, num_iters)
    sqrt = linalg.sqrtm_newton_schulz(a, num_iters)
    sqrt2, inv = linalg.sqrtm_newton_schulz(a, num_iters, return_inverse=True)
    inv2 = linalg.inv_sqrtm_newton_schulz(a, num_iters)
    assert sqrt.dtype == inv.dtype == inv2.dtype == jnp.float64
    assert rel_err(sqrt, sqrt_ref) < 1e-13
    assert rel_err(inv, inv_ref) < 1e-13
    # Three functions, three compiled iterations: equal to float64 rounding.
    np.testing.assert_allclose(sqrt2, sqrt, rtol=1e-14, atol=0)
    np.testing.assert_allclose(inv2, inv, rtol=1e-14, atol=0)


def test_newton_schulz_float32_matches_numpy_iteration():
    a = random_spd(np.random.default_rng(3), (3,), 32)
    sqrt_ref, inv_ref, *_ = np_newton_schulz(a, 5)
    sqrt, inv = linalg.sqrtm_newton_schulz(a.astype(np.float32), 5, return_inverse=True)
    assert sqrt.dtype == inv.dtype == jnp.float32
    assert rel_err(sqrt, sqrt_ref) < 1e-5
    assert rel_err(inv, inv_ref) < 1e-5


def test_newton_schulz_converges_to_scipy_sqrtm(x64):
    a = random_spd(np.random.default_rng(4), (2,), 16)
    root, inv = linalg.sqrtm_newton_schulz(a, 20, return_inverse=True)
    expected = scipy_sqrtm(a)
    assert rel_err(root, expected) < 1e-12
    assert rel_err(inv, np.linalg.inv(expected)) < 1e-12
    assert rel_err(linalg.inv_sqrtm_newton_schulz(a, 20), np.linalg.inv(expected)) < 1e-12


def test_newton_schulz_float32_converged_properties():
    """Symmetry, root @ root == a, root @ inv == I for converged float32 iterations."""
    a = random_spd(np.random.default_rng(5), (4,), 24)
    root, inv = linalg.sqrtm_newton_schulz(a.astype(np.float32), 15, return_inverse=True)
    root, inv = np.asarray(root, np.float64), np.asarray(inv, np.float64)
    assert rel_err(root, np.swapaxes(root, -1, -2)) < 1e-6
    assert rel_err(inv, np.swapaxes(inv, -1, -2)) < 1e-6
    assert rel_err(root @ root, a) < 1e-5
    assert rel_err(root @ inv, np.broadcast_to(np.eye(24), a.shape)) < 1e-5
    assert rel_err(inv @ a @ inv, np.broadcast_to(np.eye(24), a.shape)) < 1e-5
    assert rel_err(root, scipy_sqrtm(a)) < 1e-5


def test_newton_schulz_error_decreases_with_iterations(x64):
    a = random_spd(np.random.default_rng(6), (2,), 16)
    expected = scipy_sqrtm(a)
    errs = [rel_err(linalg.sqrtm_newton_schulz(a, k), expected) for k in range(1, 12)]
    # Strictly decreasing until machine precision, quadratically at the end.
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:]) if e0 > 1e-12), errs
    assert errs[0] > 0.1 and errs[-1] < 1e-12, errs
    inv_errs = [rel_err(linalg.inv_sqrtm_newton_schulz(a, k), np.linalg.inv(expected)) for k in range(1, 12)]
    assert all(e1 < e0 for e0, e1 in zip(inv_errs, inv_errs[1:]) if e0 > 1e-12), inv_errs


def _count_matmuls(jaxpr, mult=1):
    """dot_generals executed by a jaxpr, counting scan bodies `length` times."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            n += mult
        inner = mult * eqn.params["length"] if eqn.primitive.name == "scan" else mult
        for v in eqn.params.values():
            sub = getattr(v, "jaxpr", v)
            if hasattr(sub, "eqns"):
                n += _count_matmuls(sub, inner)
    return n


@pytest.mark.parametrize("num_iters", [2, 3, 5, 12])
def test_newton_schulz_is_a_scan_and_skips_free_matmuls(num_iters):
    """A lax.scan (graph size independent of K); Z_0 = I saves two matmuls in the first
    iteration and the unused last Y or Z update is not computed: 3K - 3 matmuls."""
    a = jnp.eye(6)
    jx = lambda f: jax.make_jaxpr(f)(a).jaxpr  # noqa: E731
    sqrt_only = jx(lambda a: linalg.sqrtm_newton_schulz(a, num_iters))
    both = jx(lambda a: linalg.sqrtm_newton_schulz(a, num_iters, return_inverse=True))
    inv_only = jx(lambda a: linalg.inv_sqrtm_newton_schulz(a, num_iters))
    naive = 3 * num_iters
    assert _count_matmuls(sqrt_only) == naive - 3
    assert _count_matmuls(inv_only) == naive - 3
    assert _count_matmuls(both) == naive - 2
    assert any(e.primitive.name == "scan" for e in sqrt_only.eqns)
    if num_iters > 2:
        assert len(sqrt_only.eqns) == len(jx(lambda a: linalg.sqrtm_newton_schulz(a, 2 * num_iters)).eqns)


def test_newton_schulz_bad_arguments():
    with pytest.raises(ValueError, match="num_iters"):
        linalg.sqrtm_newton_schulz(jnp.eye(3), 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., C, C\].*\(3, 4\)"):
        linalg.sqrtm_newton_schulz(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\[\.\.\., C, C\]"):
        linalg.sqrtm_eigh(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\[\.\.\., C, C\]"):
        linalg.triu_vector(jnp.ones(3))


# ------------------------------------------------------------------------------- eigh
@pytest.mark.parametrize("power", [0.5, 1.0, 0.25, -0.5, 2.0])
def test_sqrtm_eigh_matches_scipy_fractional_power(x64, power):
    a = random_spd(np.random.default_rng(7), (2, 2), 8)
    out = linalg.sqrtm_eigh(a, power)
    assert out.dtype == jnp.float64
    assert rel_err(out, scipy_power(a, power)) < 1e-11


def test_sqrtm_eigh_float32_properties():
    a = random_spd(np.random.default_rng(8), (3,), 32)
    root = np.asarray(linalg.sqrtm_eigh(a.astype(np.float32)), np.float64)
    assert rel_err(root, np.swapaxes(root, -1, -2)) < 1e-6
    assert rel_err(root @ root, a) < 1e-5
    assert rel_err(root, scipy_sqrtm(a)) < 1e-5
    assert rel_err(linalg.sqrtm_eigh(a.astype(np.float32)), linalg.sqrtm_newton_schulz(a.astype(np.float32), 15)) < 1e-5


def _with_repeated_eigenvalues(rng, eigenvalues):
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues),) * 2))
    return (q * np.asarray(eigenvalues)) @ q.T


def test_sqrtm_eigh_gradient_finite_for_repeated_eigenvalues(x64):
    rng = np.random.default_rng(9)
    g = rng.standard_normal((5, 5))
    for p in (0.5, -0.5):
        # At a multiple of I, d(A^p)[E] = p * c^(p-1) * sym(E): the exact gradient is known.
        grad = jax.grad(lambda a, p=p: jnp.sum(linalg.sqrtm_eigh(a, p) * g))(2.0 * jnp.eye(5))
        assert rel_err(grad, p * 2.0 ** (p - 1) * 0.5 * (g + g.T)) < 1e-12
    # A triple eigenvalue: the gradient matches finite differences and the derivative of
    # a converged Newton-Schulz iteration (which never forms eigenvectors).
    a = _with_repeated_eigenvalues(rng, [1.0, 1.0, 1.0, 2.0, 3.0])
    check_grads(lambda a: linalg.sqrtm_eigh(a, 0.5), (a,), order=1, modes=("rev",))
    grad = jax.grad(lambda a: jnp.sum(linalg.sqrtm_eigh(a) * g))(a)
    grad_ns = jax.grad(lambda a: jnp.sum(linalg.sqrtm_newton_schulz(a, 30) * g))(a)
    assert np.isfinite(grad).all()
    assert rel_err(grad, 0.5 * (grad_ns + grad_ns.T)) < 1e-10


def test_sqrtm_eigh_float32_gradient_finite_at_identity_like_covariance():
    x = jnp.zeros((2, 10, 6), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(linalg.sqrtm_eigh(linalg.covariance(x + 1.0)) ** 2))(x)
    assert np.isfinite(grad).all()


# -------------------------------------------------------------------- robust estimator
def test_regularized_sqrtm_lam_one_is_plain_root(x64):
    a = random_spd(np.random.default_rng(10), (2,), 8)
    np.testing.assert_array_equal(linalg.regularized_sqrtm(a, 1.0), linalg.sqrtm_newton_schulz(a, 5))
    np.testing.assert_array_equal(linalg.regularized_sqrtm(a, 1.0, num_iters=3), linalg.sqrtm_newton_schulz(a, 3))
    np.testing.assert_array_equal(linalg.regularized_sqrtm(a, 1.0, method="eigh"), linalg.sqrtm_eigh(a, 0.5))


@pytest.mark.parametrize("lam", [0.9, 0.5, 0.1])
def test_regularized_sqrtm_matches_theorem_1(x64, lam):
    """sqrt(c^2 I + a/lam) - c I, c = (1 - lam)/lam, by SciPy; it solves the estimating
    equation lam R^2 + 2 (1 - lam) R = a of Theorem 1 (same eigenvectors as a)."""
    a = random_spd(np.random.default_rng(11), (2,), 8)
    c = (1.0 - lam) / lam
    eye = np.eye(8)
    expected = scipy_sqrtm(c * c * eye + a / lam) - c * eye
    r_eigh = linalg.regularized_sqrtm(a, lam, method="eigh")
    r_ns = linalg.regularized_sqrtm(a, lam, method="newton_schulz", num_iters=25)
    assert r_eigh.dtype == r_ns.dtype == jnp.float64
    assert rel_err(r_eigh, expected) < 1e-11
    assert rel_err(r_ns, expected) < 1e-11
    assert rel_err(lam * expected @ expected + 2 * (1 - lam) * expected, a) < 1e-11
    # Few iterations: exactly Newton-Schulz of the shifted matrix, minus c I.
    r5 = linalg.regularized_sqrtm(a, lam, num_iters=5)
    assert rel_err(r5, np_newton_schulz(c * c * eye + a / lam, 5)[0] - c * eye) < 1e-13


def test_regularized_sqrtm_float32():
    a = random_spd(np.random.default_rng(12), (2,), 16)
    lam = 0.5
    out = linalg.regularized_sqrtm(a.astype(np.float32), lam, num_iters=15)
    assert out.dtype == jnp.float32
    assert rel_err(out, scipy_sqrtm(a / lam + np.eye(16)) - np.eye(16)) < 1e-5


def test_regularized_sqrtm_bad_arguments():
    for lam in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"lam must lie in \(0, 1\]"):
            linalg.regularized_sqrtm(jnp.eye(3), lam)
    with pytest.raises(ValueError, match="newton_schulz"):
        linalg.regularized_sqrtm(jnp.eye(3), 0.5, method="svd")


# ----------------------------------------------------------------------- vectorisation
@pytest.mark.parametrize("c", [1, 3, 7])
def test_triu_indices_orders(c):
    for lower in (True, False):
        idx = linalg.triu_indices(c, lower)
        assert idx.shape == (c * (c + 1) // 2,) and not idx.flags.writeable
        assert idx.tolist() == [i * c + j for i, j in vec_order(c, lower)]
    # i >= j row-major starts (0,0), (1,0), (1,1), (2,0), as in the reference checkpoints.
    if c >= 3:
        assert vec_order(c, True)[:4] == [(0, 0), (1, 0), (1, 1), (2, 0)]


def test_triu_vector_both_orders(x64):
    rng = np.random.default_rng(13)
    a = rng.standard_normal((2, 3, 5, 5))  # not symmetric: the order is visible
    for lower in (True, False):
        v = linalg.triu_vector(a, lower=lower)
        assert v.dtype == jnp.float64 and v.shape == (2, 3, 15)
        expected = np.stack([a[..., i, j] for i, j in vec_order(5, lower)], axis=-1)
        np.testing.assert_array_equal(v, expected)
    assert linalg.triu_vector(a).shape == (2, 3, 15)  # default: the reference order
    np.testing.assert_array_equal(linalg.triu_vector(a), linalg.triu_vector(a, lower=True))
    # For symmetric matrices the orders hold the same values, permuted.
    s = a + np.swapaxes(a, -1, -2)
    np.testing.assert_array_equal(np.sort(linalg.triu_vector(s), -1), np.sort(linalg.triu_vector(s, lower=False), -1))
    il, iu = np.tril_indices(5), np.triu_indices(5)
    np.testing.assert_array_equal(linalg.triu_vector(s), s[..., il[0], il[1]])
    np.testing.assert_array_equal(linalg.triu_vector(s, lower=False), s[..., iu[0], iu[1]])


def test_triu_vector_gradient_scatters_back(x64):
    a = np.random.default_rng(14).standard_normal((2, 4, 4))
    w = np.random.default_rng(15).standard_normal((2, 10))
    grad = jax.grad(lambda a: jnp.sum(linalg.triu_vector(a) * w))(a)
    expected = np.zeros((2, 4, 4))
    for k, (i, j) in enumerate(vec_order(4, True)):
        expected[:, i, j] = w[:, k]
    np.testing.assert_array_equal(grad, expected)
    check_grads(lambda a: linalg.triu_vector(a, lower=False), (a,), order=2)


# ---------------------------------------------------------------------- small pieces
def test_signed_sqrt_and_l2_normalize(x64):
    x = np.random.default_rng(16).standard_normal((3, 10)) * 4
    x[0, :3] = 0.0
    np.testing.assert_allclose(linalg.signed_sqrt(x), np.sign(x) * np.sqrt(np.abs(x) + 1e-8), rtol=1e-14, atol=0)
    np.testing.assert_allclose(linalg.l2_normalize(x), x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(linalg.l2_normalize(x, axis=0), x / np.linalg.norm(x, axis=0, keepdims=True), rtol=1e-14)
    # Zero vectors stay zero (no 0/0), and gradients at 0 are finite.
    np.testing.assert_array_equal(linalg.l2_normalize(np.zeros((2, 4))), np.zeros((2, 4)))
    assert np.isfinite(jax.grad(lambda x: jnp.sum(linalg.signed_sqrt(x) * 2.0))(np.zeros(4))).all()
    assert np.isfinite(jax.grad(lambda x: jnp.sum(linalg.l2_normalize(x) * np.arange(4.0)))(np.zeros(4))).all()


def test_gaussian_embedding_matrix(x64):
    x = np.random.default_rng(17).standard_normal((2, 30, 5)) + 0.7
    m = linalg.gaussian_embedding_matrix(x, eps=1e-3)
    assert m.dtype == jnp.float64 and m.shape == (2, 6, 6)
    mu = x.mean(axis=1)
    s = np_covariance(x, 1e-3)
    expected = np.zeros((2, 6, 6))
    expected[:, :5, :5] = s + mu[:, :, None] * mu[:, None, :]
    expected[:, :5, 5] = expected[:, 5, :5] = mu
    expected[:, 5, 5] = 1.0
    assert rel_err(m, expected) < 1e-13
    # SPD, and its Schur complement is S: det(M) = det(S).
    assert (np.linalg.eigvalsh(np.asarray(m)) > 0).all()
    np.testing.assert_allclose(np.linalg.det(m), np.linalg.det(s), rtol=1e-10)


# ------------------------------------------------------------------------- gradients
def test_check_grads_float64(x64):
    """Autodiff against finite differences (jitted: eager scans are slow to dispatch)."""
    rng = np.random.default_rng(18)
    x = rng.standard_normal((2, 9, 4))
    a = random_spd(rng, (2,), 4)
    jit = jax.jit
    check_grads(jit(lambda x: linalg.covariance(x)), (x,), order=2)
    check_grads(jit(lambda a: linalg.sqrtm_newton_schulz(a, 5)), (a,), order=1)
    check_grads(jit(lambda a: linalg.sqrtm_newton_schulz(a, 3, return_inverse=True)), (a,), order=1)
    check_grads(jit(lambda a: linalg.inv_sqrtm_newton_schulz(a, 4)), (a,), order=1)
    check_grads(jit(lambda a: linalg.regularized_sqrtm(a, 0.5)), (a,), order=1)
    check_grads(jit(lambda a: linalg.regularized_sqrtm(a, 0.5, method="eigh")), (a,), order=1, modes=("rev",))
    for p in (0.5, -0.5, 1.5):
        check_grads(jit(lambda a, p=p: linalg.sqrtm_eigh(a, p)), (a,), order=1, modes=("rev",))
    check_grads(jit(lambda x: linalg.gaussian_embedding_matrix(x)), (x,), order=1)
    check_grads(jit(lambda x: linalg.signed_sqrt(x)), (x + np.sign(x),), order=1)  # away from 0
    check_grads(jit(lambda x: linalg.l2_normalize(x)), (x,), order=1)
    check_grads(jit(lambda x: linalg.triu_vector(linalg.sqrtm_newton_schulz(linalg.covariance(x), 5))), (x,), order=1)


def paper_sqrt_backward(s, grad_out, num_iters):
    """dl/dS of iSQRT, paper Eqns. 15-17 (iSQRT-COV's backward), NumPy float64.

    With Q_k = Y_k, P_k = Z_k of the forward iteration (Q_0 = S/tr S, P_0 = I):
      (15) dl/dQ_K = sqrt(tr S) dl/dR;  dl/dS|post = tr((dl/dR)^T Q_K) / (2 sqrt(tr S)) I
      (16) dl/dQ_{k-1} = 1/2 [dl/dQ_k (3I - Q_{k-1}P_{k-1}) - P_{k-1} dl/dP_k P_{k-1}
                              - P_{k-1}Q_{k-1} dl/dQ_k]
           dl/dP_{k-1} = 1/2 [(3I - Q_{k-1}P_{k-1}) dl/dP_k - Q_{k-1} dl/dQ_k Q_{k-1}
                              - dl/dP_k P_{k-1}Q_{k-1}]
           dl/dQ_0 = 1/2 [dl/dQ_1 (3I - Q_0) - dl/dP_1 - Q_0 dl/dQ_1]
      (17) dl/dS = -tr((dl/dQ_0)^T S)/(tr S)^2 I + dl/dQ_0 / tr S + dl/dS|post
    P_K is not an output, so dl/dP_K = 0.
    """
    _, _, qs, ps, _, tr = np_newton_schulz(s, num_iters)
    eye = np.eye(s.shape[-1])
    inner = lambda a, b: np.sum(a * b, axis=(-2, -1))[..., None, None]  # tr(a^T b)  # noqa: E731
    root_tr = np.sqrt(tr)
    g_q = root_tr * grad_out
    g_post = inner(grad_out, qs[-1]) / (2.0 * root_tr) * eye
    g_p = np.zeros_like(g_q)
    for k in range(num_iters, 1, -1):
        q, p = qs[k - 1], ps[k - 1]
        g_q, g_p = (
            0.5 * (g_q @ (3.0 * eye - q @ p) - p @ g_p @ p - p @ q @ g_q),
            0.5 * ((3.0 * eye - q @ p) @ g_p - q @ g_q @ q - g_p @ p @ q),
        )
    q0 = qs[0]
    g_q0 = 0.5 * (g_q @ (3.0 * eye - q0) - g_p - q0 @ g_q)
    g_s = -inner(g_q0, s) / tr**2 * eye + g_q0 / tr + g_post
    return g_s


def paper_covariance_backward(x, grad_s):
    """dl/dX of S = X^T J X / N (J = I - 11^T/N centres the N positions), Eqn. 18:
    dl/dX = J X (dl/dS + (dl/dS)^T) / N for X of shape [N, C]."""
    n = x.shape[-2]
    xc = x - x.mean(axis=-2, keepdims=True)  # = J X
    return xc @ (grad_s + np.swapaxes(grad_s, -1, -2)) / n


@pytest.mark.parametrize("num_iters", [1, 2, 5])
def test_sqrt_layer_autodiff_matches_paper_closed_form_backward(x64, num_iters):
    rng = np.random.default_rng(19 + num_iters)
    s = random_spd(rng, (3,), 12)
    g = rng.standard_normal((3, 12, 12))  # a general (non-symmetric) cotangent
    auto = jax.grad(lambda s: jnp.sum(linalg.sqrtm_newton_schulz(s, num_iters) * g))(s)
    assert rel_err(auto, paper_sqrt_backward(s, g, num_iters)) < 1e-10


def test_covariance_sqrt_vector_gradient_matches_paper_backward():
    """Features -> covariance -> iSQRT -> i >= j vector: autodiff against Eqns. 15-18,
    in float64 and in float32 (what training runs)."""
    rng = np.random.default_rng(23)
    x = rng.standard_normal((2, 49, 16)) * rng.uniform(0.5, 2.0, 16) + 0.3
    w = rng.standard_normal((2, 16 * 17 // 2))
    grad_r = np.zeros((2, 16, 16))
    for k, (i, j) in enumerate(vec_order(16, True)):
        grad_r[:, i, j] = w[:, k]  # the vectorisation's cotangent: lower triangle only
    expected = paper_covariance_backward(x, paper_sqrt_backward(np_covariance(x), grad_r, 5))

    def loss(x):
        return jnp.sum(linalg.triu_vector(linalg.sqrtm_newton_schulz(linalg.covariance(x), 5)) * w)

    with jax.enable_x64(True):
        g64 = jax.grad(loss)(x)
        assert g64.dtype == jnp.float64
        assert rel_err(g64, expected) < 1e-10
    g32 = jax.grad(loss)(x.astype(np.float32))
    assert g32.dtype == jnp.float32
    assert rel_err(g32, expected) < 1e-4


# -------------------------------------------------------------- dtypes, zeros and NaN
# name -> (function, kind of input): "features" [2, 12, 6], "spd" [2, 6, 6], "vectors" [2, 6].
FUNCTIONS = {
    "covariance": (linalg.covariance, "features"),
    "sqrtm_newton_schulz": (lambda a: linalg.sqrtm_newton_schulz(a, 5, return_inverse=True), "spd"),
    "inv_sqrtm_newton_schulz": (linalg.inv_sqrtm_newton_schulz, "spd"),
    "sqrtm_eigh": (linalg.sqrtm_eigh, "spd"),
    "regularized_sqrtm": (lambda a: linalg.regularized_sqrtm(a, 0.5), "spd"),
    "regularized_sqrtm_eigh": (lambda a: linalg.regularized_sqrtm(a, 0.5, method="eigh"), "spd"),
    "triu_vector": (linalg.triu_vector, "spd"),
    "signed_sqrt": (linalg.signed_sqrt, "vectors"),
    "l2_normalize": (linalg.l2_normalize, "vectors"),
    "gaussian_embedding_matrix": (linalg.gaussian_embedding_matrix, "features"),
}


def make_input(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "features":
        return rng.standard_normal((2, 12, 6)).astype(np.float32)
    if kind == "spd":
        return random_spd(rng, (2,), 6).astype(np.float32)
    return rng.standard_normal((2, 6)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_narrow_input_computes_in_float32(name):
    """bf16/f16 input -> float32 output, equal to the float32 path on the same values."""
    fn, kind = FUNCTIONS[name]
    x = make_input(kind)
    for narrow in (jnp.bfloat16, jnp.float16):
        xn = jnp.asarray(x, narrow)
        out, ref = fn(xn), fn(xn.astype(jnp.float32))
        for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            assert o.dtype == jnp.float32, (name, narrow)
            np.testing.assert_array_equal(o, r)


def test_float64_kept_only_for_float64(x64):
    a = random_spd(np.random.default_rng(25), (), 4)
    assert linalg.sqrtm_newton_schulz(a).dtype == jnp.float64
    assert linalg.sqrtm_newton_schulz(a.astype(np.float32)).dtype == jnp.float32
    assert linalg.compute_dtype(jnp.float64) == jnp.float64
    for dt in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32):
        assert linalg.compute_dtype(dt) == jnp.float32


def test_all_zero_features_give_finite_output_and_gradient():
    x = jnp.zeros((2, 16, 8), jnp.float32)
    s = linalg.covariance(x)
    np.testing.assert_array_equal(s, np.broadcast_to(1e-7 * np.eye(8, dtype=np.float32), (2, 8, 8)))
    eye = np.broadcast_to(np.eye(8), (2, 8, 8))
    # eps * I: every root is finite and what it should be.
    assert rel_err(linalg.sqrtm_newton_schulz(s), np_newton_schulz(np.asarray(s, np.float64), 5)[0]) < 1e-5
    assert rel_err(linalg.sqrtm_eigh(s), np.sqrt(1e-7) * eye) < 1e-5
    assert np.isfinite(linalg.regularized_sqrtm(s, 0.5)).all()
    assert np.isfinite(linalg.sqrtm_newton_schulz(linalg.gaussian_embedding_matrix(x))).all()
    assert np.isfinite(linalg.l2_normalize(linalg.signed_sqrt(s.reshape(2, -1)))).all()
    for root in (linalg.sqrtm_newton_schulz, linalg.sqrtm_eigh):
        g = jax.grad(lambda x, root=root: jnp.sum(linalg.triu_vector(root(linalg.covariance(x)))))(x)
        assert np.isfinite(g).all()


def test_nan_input_propagates():
    rng = np.random.default_rng(26)
    x = rng.standard_normal((2, 12, 6)).astype(np.float32)
    x[0, 3, 2] = np.nan
    s = np.asarray(linalg.covariance(x))
    # NaN reaches exactly the entries that depend on channel 2 of sample 0.
    nan_mask = np.zeros((2, 6, 6), bool)
    nan_mask[0, 2, :] = nan_mask[0, :, 2] = True
    np.testing.assert_array_equal(np.isnan(s), nan_mask)
    for root in (
        linalg.sqrtm_newton_schulz,
        linalg.inv_sqrtm_newton_schulz,
        linalg.sqrtm_eigh,
        lambda a: linalg.regularized_sqrtm(a, 0.5),
        lambda a: linalg.regularized_sqrtm(a, 0.5, method="eigh"),
    ):
        out = np.asarray(root(s))
        assert np.isnan(out[0]).any(), root  # reported, not turned into numbers
        assert np.isfinite(out[1]).all()
    v = np.asarray(linalg.triu_vector(linalg.sqrtm_newton_schulz(s)))
    assert np.isnan(v[0]).all() and np.isfinite(v[1]).all()
    assert np.isnan(linalg.signed_sqrt(np.float32(np.nan)))
    assert np.isnan(linalg.l2_normalize(x[:, 3])[0]).all()
    assert np.isnan(linalg.gaussian_embedding_matrix(x)[0]).any()


# ------------------------------------------------------------- precision, jit and vmap
def _dot_lines(fn, *args):
    text = jax.jit(fn).lower(*args).as_text()
    return [line for line in text.splitlines() if "dot_general" in line or "stablehlo.dot " in line]


def test_matmuls_use_highest_precision():
    """Every matmul of every function, forward and backward, is a float32 (never bf16)
    dot_general at precision HIGHEST, also for bf16 input."""
    checked = 0
    for name, (fn, kind) in FUNCTIONS.items():
        x = make_input(kind)
        programs = {
            "forward bf16": (fn, jnp.asarray(x, jnp.bfloat16)),
            "grad": (jax.grad(lambda v, fn=fn: sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(fn(v)))), x),
        }
        for label, (f, arg) in programs.items():
            for line in _dot_lines(f, arg):
                assert "precision = [HIGHEST, HIGHEST]" in line, (name, label, line)
                assert "bf16" not in line and "f16" not in line, (name, label, line)
                checked += 1
    assert checked >= 40, checked
    # The check can fail: a default-precision matmul does not pass it.
    a = make_input("spd")
    (plain,) = _dot_lines(lambda a: a @ a, a)
    assert "HIGHEST" not in plain


def test_jit_and_vmap_agree_with_batched_calls():
    rng = np.random.default_rng(28)
    x = jnp.asarray(rng.standard_normal((3, 20, 8)), jnp.float32)

    def pipeline(x):
        s = linalg.covariance(x)
        return (
            linalg.triu_vector(linalg.sqrtm_newton_schulz(s, 5)),
            linalg.inv_sqrtm_newton_schulz(s, 5),
            linalg.triu_vector(linalg.sqrtm_eigh(s), lower=False),
            linalg.regularized_sqrtm(s, 0.7),
            linalg.l2_normalize(linalg.signed_sqrt(s.reshape(s.shape[:-2] + (-1,)))),
            linalg.gaussian_embedding_matrix(x),
        )

    batched = jax.jit(pipeline)(x)
    mapped = jax.jit(jax.vmap(pipeline))(x)
    single = [jax.jit(pipeline)(x[i]) for i in range(2)]
    for k, (b, m) in enumerate(zip(batched, mapped)):
        assert b.dtype == m.dtype == jnp.float32
        tol = dict(rtol=2e-6, atol=2e-6 * float(jnp.abs(b).max()))
        np.testing.assert_allclose(m, b, **tol)
        for i in range(2):
            np.testing.assert_allclose(single[i][k], b[i], **tol)
    # vmap of the gradient is the batched gradient (samples are independent).
    loss = lambda x: jnp.sum(pipeline(x)[0])  # noqa: E731
    per_sample = jax.jit(jax.vmap(jax.grad(loss)))(x)
    whole = jax.jit(jax.grad(loss))(x)
    np.testing.assert_allclose(per_sample, whole, rtol=1e-5, atol=1e-5 * float(jnp.abs(whole).max()))


def test_newton_schulz_over_the_whole_valid_range():
    """The zero matrix (semi-definite) has the root 0, not NaN; entries near float32's maximum,
    whose trace overflows, keep their root; N = 0 positions is an error that says why."""
    for c in (1, 4):
        zero = jnp.zeros((2, c, c), jnp.float32)
        np.testing.assert_array_equal(np.asarray(jax.jit(linalg.sqrtm_newton_schulz)(zero)), 0.0)
        np.testing.assert_array_equal(np.asarray(linalg.regularized_sqrtm(zero, 1.0)), 0.0)
    rng = np.random.default_rng(7)
    for scale in (1e36, 1e38):
        m = rng.standard_normal((8, 8))
        spd = m @ m.T / 8 + np.eye(8)
        a = spd / np.abs(spd).max() * scale  # entries up to `scale`: the trace overflows float32 at 1e38
        want = scipy_sqrtm(spd / np.abs(spd).max()).real * np.sqrt(scale)
        got = np.asarray(linalg.sqrtm_newton_schulz(jnp.asarray(a, jnp.float32), 12), np.float64)
        assert np.isfinite(got).all() and rel_err(got, want) < 1e-5, scale
        inv = np.asarray(linalg.inv_sqrtm_newton_schulz(jnp.asarray(a, jnp.float32), 12), np.float64)
        assert rel_err(inv, np.linalg.inv(want)) < 1e-5, scale
    with pytest.raises(ValueError, match="N = 0 positions"):
        linalg.covariance(jnp.zeros((2, 0, 3)))
    with pytest.raises(ValueError, match="N = 0 positions"):
        linalg.gram(jnp.zeros((0, 3)))


def test_scaled_covariance_for_features_of_any_finite_scale():
    """`scaled_covariance`: the covariance itself (bit for bit) for features below 2^16; beyond,
    that of the centred features divided by a power of two, whose roots with `unit` are those
    of the float64 covariance where the float32 covariance overflows (features from ~1e18),
    and whose root's gradient stays that of float64 where `covariance`'s breaks down (the
    square of the trace overflows, from ~1e9 here).

    Tolerances: float32 covariances of 32 positions, their 12-iteration roots and gradients
    are within ~1e-6 of float64 for these well-conditioned matrices (as above): 1e-5."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 32, 4)).astype(np.float32)
    s, unit = jax.jit(linalg.scaled_covariance)(x)
    np.testing.assert_array_equal(np.asarray(unit), 1.0)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(jax.jit(linalg.covariance)(x)))
    # Per sample: only the large one is scaled; the others keep unit 1.
    big = x.copy()
    big[1] *= np.float32(1e30)
    s, unit = jax.jit(linalg.scaled_covariance)(big)
    assert not np.isfinite(np.asarray(linalg.covariance(big))).all()
    unit = np.asarray(unit, np.float64)
    centred_peak = np.abs(big[1] - big[1].mean(0)).max()
    assert unit[0, 0, 0] == unit[2, 0, 0] == 1.0 and 2.0**15 <= centred_peak / unit[1, 0, 0] < 2.0**16
    assert np.log2(unit[1, 0, 0]).is_integer()  # a power of two: exact
    want = np_covariance(big.astype(np.float64))
    got = np.asarray(s, np.float64) * unit**2
    for b in range(3):
        assert rel_err(got[b], want[b]) < 1e-5, b
    root = np.asarray(jax.jit(linalg.sqrtm_newton_schulz, static_argnums=1)(s, 12, unit=unit), np.float64)
    for b in range(3):
        assert np.isfinite(root[b]).all() and rel_err(root[b], scipy_sqrtm(want[b])) < 1e-5, b
    # Theorem 1's estimator is not homogeneous: with unit, that of unit^2 s, not unit times that of s.
    lam = 0.5
    reg = np.asarray(linalg.regularized_sqrtm(s, lam, "eigh", unit=unit), np.float64)
    for b in range(3):
        w, v = np.linalg.eigh(want[b])
        c = (1 - lam) / lam
        assert rel_err(reg[b], (v * (np.sqrt(c**2 + w / lam) - c)) @ v.T) < 1e-5, b

    # Gradients of the root of the covariance, against float64, from 1 to 2^60.
    def root_loss(scaled, k):
        def loss(x):
            if scaled:
                s, unit = linalg.scaled_covariance(x)
                return jnp.sum(jnp.sin(linalg.sqrtm_newton_schulz(s, 5, unit=unit) * 2.0**-k))
            return jnp.sum(jnp.sin(linalg.sqrtm_newton_schulz(linalg.covariance(x), 5) * 2.0**-k))  # float64

        return jax.jit(jax.grad(loss))

    for k in (0, 40, 60):
        xk = x * np.float32(2.0**k)
        with jax.enable_x64(True):
            want = np.asarray(root_loss(False, k)(jnp.asarray(xk, jnp.float64)))
        assert rel_err(root_loss(True, k)(xk), want) < 1e-5, k
