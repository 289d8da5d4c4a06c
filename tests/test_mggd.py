"""gg_jax.mggd: the zero-mean MGGD of paper Eqn. (1), its sampler and the ML estimator of Eqns. (3)-(4).

Recovery tests draw samples with `mggd.sample` for d in {2, 8} and beta in {0.3, 0.5, 1, 2}
(10^5 to check the sampler, the first 10^4 for one batched fit per d) and ask for a few
percent, about three times the spread measured over seeds 0-4 (beta 1-3.4 %, scatter
0.4-2.5 %, delta given beta 0.6-3.2 %, covariance 2-4.2 %). delta is checked with beta fixed
at its true value: with beta estimated too, delta^beta carries the scale of y^beta, so at
beta = 0.3 a 1 % error in beta moves delta by ~30 %; the estimated distribution's
covariance, which does not have that coupling, is checked instead. Exact identities run in
float64 (the `x64` fixture) against SciPy / NumPy. Tests share array shapes where they can,
so that they share compiled fits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special as sp_special
from scipy import stats

from gg_jax import mggd

BETAS = np.array([0.3, 0.5, 1.0, 2.0], np.float32)
DELTA = 1.7
sample = jax.jit(mggd.sample, static_argnums=2)


def random_scatter(rng, d, dtype=np.float32):
    a = rng.standard_normal((d, d))
    s = a @ a.T + 0.5 * d * np.eye(d)
    return (s * d / np.trace(s)).astype(dtype)


def params_for(sigma, betas=BETAS, delta=DELTA):
    k = len(betas)
    d = sigma.shape[-1]
    return mggd.MGGD(np.broadcast_to(sigma, (k, d, d)), np.asarray(betas), np.full(k, delta, np.asarray(betas).dtype))


def rel_max(a, b):
    """max |a - b| / max |b| over the last two axes, worst over the batch."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.max(np.abs(a - b), axis=(-2, -1)) / np.max(np.abs(b), axis=(-2, -1))))


def student_samples(seed, sigma, n=2000):
    """Heavy-tailed samples (multivariate Student t, 4 degrees of freedom), float64 [n, d]."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(sigma))) @ np.linalg.cholesky(sigma).T
    return z / np.sqrt(rng.chisquare(4, size=(n, 1)) / 4)


def np_log_prob(x, sigma, beta, delta):
    """Paper Eqn. (1) in NumPy float64, term by term."""
    d = sigma.shape[-1]
    y = np.einsum("ni,ij,nj->n", x, np.linalg.inv(sigma), x)
    log_c = (
        sp_special.gammaln(d / 2)
        + np.log(beta)
        - d / 2 * np.log(np.pi)
        - sp_special.gammaln(d / (2 * beta))
        - d / (2 * beta) * np.log(2)
        - d / 2 * np.log(delta)
        - 0.5 * np.linalg.slogdet(sigma)[1]
    )
    return log_c - y**beta / (2 * delta**beta)


# ---------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("d", [2, 8])
def test_sample_and_fit_recover_the_parameters(d):
    sigma = random_scatter(np.random.default_rng(0), d)
    p = params_for(sigma)
    draws = sample(jax.random.PRNGKey(0), p, 100_000)
    assert draws.shape == (4, 100_000, d) and draws.dtype == jnp.float32
    # The sampler: its empirical covariance is `covariance`, its radial law that of Eqn. (1):
    # x^T sigma^-1 x = t with t^beta / (2 delta^beta) ~ Gamma(d / (2 beta)).
    xd = np.asarray(draws, np.float64)
    empirical = np.einsum("bni,bnj->bij", xd, xd) / xd.shape[1]
    closed = np.asarray(mggd.covariance(p), np.float64)
    np.testing.assert_allclose(closed[2], DELTA * sigma, rtol=1e-5)  # beta = 1: delta * sigma
    for b, beta in enumerate(BETAS):
        # Heavy tails: the standard error of the empirical covariance grows as beta falls.
        assert rel_max(empirical[b], closed[b]) < (0.04 if beta < 0.4 else 0.02), beta
        y = np.einsum("ni,ij,nj->n", xd[b], np.linalg.inv(sigma), xd[b])
        assert stats.kstest(y**beta / (2 * DELTA**beta), stats.gamma(d / (2 * beta)).cdf).pvalue > 1e-3, beta

    x = draws[:, :10_000]
    q, info = mggd.fit_with_info(x)
    assert q.sigma.shape == (4, d, d) and q.beta.shape == q.delta.shape == (4,)
    assert bool(jnp.all(info.converged)), info
    assert np.all(np.asarray(info.num_iters) < 30), info.num_iters
    np.testing.assert_allclose(np.trace(q.sigma, axis1=-2, axis2=-1), d, rtol=1e-5)  # normalised scatter
    np.testing.assert_allclose(q.beta, BETAS, rtol=0.05)
    assert rel_max(q.sigma, np.broadcast_to(sigma, (4, d, d))) < 0.05
    assert rel_max(mggd.covariance(q), mggd.covariance(p)) < 0.07
    # The scale, given the true shape.
    q_fixed = mggd.fit(x, beta=BETAS)
    np.testing.assert_array_equal(q_fixed.beta, BETAS)
    np.testing.assert_allclose(q_fixed.delta, DELTA, rtol=0.05)
    assert rel_max(q_fixed.sigma, np.broadcast_to(sigma, (4, d, d))) < 0.05


def test_fit_at_beta_one_is_the_normalised_second_moment(x64):
    rng = np.random.default_rng(1)
    x = rng.standard_t(df=3, size=(2, 300, 3)) * np.array([1.0, 2.0, 0.5])  # anything, not Gaussian
    q, info = mggd.fit_with_info(x, beta=1.0)
    m2 = np.einsum("bni,bnj->bij", x, x) / x.shape[1]
    trace = np.trace(m2, axis1=-2, axis2=-1)
    assert q.sigma.dtype == jnp.float64
    np.testing.assert_allclose(q.sigma, 3 * m2 / trace[:, None, None], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q.delta, trace / 3, rtol=1e-10)  # delta * sigma = the second moment
    assert bool(jnp.all(info.converged)) and np.all(np.asarray(info.num_iters) <= 2)


def delta_sensitivity(x, sigma, beta):
    """|d log delta / d log beta| of the closed-form scale at (sigma, beta), float64 (x `[N, d]`)."""
    x = np.asarray(x, np.float64)
    y = np.einsum("ni,ij,nj->n", x, np.linalg.inv(np.asarray(sigma, np.float64)), x)
    log_delta = lambda b: np.log(b * np.sum(y**b) / y.size / x.shape[1]) / b  # noqa: E731
    beta, h = float(beta), 1e-6 * float(beta)
    return abs(log_delta(beta + h) - log_delta(beta - h)) / (2 * h) * beta


def test_batched_fit_is_the_fit_of_each_problem():
    """Two programs (vmapped, single) round differently, so each stops its fixed point at its own
    iterate: each fit stops once the relative change of beta is <= max(tol, 64 eps) = 7.6e-6
    and of sigma <= tol = 1e-6, and with the contraction these fits show (at most ~0.45 per step)
    each is within that of the fixed point, the two within twice that: rtol 2e-5 for beta
    (measured <= 7.6e-6), atol 4e-6 for sigma (entries ~1; measured <= 7.2e-7). delta follows
    beta through the closed form, `delta^beta = beta / (N d) sum_n y_n^beta`, with the
    sensitivity k = |d log delta / d log beta|, up to ~30 at the heavy tails here: rtol
    k * 2e-5 (plus float32 rounding) for delta (measured 2.2e-4 at k = 29)."""
    rng = np.random.default_rng(4)
    # Gaussian scale mixtures with tails from heavy (shape 0.5) to Gaussian-like (shape 50).
    mixing = rng.gamma(np.array([0.5, 1.0, 2.0, 4.0, 10.0, 50.0])[:, None, None], size=(6, 400, 1))
    x = (rng.standard_normal((6, 400, 2)) @ rng.standard_normal((6, 2, 2)) / np.sqrt(mixing)).astype(np.float32)
    x = x.reshape(2, 3, 400, 2)
    batched, info = mggd.fit_with_info(x)
    assert batched.sigma.shape == (2, 3, 2, 2) and info.converged.shape == (2, 3)
    beta_rtol = 2e-5
    for i in range(2):
        for j in range(3):
            single, single_info = mggd.fit_with_info(x[i, j])
            assert single.beta.shape == () and single.sigma.shape == (2, 2)
            np.testing.assert_allclose(batched.beta[i, j], single.beta, rtol=beta_rtol)
            k = delta_sensitivity(x[i, j], single.sigma, single.beta)
            np.testing.assert_allclose(batched.delta[i, j], single.delta, rtol=k * beta_rtol + 1e-6)
            np.testing.assert_allclose(batched.sigma[i, j], single.sigma, rtol=0, atol=4e-6)
            assert bool(single_info.converged)


def test_mask_leaves_samples_out():
    rng = np.random.default_rng(5)
    x = rng.laplace(size=(6, 400, 2)).astype(np.float32)  # the shapes of the test above: no new compilation
    mask = np.ones((6, 400), bool)
    mask[1, 200:] = False
    mask[2, 2:] = False  # two samples for d = 2: not enough
    x[1, 200:] = 1e6
    q, info = mggd.fit_with_info(x, mask=mask)
    # The MLE of the 200 samples is that of the same samples twice (400, no mask).
    q_sub = mggd.fit(np.concatenate([x[1, :200], x[1, :200]]))
    np.testing.assert_allclose(q.beta[1], q_sub.beta, rtol=1e-4)
    np.testing.assert_allclose(q.sigma[1], q_sub.sigma, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(q.delta[1], q_sub.delta, rtol=1e-3)
    assert bool(info.converged[0]) and bool(info.converged[1])
    assert not bool(info.converged[2]) and np.isnan(q.beta[2]) and np.all(np.isnan(q.sigma[2]))


def test_fit_errors():
    with pytest.raises(ValueError, match=r"more samples than dimensions \(N > d\).*N=8 samples of dimension d=8"):
        mggd.fit(np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match="lam must lie in"):
        mggd.fit(np.ones((20, 2), np.float32), lam=1.5)
    with pytest.raises(ValueError, match="must be positive"):
        mggd.fit(np.ones((20, 2), np.float32), beta=-1.0)


def _laplace_problems(seed=20):
    """[6, 400, 2] float32 samples: the shapes of the tests above (their compiled fit)."""
    return np.random.default_rng(seed).laplace(size=(6, 400, 2)).astype(np.float32)


fit_in_jit = jax.jit(mggd.fit_with_info)


def test_fit_rejects_nan_and_inf_samples():
    x = _laplace_problems()
    reference, _ = fit_in_jit(x)  # the same program as below: the other problems' fits to the bit
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[4, 17, 1] = bad
        with pytest.raises(mggd.FitDataError, match=r"NaN or inf values \(batch entry \(4,\): channel 1\)"):
            mggd.fit(y)
        with pytest.raises(ValueError, match="NaN or inf"):  # FitDataError is a ValueError (and a UserError)
            mggd.fit(y[4])
        # Under jit nothing can be raised: that problem alone is NaN and not converged.
        q, info = fit_in_jit(y)
        assert np.all(np.isnan(q.sigma[4])) and np.isnan(q.beta[4]) and np.isnan(q.delta[4])
        assert not bool(info.converged[4]) and bool(np.all(np.delete(np.asarray(info.converged), 4)))
        for field in ("sigma", "beta", "delta"):
            np.testing.assert_array_equal(
                np.delete(np.asarray(getattr(q, field)), 4, axis=0),
                np.delete(np.asarray(getattr(reference, field)), 4, axis=0),
            )
    # Left out by the mask, a NaN is not looked at.
    y = x.copy()
    y[4, 17] = np.nan
    mask = np.ones((6, 400), bool)
    mask[4, 17] = False
    q = mggd.fit(y, mask=mask)
    assert np.isfinite(q.sigma).all() and np.isfinite(q.beta).all()


def test_fit_rejects_samples_that_do_not_span_the_space():
    """An all-zero channel (a dead ReLU) or a duplicated channel: no MLE, an error naming them."""
    x = _laplace_problems(21)
    x3 = np.random.default_rng(22).laplace(size=(400, 3)).astype(np.float32)
    for y, where in (
        (np.concatenate([x3[:, :1], np.zeros((400, 1), np.float32), x3[:, 2:]], 1), "channel 1 all zero"),
        (np.stack([x3[:, 0], x3[:, 1], x3[:, 0]], 1), "channels 0, 2 linearly dependent"),  # duplicated
        (np.stack([x3[:, 0], x3[:, 1], -2 * x3[:, 1]], 1), "channels 1, 2 linearly dependent"),  # scaled copy
    ):
        with pytest.raises(mggd.FitDataError, match=rf"do not span R\^3.*\(the samples: {where}"):
            mggd.fit(y)
    # Batched: the message names the batch entries; under jit they alone are NaN, not converged.
    y = x.copy()
    y[1, :, 0] = 0.0
    y[3, :, 1] = y[3, :, 0]
    with pytest.raises(
        mggd.FitDataError, match=r"batch entry \(1,\): channel 0 all zero.*batch entry \(3,\): channels 0, 1 linearly"
    ):
        mggd.fit(y)
    q, info = fit_in_jit(y)
    bad = np.array([1, 3])
    assert np.all(np.isnan(q.sigma[bad])) and np.all(np.isnan(q.beta[bad])) and np.all(np.isnan(q.delta[bad]))
    assert not np.any(np.asarray(info.converged)[bad]) and np.all(np.delete(np.asarray(info.converged), bad))
    # An all-zero problem left with too few samples by the mask stays the documented NaN, no error.
    mask = np.ones((6, 400), bool)
    mask[[1, 3], 2:] = False
    q, info = mggd.fit_with_info(y, mask=mask)
    assert np.all(np.isnan(q.beta[bad])) and np.all(np.isfinite(np.delete(np.asarray(q.beta), bad)))


def test_fit_at_any_finite_scale():
    """Each problem is divided by a power of two inside the fit: sigma and beta do not depend on
    the scale to the bit (powers of two), nor delta where it is representable; where it leaves
    float32 (squared units: samples beyond ~1e19 or below ~1e-19) it saturates to inf or 0."""
    x = _laplace_problems(23)
    q, info = mggd.fit_with_info(x)
    peak_exponent = int(np.frexp(np.abs(x).max())[1])
    for k in (-100, -60, 40, 60, 100, 127 - peak_exponent):
        scaled = x * np.float32(2.0**k)
        assert np.isfinite(scaled).all()
        qs, info_s = mggd.fit_with_info(scaled)
        np.testing.assert_array_equal(qs.sigma, q.sigma)
        np.testing.assert_array_equal(qs.beta, q.beta)
        np.testing.assert_array_equal(info_s.converged, info.converged)
        expected = np.asarray(q.delta, np.float64) * 4.0**k  # exact in float64
        delta = np.asarray(qs.delta, np.float64)
        over, under = expected > np.finfo(np.float32).max, expected < np.finfo(np.float32).tiny
        assert np.all(np.isinf(delta[over])) and np.all(delta[under] < np.finfo(np.float32).tiny), k
        np.testing.assert_array_equal(delta[~over & ~under], expected[~over & ~under])
    # The reported decimal scales: samples rounded to float32 again, so the fit moves by float32
    # rounding of the data (~2^-24) plus the stopping rule (tol = 1e-6 relative change): rtol 1e-5.
    for scale in (1e-20, 1e20):
        qs, info_s = mggd.fit_with_info(x * np.float32(scale))
        assert bool(np.all(info_s.converged))
        np.testing.assert_allclose(qs.beta, q.beta, rtol=1e-5)
        np.testing.assert_allclose(qs.sigma, q.sigma, rtol=1e-5, atol=1e-6)


def test_profile_score_is_the_derivative_of_the_profile_likelihood(x64):
    """f(beta) = (2 beta^2 / d) g'(beta), g = mean log-likelihood at the optimal delta (finite differences)."""
    d = 3
    sigma = random_scatter(np.random.default_rng(7), d, np.float64)
    x = student_samples(7, sigma)
    y = np.einsum("ni,ij,nj->n", x, np.linalg.inv(sigma), x)

    def g(beta):
        delta = (beta * np.sum(y**beta) / (len(y) * d)) ** (1 / beta)  # the closed form of fit
        return np.mean(np_log_prob(x, sigma, beta, delta))

    for beta in (0.3, 0.6, 1.0, 2.5):
        f, fp = mggd.profile_score(y, beta, d)
        h = 1e-5 * beta
        g_prime = (g(beta + h) - g(beta - h)) / (2 * h)
        np.testing.assert_allclose(float(f), 2 * beta**2 / d * g_prime, rtol=1e-6, atol=1e-8)
        f_plus, _ = mggd.profile_score(y, beta + h, d)
        f_minus, _ = mggd.profile_score(y, beta - h, d)
        np.testing.assert_allclose(float(fp), (float(f_plus) - float(f_minus)) / (2 * h), rtol=1e-6)
    # Invariant to the scale of y; the fitted beta is its root.
    np.testing.assert_allclose(mggd.profile_score(1e3 * y, 0.6, d)[0], mggd.profile_score(y, 0.6, d)[0], atol=1e-12)
    q = mggd.fit(x, tol=1e-12)
    y_hat = np.einsum("ni,ij,nj->n", x, np.linalg.inv(np.asarray(q.sigma)), x)
    assert abs(float(mggd.profile_score(y_hat, q.beta, d)[0])) < 1e-10


def test_robust_fit_is_a_fixed_point_of_eqn3_and_theorem1(x64):
    """lam < 1: the fitted scatter is its own Eqn. (3) step followed by Theorem 1, normalised (NumPy)."""
    d, lam = 3, 0.5
    sigma = random_scatter(np.random.default_rng(8), d, np.float64)
    x = student_samples(8, sigma)
    q, info = mggd.fit_with_info(x, lam=lam, tol=1e-12)
    assert bool(info.converged)
    s_hat, beta = np.asarray(q.sigma), float(q.beta)
    y = np.einsum("ni,ij,nj->n", x, np.linalg.inv(s_hat), x)
    n = len(y)
    w = np.array([n * d / (y[i] + y[i] ** (1 - beta) * (np.sum(y**beta) - y[i] ** beta)) for i in range(n)])
    step = np.einsum("n,ni,nj->ij", w, x, x) / n
    evals, evecs = np.linalg.eigh(step)
    c = (1 - lam) / lam
    robust = (evecs * (np.sqrt(c**2 + evals / lam) - c)) @ evecs.T
    np.testing.assert_allclose(s_hat, d * robust / np.trace(robust), rtol=1e-9, atol=1e-11)
    # The regulariser pulls the scatter towards the identity.
    plain = mggd.fit(x, tol=1e-12)
    assert np.linalg.cond(s_hat) < np.linalg.cond(np.asarray(plain.sigma))


# ------------------------------------------------------------------------- density, sampler


def test_log_prob_at_beta_one_is_the_gaussian_with_covariance_delta_sigma(x64):
    rng = np.random.default_rng(9)
    sigma = np.stack([random_scatter(rng, 3, np.float64) for _ in range(2)])
    delta = np.array([0.7, 2.5])
    x = rng.standard_normal((2, 5, 3))
    lp = mggd.log_prob(x, mggd.MGGD(sigma, np.ones(2), delta))
    assert lp.shape == (2, 5) and lp.dtype == jnp.float64
    for b in range(2):
        expected = stats.multivariate_normal(np.zeros(3), delta[b] * sigma[b]).logpdf(x[b])
        np.testing.assert_allclose(lp[b], expected, rtol=1e-12)
    # Any beta: Eqn. (1) term by term; parameters broadcast against the samples' batch.
    lp = mggd.log_prob(x, mggd.MGGD(sigma[0], 0.45, 1.3))
    np.testing.assert_allclose(lp, np.stack([np_log_prob(x[b], sigma[0], 0.45, 1.3) for b in range(2)]), rtol=1e-12)
    # jit and vmap.
    vmapped = jax.jit(jax.vmap(mggd.log_prob))(x, mggd.MGGD(sigma, np.full(2, 0.45), np.full(2, 1.3)))
    np.testing.assert_allclose(vmapped[0], np_log_prob(x[0], sigma[0], 0.45, 1.3), rtol=1e-12)


@pytest.mark.parametrize("d", [1, 2])
def test_log_prob_integrates_to_one(x64, d):
    """Trapezoid rule on x = tan(u), u in (-pi/2, pi/2)^d, so the whole of R^d (and the tails) is covered."""
    sigma = np.eye(1) if d == 1 else np.array([[1.4, 0.5], [0.5, 0.6]])
    u = np.linspace(-np.pi / 2, np.pi / 2, 4001 if d == 1 else 801)[1:-1]
    x1, jac1 = np.tan(u), 1 / np.cos(u) ** 2
    if d == 1:
        points, jac = x1[:, None], jac1
    else:
        points = np.stack(np.meshgrid(x1, x1, indexing="ij"), -1).reshape(-1, 2)
        jac = np.outer(jac1, jac1).reshape(-1)
    du = u[1] - u[0]
    # (beta = 0.3 in d = 2 has too much mass beyond this grid's |x| < 250.)
    for beta in (0.3, 0.5, 1.0, 2.0, 4.0) if d == 1 else (0.5, 1.0, 2.0, 4.0):
        density = np.exp(np.asarray(mggd.log_prob(points, mggd.MGGD(sigma, beta, 0.8)))) * jac
        total = density.sum() * du**d
        np.testing.assert_allclose(total, 1.0, rtol=2e-3, err_msg=f"beta={beta}")


def test_log_prob_gradients_are_finite():
    sigma = random_scatter(np.random.default_rng(11), 3)
    x = jnp.asarray(np.random.default_rng(12).standard_normal((4, 3)), jnp.float32)

    def loss(x, sigma, beta, delta):
        return jnp.sum(mggd.log_prob(x, mggd.MGGD(sigma, beta, delta)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    for beta in (0.3, 1.0, 2.0):
        grads = grad(x, jnp.asarray(sigma), jnp.float32(beta), jnp.float32(1.5))
        for g in grads:
            assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)
    # d/d delta at beta = 1 in closed form: -d/(2 delta) + y / (2 delta^2) per sample.
    y = np.einsum("ni,ij,nj->n", np.asarray(x), np.linalg.inv(sigma), np.asarray(x))
    g_delta = grad(x, jnp.asarray(sigma), jnp.float32(1.0), jnp.float32(1.5))[3]
    np.testing.assert_allclose(g_delta, np.sum(-3 / 3.0 + y / (2 * 1.5**2)), rtol=1e-4)


def test_univariate_fit_is_the_generalized_gaussian_mle():
    """d = 1 (what gg_jax.diagnose fits per channel): scipy's gennorm MLE, same beta (gennorm's shape / 2)."""
    x = stats.gennorm(1.2, scale=0.7).rvs(size=(3, 3000), random_state=13).astype(np.float32)
    x[2, :300] = 0.0  # samples exactly at the origin: the likelihood grows without bound as beta -> 0
    q, info = mggd.fit_with_info(x[..., None])
    assert float(q.beta[2]) == mggd.BETA_BOUNDS[0] and not bool(info.converged[2])
    np.testing.assert_allclose(q.sigma, 1.0)
    for b in range(2):
        shape, _, scale = stats.gennorm.fit(x[b], floc=0.0)
        np.testing.assert_allclose(2 * q.beta[b], shape, rtol=2e-3)
        # gennorm: exp(-|x / scale|^shape) = exp(-(x^2 / delta)^beta / 2) with delta = scale^2 / 2^(1 / beta).
        np.testing.assert_allclose(q.delta[b], scale**2 / 2 ** (1 / q.beta[b]), rtol=5e-3)
    assert bool(np.all(info.converged[:2]))
