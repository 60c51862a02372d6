"""Optimal schedules (theory 4): closed form vs brute force, gradient descent vs closed form,
first-order optimum vs the exact discrete recursion on real data."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxsched as js
from jaxsched._control import optimal as _optimal
from jaxsched._expansion import eigen as _eigen
from jaxsched.datasets import diabetes_problem

WORKED = dict(cov=jnp.diag(jnp.array([1.0, 0.3, 0.05])), x_star=jnp.zeros(3),
              x0=jnp.array([1.0, -2.0, 3.0]))


def worked_problem(noise_var=0.5):
    return js.GaussianLinearRegression(WORKED["cov"], WORKED["x_star"], WORKED["x0"], noise_var)


def objective(phi, b):
    return float(np.sum(np.asarray(phi) / np.asarray(b, dtype=float)))


def compositions(total, parts, lo, hi):
    """All integer vectors with the given sum and bounds (brute force)."""
    for head in itertools.product(range(lo, hi + 1), repeat=parts - 1):
        last = total - sum(head)
        if lo <= last <= hi:
            yield head + (last,)


STEPS = 6  # one shape shared by the small tests below: one compile


def test_closed_form_is_exact_integer_optimum_brute_force():
    steps = STEPS
    for noise_var, lr, samples, lo, hi in [
        (0.5, 0.5, 15, 1, None), (0.0, 0.8, 25, 2, 7), (2.0, 0.3, 14, 1, 4), (0.1, 1.0, 27, 3, 6),
    ]:
        p = worked_problem(noise_var)
        # stability_clip=False: the bounds are exactly the brute force's (at lr = 1.0 the
        # stability floor 2 b_stab = 4.2 would otherwise bind; it has its own tests).
        res = js.optimal_schedule(p, lr=lr, steps=steps, samples=samples, min_batch=lo, max_batch=hi,
                                  stability_clip=False)
        b = np.asarray(res.batch_sizes)
        assert b.sum() == samples and b.min() >= lo and (hi is None or b.max() <= hi)
        hi_ = samples - (steps - 1) * lo if hi is None else hi
        best = min(objective(res.phi, c) for c in compositions(samples, steps, lo, hi_))
        # Exact integer optimum: equal to the brute-force minimum up to float rounding.
        assert objective(res.phi, b) <= best * (1 + 1e-12)
        np.testing.assert_allclose(float(res.objective), objective(res.phi, b), rtol=1e-12)


@pytest.fixture(scope="module")
def gradient_and_closed_form():
    p = worked_problem()
    kw = dict(lr=0.1, steps=64, samples=64 * 8)
    return js.optimal_schedule(p, **kw), js.optimal_schedule(p, method="gradient", **kw)


def test_gradient_method_recovers_closed_form(gradient_and_closed_form):
    cf, gd = gradient_and_closed_form
    # 64 degrees of freedom, L-BFGS through reverse mode of diffeqsolve. Objective within 1e-4
    # and schedule within 1e-3 relative (the tolerances; the solver runs at rtol 1e-9).
    assert gd.beta.shape == (64,)
    assert abs(float(gd.relaxed_objective) / float(cf.relaxed_objective) - 1) < 1e-4
    assert float(jnp.max(jnp.abs(gd.beta / cf.beta - 1))) < 1e-3
    assert int(gd.batch_sizes.sum()) == 64 * 8
    # The optimum beats the constant schedule strictly here (phi is far from constant).
    assert float(cf.constant_objective) > 1.2 * float(cf.relaxed_objective)


@pytest.fixture(scope="module")
def diabetes_results():
    p = diabetes_problem()
    kw = dict(lr=0.05, steps=400, samples=3200)
    return p, js.optimal_schedule(p, **kw), js.optimal_schedule(p, method="exact", max_iter=50, **kw)


def test_diabetes_gain_and_exact_method(diabetes_results):
    p, fo, exact = diabetes_results
    h, K = 0.05, 400
    gd = js.exact_gd_loss(p, lr=h, steps=K)
    excess_const = float(js.exact_expected_loss(p, jnp.full(K, 8.0), lr=h) - gd)
    excess_opt = float(js.exact_expected_loss(p, fo.batch_sizes, lr=h) - gd)
    # Theory 5.3: about 0.0076 vs 0.0010 (a gain of roughly 7x); the issue asks for at least 5x.
    assert excess_const >= 5 * excess_opt
    # The exact-discrete optimum is at least as good as the first-order one, real and integer.
    assert float(js.exact_expected_loss(p, exact.beta, lr=h)) <= float(
        js.exact_expected_loss(p, fo.beta, lr=h)
    )
    assert float(js.exact_expected_loss(p, exact.batch_sizes, lr=h)) <= float(
        js.exact_expected_loss(p, fo.batch_sizes, lr=h)
    )
    # Theory 5.3: the first-order schedule lands within about 1% of the exact optimum's excess.
    excess_exact = float(js.exact_expected_loss(p, exact.beta, lr=h) - gd)
    assert excess_opt <= 1.05 * excess_exact
    assert int(exact.batch_sizes.sum()) == 3200


@pytest.fixture(scope="module")
def phi_fixed():
    return np.asarray(js.sensitivity(worked_problem(), lr=0.25, steps=STEPS))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_cauchy_schwarz_optimum_never_worse(phi_fixed, data):
    steps = phi_fixed.shape[0]
    lo = data.draw(st.integers(1, 3))
    hi = data.draw(st.one_of(st.none(), st.integers(lo + 1, 30)))
    top = steps * (hi if hi is not None else 40)
    samples = data.draw(st.integers(steps * lo, top))
    res = js.optimal_schedule(worked_problem(), lr=0.25, steps=steps, samples=samples,
                              min_batch=lo, max_batch=hi)
    # Another feasible integer schedule with the same budget: random split within the bounds.
    hi_ = hi if hi is not None else samples
    other = np.full(steps, lo)
    order = data.draw(st.lists(st.integers(0, steps - 1), min_size=samples, max_size=samples))
    for k in order:
        if other.sum() == samples:
            break
        if other[k] < hi_:
            other[k] += 1
    k = 0
    while other.sum() < samples:  # fill deterministically if the random order ran out
        if other[k % steps] < hi_:
            other[k % steps] += 1
        k += 1
    assert objective(phi_fixed, res.batch_sizes) <= objective(phi_fixed, other) * (1 + 1e-12)
    # And the relaxed optimum is never worse than the integer one.
    assert objective(phi_fixed, res.beta) <= objective(phi_fixed, res.batch_sizes) * (1 + 1e-12)


def test_one_trace_and_vmap_equals_loop(trace_counter):
    steps = STEPS
    js.optimal_schedule(worked_problem(), lr=0.25, steps=steps, samples=100)
    watch, counts = trace_counter
    watch(_optimal, "_first_order_allocation")
    watch(_eigen, "eigen_parts")
    rng = np.random.default_rng(0)
    noises = rng.uniform(0.1, 1.0, 16)
    lrs = rng.uniform(0.1, 0.4, 16)
    loop = [js.optimal_schedule(worked_problem(s), lr=h, steps=steps, samples=100)
            for s, h in zip(noises, lrs, strict=True)]
    assert counts == {}

    def one(s2, h):
        return js.optimal_schedule(worked_problem(s2), lr=h, steps=steps, samples=100)

    vm = jax.vmap(one)(jnp.asarray(noises), jnp.asarray(lrs))
    np.testing.assert_array_equal(vm.batch_sizes, np.stack([r.batch_sizes for r in loop]))
    np.testing.assert_allclose(vm.predicted_loss, [r.predicted_loss for r in loop], rtol=1e-12)
    np.testing.assert_allclose(vm.beta, np.stack([r.beta for r in loop]), rtol=1e-9)


def test_predicted_loss_matches_expected_loss():
    p = worked_problem()
    res = js.optimal_schedule(p, lr=0.25, steps=STEPS, samples=100)
    # The result's prediction uses the affine identity; expected_loss integrates the moment ODE.
    direct = js.expected_loss(p, res.batch_sizes, lr=0.25)
    assert abs(float(res.predicted_loss - direct)) < 1e-8 * abs(float(direct))


def test_bad_inputs_name_the_argument():
    p = worked_problem()
    nonquad = js.Problem(lambda x: jnp.sum(jnp.log(jnp.cosh(x))), lambda x: jnp.eye(3), jnp.ones(3))
    kw = dict(lr=0.1, steps=10, samples=50)
    cases = [
        (dict(kw, lr=0.0), "lr"),
        (dict(kw, lr=-0.1), "lr"),
        (dict(kw, steps=0), "steps"),
        (dict(kw, samples=9), "samples"),
        (dict(kw, min_batch=6), "samples"),
        (dict(kw, min_batch=5, max_batch=4), "min_batch"),
        (dict(kw, max_batch=4), "samples"),
        (dict(kw, method="newton"), "method"),
        (dict(kw, min_batch=0), "min_batch"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            js.optimal_schedule(p, **args)
    with pytest.raises(ValueError, match="method"):
        js.optimal_schedule(nonquad, method="exact", **kw)
