"""Conformance lists: every problem's derivatives against autodiff and its Sigma PSD; every
sensitivity method x every problem it accepts against one SciPy reference; the three methods
through ``optimal_schedule`` on the diabetes data; the batch cap without replacement.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nonquadratic_problem, random_data, random_gaussian
from scipy.integrate import solve_ivp

import jaxsched as js


def logistic_problem():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 3))
    y = (X @ np.array([1.0, -0.5, 0.25]) + 0.3 * rng.normal(size=30) > 0).astype(float)

    def loss(p, ex):
        x, t = ex
        z = x @ p
        return jnp.logaddexp(0.0, z) - t * z

    return js.DataProblem(loss, (X, y), np.array([0.3, -0.2, 0.1]))


PROBLEMS = {
    "gaussian": lambda: random_gaussian(3, 11),
    "diagonal": lambda: js.DiagonalGaussianRegression(jnp.array([1.0, 0.3, 0.05]),
                                                      jnp.array([1.0, -2.0, 3.0]), 0.5),
    "data": lambda: random_data(40, 3, 2),
    "data_without_replacement": lambda: random_data(40, 3, 2, replace=False),
    "nonquadratic": nonquadratic_problem,
    "logistic": logistic_problem,
}


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def named_problem(request):
    return request.param, PROBLEMS[request.param]()


# ------------------------------------------------------------------------------------------------
# problems


def test_derivatives_equal_autodiff_and_sigma_is_psd(named_problem):
    _, p = named_problem
    rng = np.random.default_rng(0)
    d = p.dim
    for _ in range(2):
        x = jnp.asarray(rng.normal(size=d))
        a = jnp.asarray(rng.normal(size=d))
        M = rng.normal(size=(d, d))
        P = jnp.asarray(M @ M.T)
        np.testing.assert_allclose(p.gradient(x), jax.grad(p.value)(x), rtol=1e-10, atol=1e-12)
        H = jax.hessian(p.value)(x)
        np.testing.assert_allclose(p.hessian(x), H, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(p.hvp(x, a), H @ a, rtol=1e-10, atol=1e-12)
        # D3f by autodiff of the value: third derivative tensor contracted explicitly (tiny d).
        T3 = jax.jacfwd(jax.hessian(p.value))(x)  # T3[j, k, i] = d_i H_jk
        np.testing.assert_allclose(p.third_contraction(x, P), jnp.einsum("jki,jk->i", T3, P),
                                   rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(p.third_hessian(x, a), jnp.einsum("jki,i->jk", T3, a),
                                   rtol=1e-9, atol=1e-11)
        S = np.asarray(p.covariance(x))
        np.testing.assert_allclose(S, S.T, rtol=0, atol=1e-12)
        assert np.linalg.eigvalsh(S).min() >= -1e-10 * max(1.0, np.abs(S).max())


@pytest.mark.parametrize("name", ["data", "data_without_replacement", "logistic"])
def test_finite_data_covariance_from_per_example_gradients(name):
    p = PROBLEMS[name]()
    assert p.is_finite_data
    x = jnp.asarray(np.random.default_rng(1).normal(size=p.dim))
    G = p.per_example_gradients(x, jnp.arange(p.num_examples))
    # per-example gradients by autodiff of each example's loss are independent of the closed forms
    np.testing.assert_allclose(G.mean(axis=0), p.gradient(x), rtol=1e-10, atol=1e-12)
    Gc = G - G.mean(axis=0)
    np.testing.assert_allclose(p.covariance(x), Gc.T @ Gc / p.num_examples, rtol=1e-9, atol=1e-12)
    n = p.num_examples
    w = p.noise_weight(jnp.asarray([1.0, float(n)]))
    np.testing.assert_allclose(w, [1.0, 1.0 / n] if p.replace else [1.0, 0.0], atol=1e-15)
    assert p.batch_cap() == (None if p.replace else n)


# ------------------------------------------------------------------------------------------------
# sensitivity methods x problems against one SciPy reference

LR, STEPS = 0.1, 10


def scipy_phi(p, lr, steps):
    """phi_k of docs/theory.md §4 by SciPy's solve_ivp (DOP853): the gradient flow forward with
    a dense output, then ``a, Lam, q`` backward, with the problem's derivatives evaluated by JAX
    one point at a time (the integrators are SciPy's, independent of diffrax and of the step-unit
    formulation)."""
    grad = jax.jit(lambda x: p.gradient(x))
    hess = jax.jit(lambda x: p.hessian(x))
    cov = jax.jit(lambda x: p.covariance(x))
    third = jax.jit(lambda x, a: p.third_hessian(x, a))
    d = p.dim
    T = lr * steps
    opts = dict(method="DOP853", rtol=1e-12, atol=1e-14)
    fwd = solve_ivp(lambda t, x: -np.asarray(grad(x)), (0.0, T), np.asarray(p.x0),
                    dense_output=True, **opts)
    xT = fwd.y[:, -1]
    a0 = np.asarray(jax.grad(p.terminal_value)(xT))
    L0 = 0.5 * np.asarray(jax.hessian(p.terminal_value)(xT))

    def rhs(t, y):
        a, Lam = y[:d], y[d:d + d * d].reshape(d, d)
        x = fwd.sol(t)
        H = np.asarray(hess(x))
        dLam = H @ Lam + Lam @ H + 0.5 * np.asarray(third(x, a))
        return np.concatenate([H @ a, dLam.ravel(), [-np.sum(Lam * np.asarray(cov(x)))]])

    ts = lr * np.arange(steps, -1, -1)
    bwd = solve_ivp(rhs, (T, 0.0), np.concatenate([a0, L0.ravel(), [0.0]]), t_eval=ts, **opts)
    q = bwd.y[-1][::-1]
    return q[:-1] - q[1:]


@pytest.fixture(scope="module")
def references():
    return {}


def _methods_for(p):
    out = [js.DenseAdjoint()]
    if p.is_quadratic:
        out.append(js.Eigenbasis())
    if p.is_finite_data:
        out.append(js.MatrixFree(chunk_size=40))
    return out


def test_every_method_equals_the_scipy_reference(named_problem, references):
    name, p = named_problem
    ref = scipy_phi(p, LR, STEPS)
    for method in _methods_for(p):
        phi = js.sensitivity(p, lr=LR, steps=STEPS, method=method)
        # solver tolerances 1e-9 (diffrax) and 1e-12 (SciPy): agreement to 1e-7 relative
        np.testing.assert_allclose(phi, ref, rtol=1e-7, atol=1e-12 * np.abs(ref).max(),
                                   err_msg=f"{name} / {type(method).__name__}")


def test_auto_picks_a_method_that_accepts_the_problem(named_problem):
    _, p = named_problem
    parts = js.first_order_parts(p, lr=LR, steps=STEPS)
    assert parts.result == js.RESULTS.successful
    assert np.all(np.isfinite(parts.phi))


def test_methods_refuse_problems_they_cannot_do():
    p = nonquadratic_problem()
    with pytest.raises(ValueError, match="method"):
        js.sensitivity(p, lr=LR, steps=STEPS, method=js.Eigenbasis())
    with pytest.raises(ValueError, match="method"):
        js.sensitivity(p, lr=LR, steps=STEPS, method=js.MatrixFree())
    with pytest.raises(ValueError, match="method"):
        js.sensitivity(p, lr=LR, steps=STEPS, method="spectral")


# ------------------------------------------------------------------------------------------------
# the three methods through optimal_schedule on the diabetes data


@pytest.fixture(scope="module")
def diabetes_schedules():
    p = js.datasets.diabetes_problem()
    # 10 steps: the exact matrix-free solve costs O(nodes * n^2 * d) (every node pushes every
    # example's gradient through a Hessian of all n examples), 4 nodes per step; 10 steps keep it
    # a few seconds while every method still sees the whole of the diabetes data.
    kw = dict(lr=0.05, steps=10, samples=80)
    return {name: js.optimal_schedule(p, sensitivity=m, **kw) for name, m in
            [("dense", js.DenseAdjoint()), ("eigen", js.Eigenbasis()),
             ("matrix-free", js.MatrixFree(chunk_size=64))]}


def test_dense_eigen_matrix_free_agree_through_optimal_schedule(diabetes_schedules):
    dense, eigen, mf = (diabetes_schedules[k] for k in ("dense", "eigen", "matrix-free"))
    # eigen vs dense: two independent integrations at rtol 1e-9 -> 1e-7 (the figure);
    # matrix-free in exact mode (all examples) -> 1e-6.
    np.testing.assert_allclose(eigen.phi, dense.phi, rtol=1e-7)
    np.testing.assert_allclose(mf.phi, dense.phi, rtol=1e-6)
    for other in (eigen, mf):
        np.testing.assert_array_equal(other.batch_sizes, dense.batch_sizes)
        np.testing.assert_allclose(other.predicted_loss, dense.predicted_loss, rtol=1e-9)
    assert float(mf.objective_stderr) == 0.0  # exact mode


def test_matrix_free_subsample_gives_a_schedule_with_a_standard_error():
    p = logistic_problem()
    res = js.optimal_schedule(p, lr=LR, steps=STEPS, samples=100,
                              sensitivity=js.MatrixFree(num_examples=12, chunk_size=12,
                                                        key=jax.random.key(0)))
    assert res.batch_sizes.dtype.kind == "i" and int(res.batch_sizes.sum()) == 100
    assert float(res.objective_stderr) > 0


# ------------------------------------------------------------------------------------------------
# without replacement every batch is capped at n


def test_without_replacement_batches_never_exceed_n():
    p = random_data(40, 3, 2, replace=False)
    for method in ("closed_form", "exact"):
        res = js.optimal_schedule(p, lr=0.1, steps=10, samples=300, method=method)
        assert int(res.batch_sizes.sum()) == 300
        assert int(res.batch_sizes.max()) <= 40 and float(res.beta.max()) <= 40 + 1e-9
        assert float(res.objective) > 0
    with pytest.raises(ValueError, match="samples"):
        js.optimal_schedule(p, lr=0.1, steps=10, samples=450)
