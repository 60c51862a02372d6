"""The expansion (theory 3) and the sensitivity (theory 4) against independent references:
closed forms of theory 5.1 integrated by SciPy, reverse-mode autodiff, exact discrete recursions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nonquadratic_problem, random_gaussian
from scipy.integrate import quad

import jaxsched as js
from jaxsched._expansion import adjoint as _adjoint, eigen as _eigen, moments as _expansion
from jaxsched.datasets import diabetes_problem


def phi_closed_form_steps(problem, h, steps):
    """Theory 5.1's phi(t) in the eigenbasis, integrated per step by adaptive quadrature."""
    lam, Q = np.linalg.eigh(np.asarray(problem.cov))
    v0 = Q.T @ (np.asarray(problem.x0) - np.asarray(problem.x_star))
    s2 = float(problem.noise_var)
    T = h * steps

    def phi(t):
        v = np.exp(-lam * t) * v0
        return 0.5 * np.sum(lam**2 * np.exp(-2 * lam * (T - t)) * (lam * v**2 + lam @ v**2 + s2))

    return np.array(
        [quad(phi, k * h, (k + 1) * h, epsabs=0, epsrel=1e-13)[0] for k in range(steps)]
    )


def relerr(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b)))


@pytest.mark.parametrize("d", [1, 5, 20])
def test_phi_adjoint_equals_closed_form_and_reverse_mode(d):
    # Tolerance 1e-6 (the issue's): the solvers run at rtol 1e-9, and quad at 1e-13.
    problem = random_gaussian(d, seed=d)
    h, steps = 0.1, 20
    phi = js.sensitivity(problem, lr=h, steps=steps)
    ref = phi_closed_form_steps(problem, h, steps)
    assert relerr(phi, ref) < 1e-6
    # J1 is affine in u = 1/b, and phi_k is its derivative in u_k (theory 4).
    u = jnp.asarray(np.random.default_rng(0).uniform(0.1, 1.0, steps))
    grad = jax.grad(lambda u: js.expansion(problem, 1.0 / u, lr=h).j1)(u)
    assert relerr(grad, ref) < 1e-6


def test_worked_example_d3():
    # Theory 5.1: lam = (1, 0.3, 0.05), v0 = (1, -2, 3), s2 = 0.5, T = 10, hN = 40.
    problem = js.GaussianLinearRegression(
        jnp.diag(jnp.array([1.0, 0.3, 0.05])), jnp.zeros(3), jnp.array([1.0, -2.0, 3.0]), 0.5
    )
    # Theory quotes 7 digits, rounded: tolerance half a unit of the last digit (5e-8).
    h, steps, budget = 0.01, 1000, 40.0
    phi = np.asarray(js.sensitivity(problem, lr=h, steps=steps))
    # The constant schedule's value is exact at any h (per-step integrals sum to the integral).
    assert abs(phi.sum() / (budget / h / steps) - 0.0585043) < 5e-8
    # The per-step optimum (sum sqrt(phi_k))^2 / N is a midpoint rule for the continuous optimum
    # (int sqrt(phi))^2 / (hN), with an O(h^2) error. Pairs of steps give the same at 2h, and
    # Richardson extrapolation removes the h^2 term.
    fine = np.sum(np.sqrt(phi)) ** 2 / (budget / h)
    coarse = np.sum(np.sqrt(phi[0::2] + phi[1::2])) ** 2 / (budget / (2 * h))
    continuous = (4 * fine - coarse) / 3
    assert abs(continuous - 0.0267537) < 5e-8


def test_expected_loss_identity_quadratic_and_data():
    # expected_loss == base + h (correction + sum_k phi_k w(b_k)): two independent diffrax routes
    # (forward moment system with jump times vs adjoint), equal to solver tolerance (1e-9 rtol).
    # Same shapes as the order test below (d = 3 Gaussian, diabetes, 50 steps): compiles are shared.
    rng = np.random.default_rng(1)
    h, steps = 0.04, 50
    b = jnp.asarray(rng.integers(2, 20, steps), float)
    problems = [random_gaussian(3, 7), diabetes_problem(), diabetes_problem(replace=False)]
    for p in problems:
        parts = js.first_order_parts(p, lr=h, steps=steps)
        lhs = js.expected_loss(p, b, lr=h)
        rhs = parts.base_loss + h * (parts.correction + jnp.sum(parts.phi * p.noise_weight(b)))
        assert abs(lhs - rhs) < 1e-8 * abs(rhs)


def test_nonquadratic_adjoint_equals_reverse_mode():
    problem = nonquadratic_problem()
    h, steps = 0.1, 30
    phi = js.sensitivity(problem, lr=h, steps=steps, rtol=1e-11, atol=1e-13)
    u = jnp.linspace(0.2, 0.6, steps)
    grad = jax.grad(
        lambda u: js.expansion(problem, 1.0 / u, lr=h, rtol=1e-11, atol=1e-13).j1
    )(u)
    # Theory 4 reports 1e-9 agreement; both routes at rtol 1e-11.
    assert relerr(phi, grad) < 1e-8
    # The third-derivative term matters here: m_T is not zero.
    e = js.expansion(problem, 1.0 / u, lr=h)
    assert float(jnp.linalg.norm(e.m_final)) > 1e-3


def order_slope(problem, T, batch):
    hs = np.array([0.04, 0.02, 0.01, 0.005])
    errs = []
    for h in hs:
        steps = int(round(T / h))
        b = jnp.full(steps, float(batch))
        errs.append(abs(float(js.exact_expected_loss(problem, b, lr=h) - js.expected_loss(problem, b, lr=h))))
    return np.polyfit(np.log(hs), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("which", ["gaussian", "diabetes"])
def test_order_h_squared(which):
    problem = random_gaussian(3, 7) if which == "gaussian" else diabetes_problem()
    slope, errs = order_slope(problem, T=2.0, batch=4)
    assert 1.8 <= slope <= 2.2, (slope, errs)


def test_vmap_over_noise_and_lr_equals_loop_and_one_trace(trace_counter):
    base = random_gaussian(3, 11)
    steps = 50
    b = jnp.linspace(2.0, 10.0, steps)
    rng = np.random.default_rng(2)
    noises = jnp.asarray(rng.uniform(0.1, 1.0, 16))
    lrs = jnp.asarray(rng.uniform(0.02, 0.1, 16))

    def one(s2, h):
        p = js.GaussianLinearRegression(base.cov, base.x_star, base.x0, s2)
        return js.expected_loss(p, b, lr=h), js.sensitivity(p, lr=h, steps=steps)

    loss_v, phi_v = jax.vmap(one)(noises, lrs)
    one(noises[0], lrs[0])  # warm the unbatched traces
    watch, counts = trace_counter
    watch(_expansion, "_moment_field")
    watch(_eigen, "eigen_parts")
    loop = [one(s, h) for s, h in zip(noises, lrs, strict=True)]
    assert counts == {}  # no retrace when only values change
    np.testing.assert_allclose(loss_v, [lv for lv, _ in loop], rtol=1e-12)
    np.testing.assert_allclose(phi_v, np.stack([pv for _, pv in loop]), rtol=1e-10)


def test_one_trace_per_entry_point(trace_counter):
    p = random_gaussian(3, 5)
    b = jnp.full(50, 3.0)
    js.expected_loss(p, b, lr=0.1)
    js.sensitivity(p, lr=0.1, steps=50, method="dense")
    js.sensitivity(p, lr=0.1, steps=50, method="eigen")
    watch, counts = trace_counter
    watch(_expansion, "_moment_field")
    watch(_adjoint, "first_order_solves")
    watch(_eigen, "eigen_parts")
    for h, s2 in [(0.05, 0.1), (0.2, 1.0), (0.01, 0.0)]:
        q = js.GaussianLinearRegression(p.cov * 2, p.x_star, p.x0 + 1, s2)
        js.expected_loss(q, b * 2, lr=h)
        js.sensitivity(q, lr=h, steps=50, method="dense")
        js.sensitivity(q, lr=h, steps=50, method="eigen")
    assert counts == {}


def test_bad_inputs_name_the_argument():
    p = random_gaussian(2, 0)
    b = jnp.full(5, 2.0)
    cases = [
        (lambda: js.expected_loss(p, b, lr=0.0), "lr"),
        (lambda: js.expected_loss(p, b, lr=-1.0), "lr"),
        (lambda: js.expected_loss(p, b, lr=float("nan")), "lr"),
        (lambda: js.expected_loss(p, jnp.zeros((2, 2)), lr=0.1), "batch_sizes"),
        (lambda: js.expected_loss(p, jnp.array([1.0, -1.0]), lr=0.1), "batch_sizes"),
        (lambda: js.expected_loss(p, jnp.array([1.0, jnp.nan]), lr=0.1), "batch_sizes"),
        (lambda: js.sensitivity(p, lr=0.1, steps=0), "steps"),
        (lambda: js.sensitivity(p, lr=0.1, steps=-3), "steps"),
        (lambda: js.sensitivity("not a problem", lr=0.1, steps=3), "problem"),
        (lambda: js.GaussianLinearRegression(jnp.array([[1.0, 0.5], [0.0, 1.0]]), jnp.zeros(2), jnp.zeros(2), 0.1), "cov"),
        (lambda: js.GaussianLinearRegression(jnp.array([[1.0, 0.0], [0.0, -1.0]]), jnp.zeros(2), jnp.zeros(2), 0.1), "cov"),
        (lambda: js.GaussianLinearRegression(jnp.eye(2), jnp.zeros(3), jnp.zeros(2), 0.1), "x_star"),
        (lambda: js.GaussianLinearRegression(jnp.eye(2), jnp.zeros(2), jnp.array([0.0, jnp.inf]), 0.1), "x0"),
        (lambda: js.GaussianLinearRegression(jnp.eye(2), jnp.zeros(2), jnp.zeros(2), -0.1), "noise_var"),
        (lambda: js.LinearRegressionData(jnp.ones((5, 2)), jnp.ones(4), jnp.zeros(2)), "targets"),
        (lambda: js.LinearRegressionData(jnp.full((5, 2), jnp.nan), jnp.ones(5), jnp.zeros(2)), "features"),
        (lambda: js.Problem(lambda x: x, lambda x: jnp.eye(2), jnp.zeros(2)), "loss"),
        (lambda: js.Problem(lambda x: jnp.sum(x), lambda x: jnp.eye(3), jnp.zeros(2)), "noise_cov"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
