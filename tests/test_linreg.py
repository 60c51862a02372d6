"""Checks of the linear-regression ground truth (theory 5.1-5.3) against independent references:
naive numpy loops that build every matrix explicitly, deterministic gradient descent, Monte Carlo
of real minibatch SGD (numpy, fixed seeds, 4 standard errors), SciPy quadrature, matrix
exponentials and the worked examples of theory.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import jaxsched as js

# ------------------------------------------------------------------------------------------------
# Fixtures and independent numpy references
# ------------------------------------------------------------------------------------------------


def _rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@pytest.fixture(scope="module")
def gauss():
    """d = 3 Gaussian problem with a random rotated SPD covariance (eigenvalues 1.5, 0.6, 0.2)."""
    rng = np.random.default_rng(0)
    U = _rotation(rng, 3)
    cov = U @ np.diag([1.5, 0.6, 0.2]) @ U.T
    cov = 0.5 * (cov + cov.T)
    x_star = rng.standard_normal(3)
    x0 = x_star + U @ np.array([1.0, -1.0, 0.5])
    return js.GaussianLinearRegression(cov, x_star, x0, 0.5)


def _data(rng, n=30, d=4):
    F = rng.standard_normal((n, d)) * np.array([1.5, 1.0, 0.7, 0.4])
    y = F @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n)
    x0 = rng.standard_normal(d)
    return F, y, x0


@pytest.fixture(scope="module")
def data_arrays():
    return _data(np.random.default_rng(1))


def _naive_gaussian(cov, x_star, x0, s2, b, h):
    """Theory 5.2 written out with explicit matrices."""
    S = np.asarray(cov)
    d = S.shape[0]
    v0 = np.asarray(x0) - np.asarray(x_star)
    M = np.outer(v0, v0)
    I_hS = np.eye(d) - h * S
    for bk in b:
        M = I_hS @ M @ I_hS + (h**2 / bk) * (S @ M @ S + np.trace(S @ M) * S + s2 * S)
    return 0.5 * np.trace(S @ M) + 0.5 * s2


def _naive_data(F, y, x0, b, h, replace):
    """Theory 5.3 with all n matrices A_i = a_i a_i^T and c_i = a_i r_i built explicitly."""
    n, d = F.shape
    S = F.T @ F / n
    x_hat = np.linalg.pinv(F) @ y
    r = F @ x_hat - y
    A = np.einsum("ij,ik->ijk", F, F)
    c = F * r[:, None]
    mu = x0 - x_hat
    M = np.outer(mu, mu)
    for bk in b:
        w = 1.0 / bk if replace else (n - bk) / (bk * (n - 1))
        Q = np.zeros((d, d))
        for i in range(n):
            Q += A[i] @ M @ A[i] + np.outer(A[i] @ mu, c[i]) + np.outer(c[i], A[i] @ mu)
            Q += np.outer(c[i], c[i])
        Q /= n
        M = M - h * (S @ M + M @ S) + h**2 * ((1 - w) * S @ M @ S + w * Q)
        mu = (np.eye(d) - h * S) @ mu
    return 0.5 * np.trace(S @ M) + 0.5 * np.mean(r**2)


def _mean_se(samples):
    return float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(samples.size))


# ------------------------------------------------------------------------------------------------
# Exact moments, Gaussian features (theory 5.2)
# ------------------------------------------------------------------------------------------------


def test_gaussian_recursion_matches_naive_loop(gauss):
    b = np.random.default_rng(2).uniform(0.5, 6.0, size=25)  # real-valued batches are allowed
    got = float(js.exact_expected_loss(gauss, b, lr=0.1))
    ref = _naive_gaussian(gauss.cov, gauss.x_star, gauss.x0, 0.5, b, 0.1)
    # Same algebra in a different order: only rounding separates them.
    assert got == pytest.approx(ref, rel=1e-12)


def test_gaussian_infinite_batch_is_gradient_descent(gauss):
    h, K = 0.1, 30
    S, x_star = np.asarray(gauss.cov), np.asarray(gauss.x_star)
    x = np.asarray(gauss.x0).copy()
    traj = []
    for _ in range(K + 1):
        v = x - x_star
        traj.append(0.5 * v @ S @ v + 0.25)  # s2 / 2 = 0.25
        x = x - h * S @ v
    got = js.exact_loss_trajectory(gauss, np.full(K, np.inf), lr=h)
    # Deterministic iteration, exact up to rounding.
    np.testing.assert_allclose(np.asarray(got), traj, rtol=1e-12)
    assert float(js.exact_gd_loss(gauss, lr=h, steps=K)) == pytest.approx(traj[-1], rel=1e-12)


def test_gaussian_monte_carlo_sgd(gauss):
    h, K, b, paths = 0.2, 20, 2, 20000
    rng = np.random.default_rng(3)
    S = np.asarray(gauss.cov)
    L = np.linalg.cholesky(S)
    s2 = float(gauss.noise_var)
    v = np.tile(np.asarray(gauss.x0 - gauss.x_star), (paths, 1))
    for _ in range(K):
        a = rng.standard_normal((paths, b, 3)) @ L.T
        residual = np.einsum("pbd,pd->pb", a, v) - np.sqrt(s2) * rng.standard_normal((paths, b))
        v = v - h * np.mean(a * residual[..., None], axis=1)
    mean, se = _mean_se(0.5 * np.einsum("pd,de,pe->p", v, S, v) + 0.5 * s2)
    exact = float(js.exact_expected_loss(gauss, np.full(K, b), lr=h))
    gd = float(js.exact_gd_loss(gauss, lr=h, steps=K))
    # 4 standard errors: a false alarm has probability ~6e-5 for an unbiased estimator.
    assert abs(mean - exact) < 4 * se
    # The test has power: the noise effect is many standard errors wide.
    assert (exact - gd) > 20 * se


# ------------------------------------------------------------------------------------------------
# Exact moments, finite data set (theory 5.3)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("replace", [True, False])
def test_data_recursion_matches_naive(data_arrays, replace):
    F, y, x0 = data_arrays
    p = js.LinearRegressionData(F, y, x0, replace=replace)
    b = np.random.default_rng(4).uniform(1.0, 12.0, size=20)
    h = 0.05
    got = float(js.exact_expected_loss(p, b, lr=h))
    ref = _naive_data(F, y, x0, b, h, replace)
    # Rounding only (the O(n d^2) form of Q is algebraically identical to the explicit sum).
    assert got == pytest.approx(ref, rel=1e-12)


def test_data_singular_gram_uses_pseudo_inverse():
    rng = np.random.default_rng(5)
    F, y, x0 = _data(rng, n=30, d=4)
    F = np.column_stack([F, F[:, 0] - 2.0 * F[:, 1]])  # rank 4 in d = 5: S is singular
    x0 = np.append(x0, 0.3)
    p = js.LinearRegressionData(F, y, x0)
    b = rng.uniform(1.0, 8.0, size=15)
    got = np.asarray(js.exact_loss_trajectory(p, b, lr=0.05))
    assert np.all(np.isfinite(got))
    assert got[-1] == pytest.approx(_naive_data(F, y, x0, b, 0.05, True), rel=1e-10)
    # k = 0 is the loss at x0 itself, whichever least-squares solution is used for centring.
    assert got[0] == pytest.approx(0.5 * np.mean((F @ x0 - y) ** 2), rel=1e-12)


@pytest.mark.parametrize("replace", [True, False])
def test_data_monte_carlo_sgd(data_arrays, replace):
    F, y, x0 = data_arrays
    n = F.shape[0]
    h, K, b, paths = 0.1, 20, 3, 20000
    rng = np.random.default_rng(6 if replace else 7)
    x = np.tile(x0, (paths, 1))
    for _ in range(K):
        if replace:
            idx = rng.integers(n, size=(paths, b))
        else:
            idx = np.argsort(rng.random((paths, n)), axis=1)[:, :b]
        a, t = F[idx], y[idx]
        residual = np.einsum("pbd,pd->pb", a, x) - t
        x = x - h * np.mean(a * residual[..., None], axis=1)
    mean, se = _mean_se(0.5 * np.mean((x @ F.T - y) ** 2, axis=1))
    p = js.LinearRegressionData(F, y, x0, replace=replace)
    exact = float(js.exact_expected_loss(p, np.full(K, b), lr=h))
    gd = float(js.exact_gd_loss(p, lr=h, steps=K))
    assert abs(mean - exact) < 4 * se  # see the Gaussian Monte Carlo test
    assert (exact - gd) > 10 * se


def test_data_gradient_wrt_batch_sizes(data_arrays):
    F, y, x0 = data_arrays
    p = js.LinearRegressionData(F, y, x0)
    b = np.random.default_rng(8).uniform(1.0, 6.0, size=15)
    h = 0.1
    grad = np.asarray(jax.grad(lambda bb: js.exact_expected_loss(p, bb, lr=h))(jnp.asarray(b)))
    for k in (0, 7, 14):
        eps = 1e-4 * b[k]
        up, down = b.copy(), b.copy()
        up[k] += eps
        down[k] -= eps
        fd = float(js.exact_expected_loss(p, up, lr=h)) - float(
            js.exact_expected_loss(p, down, lr=h)
        )
        fd /= 2 * eps
        # Central differences: truncation ~eps^2 (~1e-8 rel), rounding ~1e-16/eps (~1e-12).
        assert grad[k] == pytest.approx(fd, rel=1e-6)
    assert np.all(grad < 0)  # larger batches always reduce the noise excess here


def test_trajectory_consistency_float32_and_vmap(gauss, data_arrays):
    F, y, x0 = data_arrays
    p = js.LinearRegressionData(F, y, x0)
    b = np.random.default_rng(9).uniform(1.0, 6.0, size=12)
    traj = np.asarray(js.exact_loss_trajectory(p, b, lr=0.1))
    assert traj.shape == (13,)
    assert traj[0] == pytest.approx(0.5 * np.mean((F @ x0 - y) ** 2), rel=1e-12)
    assert traj[6] == pytest.approx(float(js.exact_expected_loss(p, b[:6], lr=0.1)), rel=1e-12)

    p32 = js.LinearRegressionData(F.astype(np.float32), y.astype(np.float32), x0.astype(np.float32))
    got32 = js.exact_expected_loss(p32, b, lr=0.1)
    assert got32.dtype == jnp.float32
    # float32 rounding over 12 well-conditioned steps: ~1e-6 relative, 1e-4 leaves margin.
    assert float(got32) == pytest.approx(traj[-1], rel=1e-4)

    # vmap over the learning rate, the batch sizes and a problem leaf (the label noise).
    lrs = jnp.array([0.05, 0.1, 0.2])
    bs = jnp.stack([jnp.asarray(b), 2 * jnp.asarray(b), jnp.full(12, 3.0)])
    out = jax.vmap(lambda h, bb: js.exact_expected_loss(gauss, bb, lr=h))(lrs, bs)
    for i in range(3):
        ref = _naive_gaussian(
            gauss.cov, gauss.x_star, gauss.x0, 0.5, np.asarray(bs[i]), float(lrs[i])
        )
        assert float(out[i]) == pytest.approx(ref, rel=1e-12)
    noises = jnp.array([0.0, 0.5, 2.0])
    problems = jax.vmap(
        lambda s2: js.GaussianLinearRegression(gauss.cov, gauss.x_star, gauss.x0, s2)
    )(noises)
    out = jax.vmap(lambda q: js.exact_expected_loss(q, b, lr=0.1))(problems)
    for i in range(3):
        ref = _naive_gaussian(gauss.cov, gauss.x_star, gauss.x0, float(noises[i]), b, 0.1)
        assert float(out[i]) == pytest.approx(ref, rel=1e-12)
    targets = jnp.stack([jnp.asarray(y), 2.0 * jnp.asarray(y)])
    problems = jax.vmap(lambda t: js.LinearRegressionData(F, t, x0, replace=False))(targets)
    out = jax.vmap(lambda q: js.exact_expected_loss(q, b, lr=0.1))(problems)
    for i in range(2):
        ref = _naive_data(F, np.asarray(targets[i]), x0, b, 0.1, False)
        assert float(out[i]) == pytest.approx(ref, rel=1e-12)
    out = jax.vmap(lambda h: js.gaussian_sensitivity(gauss, lr=h, steps=5))(lrs)
    for i in range(3):
        ref = js.gaussian_sensitivity(gauss, lr=float(lrs[i]), steps=5)
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(ref), rtol=1e-13)


def test_diabetes_noise_excess():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)  # numpy's std is the population formula, as theory 5.3 says
    y = (y - y.mean()) / y.std()
    p = js.LinearRegressionData(X, y)
    h, K = 0.05, 400
    excess = float(
        js.exact_expected_loss(p, np.full(K, 8.0), lr=h) - js.exact_gd_loss(p, lr=h, steps=K)
    )
    print(f"diabetes noise excess, constant batch 8: {excess:.6g}")
    # theory 5.3 quotes "about 0.0076"; 10% covers the rounding of that figure.
    assert excess == pytest.approx(0.0076, rel=0.1)


# ------------------------------------------------------------------------------------------------
# Closed forms, Gaussian features (theory 5.1)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gauss4():
    """d = 4, random rotation, a repeated eigenvalue (exercises the c -> 0 limit of the closed
    form) and a 30x spread (large |c| as well)."""
    rng = np.random.default_rng(10)
    U = _rotation(rng, 4)
    cov = U @ np.diag([3.0, 0.7, 0.7, 0.1]) @ U.T
    cov = 0.5 * (cov + cov.T)
    x_star = rng.standard_normal(4)
    return js.GaussianLinearRegression(cov, x_star, x_star + rng.standard_normal(4), 0.3)


def _numpy_phi_eigen(p, t, T):
    lam, U = np.linalg.eigh(np.asarray(p.cov))
    z = np.exp(-lam * t) * (U.T @ np.asarray(p.x0 - p.x_star))
    quad = np.sum(lam * z**2) + float(p.noise_var)
    return 0.5 * np.sum(lam**2 * np.exp(-2 * lam * (T - t)) * (lam * z**2 + quad))


def _numpy_phi_definition(p, t, T):
    """phi = tr(Lam(t) Sigma(x(t))), Lam = (1/2) e^{-S(T-t)} S e^{-S(T-t)} (theory 4), no eigh."""
    S = np.asarray(p.cov)
    v = scipy.linalg.expm(-S * t) @ np.asarray(p.x0 - p.x_star)
    E = scipy.linalg.expm(-S * (T - t))
    Lam = 0.5 * E @ S @ E
    Sv = S @ v
    Sigma = np.outer(Sv, Sv) + (v @ Sv + float(p.noise_var)) * S
    return np.trace(Lam @ Sigma)


def test_gaussian_phi_matches_numpy(gauss4):
    T = 5.0
    ts = np.linspace(0.0, T, 7)
    got = np.asarray(js.gaussian_phi(gauss4, ts, horizon=T))
    assert got.shape == ts.shape
    for t, g in zip(ts, got, strict=True):
        assert g == pytest.approx(_numpy_phi_eigen(gauss4, t, T), rel=1e-12)
        # expm against eigh: both accurate to ~1e-14 on this well-conditioned matrix.
        assert g == pytest.approx(_numpy_phi_definition(gauss4, t, T), rel=1e-10)


@pytest.mark.parametrize("lr", [0.25, 1e-3])
def test_gaussian_sensitivity_matches_quadrature(gauss4, lr):
    steps = 12
    T = lr * steps
    phik = np.asarray(js.gaussian_sensitivity(gauss4, lr=lr, steps=steps))
    assert phik.shape == (steps,)

    def phi(t):
        return float(js.gaussian_phi(gauss4, t, horizon=T))

    for k in range(steps):
        ref, _ = scipy.integrate.quad(phi, k * lr, (k + 1) * lr, epsabs=0.0, epsrel=1e-13)
        # Smooth integrand on a short interval: Gauss-Kronrod is accurate to ~1e-15.
        assert phik[k] == pytest.approx(ref, rel=1e-9)


def test_one_dimensional_sqrt_integral_closed_form():
    """theory 5.1, d = 1: int sqrt(phi) = (1/lam)[w + (sqrt A / 2) ln((w - sqrt A)/(w + sqrt A))]."""
    lam, v0, s2, T = 0.7, 1.3, 0.4, 3.0
    p = js.GaussianLinearRegression([[lam]], [0.0], [v0], s2)
    A = lam**3 * v0**2 * np.exp(-2 * lam * T)
    C = 0.5 * s2 * lam**2 * np.exp(-2 * lam * T)

    def primitive(t):
        w = np.sqrt(A + C * np.exp(2 * lam * t))
        return (w + 0.5 * np.sqrt(A) * np.log((w - np.sqrt(A)) / (w + np.sqrt(A)))) / lam

    quad = scipy.integrate.quad(
        lambda t: np.sqrt(float(js.gaussian_phi(p, t, horizon=T))), 0, T, epsabs=0, epsrel=1e-12
    )[0]
    assert quad == pytest.approx(primitive(T) - primitive(0.0), rel=1e-10)


def test_worked_example_theory_5_1():
    lam = np.array([1.0, 0.3, 0.05])
    p = js.GaussianLinearRegression(np.diag(lam), np.zeros(3), [1.0, -2.0, 3.0], 0.5)
    T, hN = 10.0, 40.0

    def phi(t):
        return float(js.gaussian_phi(p, t, horizon=T))

    opts = {"epsabs": 0.0, "epsrel": 1e-12, "limit": 200}
    int_sqrt = scipy.integrate.quad(lambda t: np.sqrt(phi(t)), 0.0, T, **opts)[0]
    int_phi = scipy.integrate.quad(phi, 0.0, T, **opts)[0]
    optimal = int_sqrt**2 / hN
    constant = int_phi / (hN / T)
    print(f"worked example: optimal {optimal:.10g}, constant {constant:.10g}")
    # theory.md quotes 0.0267537... and 0.0585043...: six significant digits.
    assert f"{optimal:.6g}" == "0.0267537"
    assert f"{constant:.6g}" == "0.0585043"

    # Per-step closed form, h = 0.01, N = hN / h samples. By Cauchy-Schwarz on each step
    # sqrt(phi_k) >= (1/sqrt h) int_step sqrt(phi), so the discrete optimum is never below the
    # continuous one; the gap is the Jensen gap of sqrt over a step, relative O(h^2 (phi'/phi)^2)
    # (~3e-6 here), so 1e-4 is generous while still checking the h -> 0 limit.
    h = 0.01
    phik = np.asarray(js.gaussian_sensitivity(p, lr=h, steps=round(T / h)))
    discrete = np.sum(np.sqrt(phik)) ** 2 / (hN / h)
    assert discrete >= optimal * (1 - 1e-12)
    assert discrete == pytest.approx(optimal, rel=1e-4)
    assert np.sum(phik) / (hN / T) == pytest.approx(constant, rel=1e-10)  # sum phi_k = int phi


def test_gd_loss_and_correction_against_exact_gd(gauss):
    T = 4.0
    S = np.asarray(gauss.cov)
    v_T = scipy.linalg.expm(-S * T) @ np.asarray(gauss.x0 - gauss.x_star)
    flow = 0.5 * v_T @ S @ v_T + 0.25
    assert float(js.gaussian_gd_loss(gauss, horizon=T)) == pytest.approx(flow, rel=1e-12)
    corr = float(js.gaussian_correction(gauss, horizon=T))
    # Discrete GD = flow + h * correction + O(h^2): the remainder of (GD - flow)/h - correction
    # must halve with h (first order), which pins the correction's value, not just its order.
    errs = []
    for h in (0.02, 0.01):
        gd = float(js.exact_gd_loss(gauss, lr=h, steps=round(T / h)))
        errs.append((gd - flow) / h - corr)
    assert abs(errs[1]) < 0.01 * abs(corr)
    assert errs[0] / errs[1] == pytest.approx(2.0, rel=0.05)


def test_expansion_of_exact_sgd_is_second_order(gauss):
    """E f(x_K) - [F(x_T) + h (correction + sum_k phi_k / b_k)] = O(h^2) (theory 3 and 4),
    checked with the same continuous schedule beta(t) = 2 + t sampled at two step sizes."""
    T = 4.0
    flow = float(js.gaussian_gd_loss(gauss, horizon=T))
    corr = float(js.gaussian_correction(gauss, horizon=T))
    rem = []
    for h in (0.02, 0.01):
        K = round(T / h)
        b = 2.0 + h * np.arange(K)
        phik = np.asarray(js.gaussian_sensitivity(gauss, lr=h, steps=K))
        exact = float(js.exact_expected_loss(gauss, b, lr=h))
        rem.append(exact - (flow + h * (corr + np.sum(phik / b))))
    # Halving h divides an O(h^2) remainder by 4; 3..5 allows the O(h^3) term at these h.
    assert 3.0 < rem[0] / rem[1] < 5.0


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------


def test_bad_inputs(gauss, data_arrays):
    F, y, _ = data_arrays
    nonquad = js.Problem(lambda x: jnp.sum(jnp.cosh(x)), lambda x: jnp.eye(2), jnp.zeros(2))
    b = np.full(5, 2.0)
    cases = [
        ("problem", lambda: js.exact_expected_loss(nonquad, b, lr=0.1)),
        ("problem", lambda: js.exact_expected_loss("not a problem", b, lr=0.1)),
        ("problem", lambda: js.exact_gd_loss(nonquad, lr=0.1, steps=3)),
        ("lr", lambda: js.exact_expected_loss(gauss, b, lr=0.0)),
        ("lr", lambda: js.exact_expected_loss(gauss, b, lr=-1.0)),
        ("lr", lambda: js.exact_expected_loss(gauss, b, lr=np.nan)),
        ("lr", lambda: js.exact_expected_loss(gauss, b, lr=[0.1, 0.2])),
        ("batch_sizes", lambda: js.exact_expected_loss(gauss, np.ones((2, 3)), lr=0.1)),
        ("batch_sizes", lambda: js.exact_expected_loss(gauss, np.ones(0), lr=0.1)),
        ("batch_sizes", lambda: js.exact_expected_loss(gauss, [1.0, 0.0], lr=0.1)),
        ("batch_sizes", lambda: js.exact_expected_loss(gauss, [1.0, -2.0], lr=0.1)),
        ("batch_sizes", lambda: js.exact_expected_loss(gauss, [1.0, np.nan], lr=0.1)),
        ("batch_sizes", lambda: js.exact_loss_trajectory(gauss, 3.0, lr=0.1)),
        (
            "batch_sizes",
            lambda: js.exact_expected_loss(
                js.LinearRegressionData(F, y, replace=False), [31.0], lr=0.1
            ),
        ),
        ("steps", lambda: js.exact_gd_loss(gauss, lr=0.1, steps=0)),
        ("steps", lambda: js.exact_gd_loss(gauss, lr=0.1, steps=2.0)),
        ("problem", lambda: js.gaussian_phi(js.LinearRegressionData(F, y), 1.0, horizon=2.0)),
        ("problem", lambda: js.gaussian_sensitivity(nonquad, lr=0.1, steps=3)),
        ("horizon", lambda: js.gaussian_phi(gauss, 1.0, horizon=0.0)),
        ("horizon", lambda: js.gaussian_correction(gauss, horizon=-1.0)),
        ("horizon", lambda: js.gaussian_gd_loss(gauss, horizon=-1.0)),
        ("lr", lambda: js.gaussian_sensitivity(gauss, lr=-0.1, steps=3)),
        ("steps", lambda: js.gaussian_sensitivity(gauss, lr=0.1, steps=0)),
        ("t", lambda: js.gaussian_phi(gauss, np.inf, horizon=2.0)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}:"):
            call()
    # Under tracing the value checks are eqx.error_if guards, raised when the program runs.
    with pytest.raises(Exception, match="lr: must be > 0"):
        jax.jit(lambda h: js.exact_expected_loss(gauss, b, lr=h))(-1.0)


def test_exprel_matches_numpy_and_is_smooth_at_zero():
    # The one exprel of the package (eigen step integrals, exact recursion rates): against NumPy's
    # expm1(x) / x away from 0 (float64 rounding, 1e-15) and the series 1 + x/2 at 0, with the
    # derivative 1/2 there (reverse mode goes through the series branch).
    from jaxsched._misc import exprel

    x = np.array([-30.0, -3.0, -1e-3, -1e-4, -9.9e-5, -1e-9, 1e-9, 9.9e-5, 1e-4, 1e-3, 2.0])
    np.testing.assert_allclose(np.asarray(exprel(jnp.asarray(x))), np.expm1(x) / x, rtol=1e-15)
    assert float(exprel(jnp.asarray(0.0))) == 1.0
    np.testing.assert_allclose(float(jax.grad(exprel)(0.0)), 0.5, rtol=1e-15)
