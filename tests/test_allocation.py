"""Tests of the phi -> schedule allocation (theory 4): the square-root rule and the exact integer
optimum, against brute force, SciPy and the closed forms."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

import jaxsched as js
from jaxsched._control import allocation as _allocation

# One shape for the randomised property tests, so each jitted core compiles once per file.
K_PROP = 6


def _brute_force_min(phi, samples, lo, hi):
    """Minimum of sum phi/b over all integer compositions of `samples` with lo <= b <= hi."""
    K = len(phi)
    grid = np.array(list(itertools.product(range(lo, hi + 1), repeat=K - 1)), dtype=float)
    last = samples - grid.sum(axis=1)
    ok = (last >= lo) & (last <= hi)
    b = np.column_stack([grid[ok], last[ok]])
    return np.min((phi / b).sum(axis=1))


def _random_phi(rng, K, *, zeros=True, negatives=True):
    phi = rng.exponential(size=K)
    if zeros:
        phi *= rng.random(K) > 0.2
    if negatives and rng.random() < 0.25:
        phi[rng.integers(K)] = -rng.exponential()
    return phi


@pytest.mark.parametrize("K", [3, 4, 5])
def test_integer_optimum_equals_brute_force(K):
    rng = np.random.default_rng(K)
    for _ in range(60):
        lo = int(rng.integers(1, 4))
        bounded = rng.random() < 0.7
        hi = lo + int(rng.integers(0, 7)) if bounded else None
        top = hi if bounded else lo + 3  # unbounded: keeps the brute-force grid small
        samples = int(rng.integers(K * lo, K * top + 1))
        phi = _random_phi(rng, K)
        b = np.asarray(js.integer_optimum(phi, samples, min_batch=lo, max_batch=hi))
        hi_eff = hi if bounded else samples - (K - 1) * lo
        assert b.sum() == samples
        assert b.min() >= lo and b.max() <= hi_eff
        best = _brute_force_min(phi, samples, lo, hi_eff)
        # Same objective as brute force up to float rounding of a 5-term sum.
        assert np.sum(phi / b) == pytest.approx(best, rel=1e-12, abs=1e-14)


def _slsqp(phi, samples, lo, hi):
    K = len(phi)
    x0 = np.full(K, samples / K)
    res = scipy.optimize.minimize(
        lambda b: np.sum(phi / b),
        x0,
        jac=lambda b: -phi / b**2,
        bounds=[(lo, hi)] * K,
        constraints=[{"type": "eq", "fun": lambda b: b.sum() - samples, "jac": lambda b: np.ones(K)}],
        method="SLSQP",
        options={"ftol": 1e-13, "maxiter": 1000},
    )
    # SLSQP may stop with "positive directional derivative" once at machine precision; what the
    # comparison needs is a feasible point, so check that instead of res.success.
    assert abs(res.x.sum() - samples) < 1e-8 * samples
    assert np.all(res.x >= lo - 1e-10) and np.all(res.x <= hi + 1e-10)
    return res.x


def test_relaxed_optimum_matches_slsqp_with_bounds():
    rng = np.random.default_rng(0)
    for _ in range(20):
        phi = rng.exponential(size=K_PROP) * rng.choice([0.1, 1.0, 10.0], size=K_PROP)
        lo = float(rng.uniform(0.5, 3.0))
        hi = lo + float(rng.uniform(1.0, 30.0))
        samples = float(rng.uniform(K_PROP * lo, K_PROP * hi))
        b = np.asarray(js.relaxed_optimum(phi, samples, min_batch=lo, max_batch=hi))
        ref = _slsqp(phi, samples, lo, hi)
        assert b.sum() == pytest.approx(samples, rel=1e-13)
        assert np.all(b >= lo) and np.all(b <= hi)
        # SLSQP converges to ~1e-9 in the objective; ours may only be lower (it is the minimiser).
        f, f_ref = np.sum(phi / b), np.sum(phi / ref)
        assert f == pytest.approx(f_ref, rel=1e-6)
        assert f <= f_ref * (1 + 1e-12) + 1e-8 * abs(f_ref)  # ref feasible to 1e-8
        # Strictly convex: the minimiser is unique; SLSQP pins it to ~1e-7 (sqrt of its ftol).
        np.testing.assert_allclose(b, ref, rtol=1e-5)


def test_relaxed_optimum_closed_form_unbounded():
    rng = np.random.default_rng(1)
    for _ in range(10):
        phi = rng.uniform(0.5, 2.0, size=K_PROP)
        samples = 100.0 * K_PROP  # every b_k >= ~50 > min_batch: no bound active
        b = np.asarray(js.relaxed_optimum(phi, samples))
        closed = samples * np.sqrt(phi) / np.sum(np.sqrt(phi))
        # The exact solve on the active set reproduces the closed form to rounding.
        np.testing.assert_allclose(b, closed, rtol=1e-13)
        assert np.sum(phi / b) == pytest.approx(np.sum(np.sqrt(phi)) ** 2 / samples, rel=1e-13)


def test_ratio_to_constant_is_cauchy_schwarz():
    rng = np.random.default_rng(2)
    for _ in range(10):
        phi = rng.uniform(0.1, 5.0, size=K_PROP)
        samples = 64 * K_PROP
        b = js.relaxed_optimum(phi, samples)
        const = jnp.full(K_PROP, samples / K_PROP)
        ratio = js.first_order_objective(phi, b) / js.first_order_objective(phi, const)
        expected = np.sum(np.sqrt(phi)) ** 2 / (K_PROP * np.sum(phi))
        assert float(ratio) == pytest.approx(expected, rel=1e-12)  # both closed forms, rounding
        assert expected < 1


def _random_feasible_integer(rng, K, samples, lo, hi):
    """Uniform-ish random integer schedule with the budget and bounds (random walk of moves)."""
    b = np.full(K, lo)
    left = samples - K * lo
    while left:
        k = rng.integers(K)
        if b[k] < hi:
            b[k] += 1
            left -= 1
    return b


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    lo=st.integers(1, 4),
    width=st.integers(1, 20),
    fill=st.floats(0.0, 1.0),
)
def test_optimum_beats_any_feasible_schedule(seed, lo, width, fill):
    rng = np.random.default_rng(seed)
    hi = lo + width
    samples = int(round(K_PROP * lo + fill * K_PROP * width))
    phi = rng.exponential(size=K_PROP) + 1e-3
    b_int = np.asarray(js.integer_optimum(phi, samples, min_batch=lo, max_batch=hi))
    b_rel = np.asarray(js.relaxed_optimum(phi, samples, min_batch=lo, max_batch=hi))
    f_int, f_rel = np.sum(phi / b_int), np.sum(phi / b_rel)
    # Relaxation: the real optimum is at most the integer one (tolerance: rounding).
    assert f_rel <= f_int * (1 + 1e-12)
    for _ in range(20):
        other = _random_feasible_integer(rng, K_PROP, samples, lo, hi)
        assert f_int <= np.sum(phi / other) * (1 + 1e-12)
        # A random real feasible schedule: a convex combination of two integer ones.
        t = rng.random()
        mixed = t * other + (1 - t) * _random_feasible_integer(rng, K_PROP, samples, lo, hi)
        assert f_rel <= np.sum(phi / mixed) * (1 + 1e-12)


def test_nonpositive_phi_keep_min_batch_unless_forced():
    phi = np.array([2.0, 0.0, -1.0, 3.0, -0.5, 1.0])
    # Budget the positive steps can absorb: the others stay at min_batch.
    b = np.asarray(js.integer_optimum(phi, 40, min_batch=2, max_batch=20))
    assert list(b[[1, 2, 4]]) == [2, 2, 2]
    r = np.asarray(js.relaxed_optimum(phi, 40.0, min_batch=2, max_batch=20))
    np.testing.assert_allclose(r[[1, 2, 4]], 2.0, rtol=0, atol=1e-12)
    # Positives saturated at 10 (30 samples), 6 left for the others: phi == 0 first (free),
    # then the negative step with the smallest |phi|.
    b = np.asarray(js.integer_optimum(phi, 6 + 30 + 5, min_batch=2, max_batch=10))
    assert list(b) == [10, 7, 2, 10, 2, 10]
    b = np.asarray(js.integer_optimum(phi, 30 + 2 + 10 + 6, min_batch=2, max_batch=10))
    assert list(b) == [10, 10, 2, 10, 6, 10]
    r = np.asarray(js.relaxed_optimum(phi, 30 + 2 + 10 + 6.0, min_batch=2, max_batch=10))
    np.testing.assert_allclose(r, [10, 10, 2, 10, 6, 10], atol=1e-12)
    # All phi == 0: the budget is spread evenly.
    np.testing.assert_allclose(js.relaxed_optimum(np.zeros(4), 10.0), 2.5, rtol=1e-14)
    assert sorted(np.asarray(js.integer_optimum(np.zeros(4), 10))) == [2, 2, 3, 3]


def test_relaxed_forced_negative_fill_beats_random_feasible_points():
    # The cost is concave on phi < 0: check the fill rule against random feasible points.
    rng = np.random.default_rng(3)
    phi = np.array([-1.0, -3.0, -0.2, 2.0, -2.0, 0.5])
    lo, hi, samples = 1.0, 8.0, 30.0
    b = np.asarray(js.relaxed_optimum(phi, samples, min_batch=lo, max_batch=hi))
    assert b.sum() == pytest.approx(samples, rel=1e-14)
    f = np.sum(phi / b)
    for _ in range(2000):
        x = rng.dirichlet(np.ones(K_PROP)) * (samples - K_PROP * lo) + lo
        if np.all(x <= hi):
            assert f <= np.sum(phi / x) + 1e-12


def test_integer_optimum_exact_ties():
    # Constant phi: every gain at a level ties, so the optimum is as even as possible.
    b = np.asarray(js.integer_optimum(np.ones(K_PROP), 10 * K_PROP + 4))
    assert b.sum() == 10 * K_PROP + 4 and b.max() - b.min() == 1
    np.testing.assert_array_equal(b, [10, 10, 11, 11, 11, 11])  # ties go to later steps


def test_first_order_objective_batches():
    phi = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([2.0, 4.0])
    np.testing.assert_allclose(js.first_order_objective(phi, b), [1.0, 2.5])


@pytest.mark.parametrize("fn", [js.integer_optimum, js.relaxed_optimum])
def test_validation(fn):
    phi = np.ones(4)
    with pytest.raises(ValueError, match="samples"):
        fn(phi, 3, min_batch=1)
    with pytest.raises(ValueError, match="samples"):
        fn(phi, 50, min_batch=1, max_batch=10)
    with pytest.raises(ValueError, match="max_batch"):
        fn(phi, 12, min_batch=3, max_batch=2)
    with pytest.raises(ValueError, match="min_batch"):
        fn(phi, 12, min_batch=0)
    with pytest.raises(ValueError, match="phi"):
        fn(np.ones((2, 2)), 12)
    with pytest.raises(ValueError, match="phi"):
        fn(np.array([1.0, np.nan, 1.0, 1.0]), 12)
    with pytest.raises(ValueError, match="samples"):
        fn(phi, np.ones(2))


def test_integer_validation_non_integer():
    with pytest.raises(ValueError, match="samples"):
        js.integer_optimum(np.ones(4), 12.5)
    with pytest.raises(ValueError, match="max_batch"):
        js.integer_optimum(np.ones(4), 12, max_batch=4.5)


def test_infeasible_budget_inside_jit_fails_loudly():
    f = jax.jit(lambda p, n: js.integer_optimum(p, n, min_batch=2))
    with pytest.raises(Exception, match="infeasible"):
        jax.block_until_ready(f(jnp.ones(K_PROP), jnp.asarray(5)))


def test_vmap_over_phi_and_samples():
    rng = np.random.default_rng(4)
    phis = rng.exponential(size=(5, K_PROP))
    ns = np.array([30, 31, 45, 60, 61])
    batched = jax.vmap(lambda p, n: js.integer_optimum(p, n, min_batch=2, max_batch=15))(phis, ns)
    relaxed = jax.vmap(lambda p, n: js.relaxed_optimum(p, n, min_batch=2.0, max_batch=15.0))(
        phis, ns.astype(float)
    )
    for i in range(5):
        one = js.integer_optimum(phis[i], int(ns[i]), min_batch=2, max_batch=15)
        np.testing.assert_array_equal(batched[i], one)
        one_r = js.relaxed_optimum(phis[i], float(ns[i]), min_batch=2.0, max_batch=15.0)
        np.testing.assert_allclose(relaxed[i], one_r, rtol=1e-13)


def test_one_compile_for_new_values(monkeypatch):
    """Different phi / samples / bound values reuse one compiled core (K=13 is used nowhere
    else, so the first call traces)."""
    counts = {"int": 0, "rel": 0}
    original_pos, original_scale = _allocation._integer_positive, _allocation._scale_clip

    def counting_pos(*args):
        counts["int"] += 1
        return original_pos(*args)

    def counting_scale(*args):
        counts["rel"] += 1
        return original_scale(*args)

    monkeypatch.setattr(_allocation, "_integer_positive", counting_pos)
    monkeypatch.setattr(_allocation, "_scale_clip", counting_scale)
    rng = np.random.default_rng(5)
    for n, lo, hi in [(40, 1, None), (100, 2, 20), (57, 3, 9), (26, 2, None)]:
        phi = rng.exponential(size=13)
        b = js.integer_optimum(phi, n, min_batch=lo, max_batch=hi)
        assert int(b.sum()) == n
        r = js.relaxed_optimum(phi, float(n), min_batch=float(lo), max_batch=hi)
        assert float(r.sum()) == pytest.approx(n, rel=1e-13)
    assert counts == {"int": 1, "rel": 1}
