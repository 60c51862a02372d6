"""Tests of the schedule layer: rounding to an exact budget, baseline families, the free-form
parametrisation, the step -> batch callable and stage compression."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxsched as js
from jaxsched._control import stages as _schedules

K = 6  # one shape for most tests (as in test_allocation), so each jitted core compiles once


def _check_schedule(b, samples, lo, hi):
    b = np.asarray(b)
    assert np.issubdtype(b.dtype, np.integer)
    assert b.sum() == samples
    assert b.min() >= lo
    if hi is not None:
        assert b.max() <= hi


def _random_budget(rng):
    """Random bounds and budget, often tight (hi == lo, budget at either end)."""
    lo = int(rng.integers(1, 6))
    hi = None if rng.random() < 0.25 else lo + int(rng.choice([0, 1, 2, 5, 40]))
    top = (hi if hi is not None else lo + 50) * K
    samples = int(rng.choice([K * lo, top, rng.integers(K * lo, top + 1)]))
    return samples, lo, hi


def test_round_to_budget_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(150):
        samples, lo, hi = _random_budget(rng)
        beta = rng.exponential(size=K) * rng.choice([0.0, 1.0, 100.0], size=K)
        _check_schedule(js.round_to_budget(beta, samples, min_batch=lo, max_batch=hi), samples, lo, hi)


def test_round_to_budget_stays_within_one_of_a_feasible_beta():
    rng = np.random.default_rng(1)
    for _ in range(50):
        beta = rng.uniform(2.0, 30.0, size=K)
        samples = int(np.floor(beta.sum()))
        beta *= samples / beta.sum()  # feasible real target, inside [1, 40]
        b = np.asarray(js.round_to_budget(beta, samples, min_batch=1, max_batch=40))
        _check_schedule(b, samples, 1, 40)
        # Largest-remainder rounding of a feasible target: each entry is its floor or ceiling.
        assert np.all(np.abs(b - beta) < 1)
        ints = rng.integers(1, 41, size=K)
        np.testing.assert_array_equal(js.round_to_budget(ints, int(ints.sum()), max_batch=40), ints)


def test_round_to_budget_vmaps_over_samples():
    beta = np.linspace(1.0, 4.0, K)
    ns = np.array([20, 35, 70, 71, 140])
    batched = jax.vmap(lambda n: js.round_to_budget(beta, n, min_batch=2, max_batch=30))(ns)
    for n, b in zip(ns, np.asarray(batched), strict=True):
        _check_schedule(b, n, 2, 30)
        np.testing.assert_array_equal(b, js.round_to_budget(beta, int(n), min_batch=2, max_batch=30))


def test_baselines_random_budgets():
    rng = np.random.default_rng(2)
    for _ in range(40):
        samples, lo, hi = _random_budget(rng)
        kw = {"min_batch": lo, "max_batch": hi}
        _check_schedule(js.constant_schedule(K, samples, **kw), samples, lo, hi)
        ratio = float(rng.uniform(0.5, 20.0))
        _check_schedule(js.linear_ramp(K, samples, ratio=ratio, **kw), samples, lo, hi)
        stages = int(rng.integers(1, K + 1))
        _check_schedule(js.step_doubling(K, samples, stages=stages, **kw), samples, lo, hi)


def test_baseline_shapes():
    c = np.asarray(js.constant_schedule(K, 100))
    assert c.max() - c.min() <= 1 and c.sum() == 100
    samples = 1000 * K
    ramp = np.asarray(js.linear_ramp(K, samples, ratio=8.0))
    assert np.all(np.diff(ramp) > 0)
    # Rounding moves each end by < 1, so the ratio is off by at most (ratio + 1) / b_first.
    assert abs(ramp[-1] / ramp[0] - 8.0) <= 9.0 / ramp[0]
    dbl = np.asarray(js.step_doubling(K, 100 * K, stages=3))
    stage_values = dbl.reshape(3, 2)
    # Within a stage rounding differs by at most 1; across stages the batch doubles up to that.
    assert np.all(stage_values.max(axis=1) - stage_values.min(axis=1) <= 1)
    means = stage_values.mean(axis=1)
    np.testing.assert_allclose(means[1:] / means[:-1], 2.0, atol=3.0 / means[0])


def test_baseline_validation():
    with pytest.raises(ValueError, match="ratio"):
        js.linear_ramp(K, 70, ratio=0.0)
    with pytest.raises(ValueError, match="stages"):
        js.step_doubling(K, 70, stages=K + 1)
    with pytest.raises(ValueError, match="steps"):
        js.constant_schedule(7.0, 70)
    with pytest.raises(ValueError, match="samples"):
        js.constant_schedule(K, 70, max_batch=5)
    with pytest.raises(ValueError, match="beta"):
        js.round_to_budget(np.ones((2, 3)), 10)


@pytest.mark.parametrize("bounded", [False, True])
def test_free_form_budget_and_bounds_by_construction(bounded):
    rng = np.random.default_rng(3)
    lo, hi, samples = 2.0, (25.0 if bounded else None), 80.0
    for scale in [0.1, 1.0, 5.0, 30.0]:
        theta = scale * rng.normal(size=K)
        b = np.asarray(js.free_form_batch_sizes(theta, samples, min_batch=lo, max_batch=hi))
        assert b.sum() == pytest.approx(samples, rel=1e-13)  # exact up to rounding
        assert np.all(b >= lo) and (hi is None or np.all(b <= hi))


@pytest.mark.parametrize("bounded", [False, True])
def test_free_form_gradient_matches_finite_differences(bounded):
    rng = np.random.default_rng(4)
    phi = rng.exponential(size=K)
    lo, hi, samples = 1.5, (20.0 if bounded else None), 70.0
    theta = rng.normal(size=K)

    def loss(th):
        b = js.free_form_batch_sizes(th, samples, min_batch=lo, max_batch=hi)
        return jnp.sum(phi / b) + 0.01 * jnp.sum(b**2 * jnp.arange(K))

    grad = np.asarray(jax.grad(loss)(theta))
    h = 1e-5
    value = jax.jit(loss)
    fd = np.array([(value(theta + h * e) - value(theta - h * e)) / (2 * h) for e in np.eye(K)], dtype=float)
    # Central differences: truncation ~h^2 |f'''| ~ 1e-10, rounding ~1e-16 / h ~ 1e-11.
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("bounded", [False, True])
def test_free_form_init_reproduces_beta(bounded):
    rng = np.random.default_rng(5)
    lo, hi = 1.0, (30.0 if bounded else None)
    beta = rng.uniform(2.0, 25.0, size=K)
    samples = float(beta.sum())
    theta = js.free_form_init(beta, samples, min_batch=lo, max_batch=hi)
    b = js.free_form_batch_sizes(theta, samples, min_batch=lo, max_batch=hi)
    # beta is strictly inside the bounds: no eps clamping, only the bisection/Newton rounding.
    np.testing.assert_allclose(b, beta, rtol=1e-10)


def test_schedule_fn_in_jit_and_scan():
    b = np.array([3, 5, 8, 13])
    sched = js.schedule_fn(b)

    @jax.jit
    def run(x0):
        def step(x, k):
            size = sched(k)
            return x + size, size

        return lax.scan(step, x0, jnp.arange(7))

    total, sizes = run(jnp.asarray(0))
    np.testing.assert_array_equal(sizes, [3, 5, 8, 13, 13, 13, 13])  # clamped past the end
    assert int(total) == 3 + 5 + 8 + 4 * 13
    assert int(jax.jit(sched)(jnp.asarray(2))) == 8
    assert jnp.issubdtype(sched(0).dtype, jnp.integer)


def test_batch_schedule_does_not_retrace_for_a_new_table():
    traces = []

    @jax.jit
    def total(sched, steps):
        traces.append(1)  # runs only while tracing
        return jnp.sum(jax.vmap(sched)(steps)), sched.samples_consumed(steps[-1] + 1)

    steps = jnp.arange(6)
    first = total(js.schedule_fn([1, 2, 2, 4, 8, 8]), steps)
    second = total(js.schedule_fn(np.array([3, 3, 5, 5, 5, 9])), steps)
    assert len(traces) == 1  # same shape and dtype: the compiled code is reused
    assert [int(v) for v in first] == [25, 25] and [int(v) for v in second] == [30, 30]
    total(js.schedule_fn([1, 2, 3]), steps)
    assert len(traces) == 2  # a new length is a new shape


def test_batch_schedule_table_methods_and_json_round_trip():
    b = np.array([2, 2, 3, 3, 3, 7, 2**40])  # a value beyond float32's exact integers
    sched = js.BatchSchedule(b)
    np.testing.assert_array_equal(sched(jnp.arange(-2, 9)), [2, 2, 2, 2, 3, 3, 3, 7, 2**40, 2**40, 2**40])
    consumed = [int(sched.samples_consumed(k)) for k in range(9)]
    assert consumed == [int(b[:k].sum()) for k in range(8)] + [int(b.sum()) + 2**40]
    assert sched.stages() == [
        {"first_step": 0, "steps": 2, "batch_size": 2, "samples_consumed": 0},
        {"first_step": 2, "steps": 3, "batch_size": 3, "samples_consumed": 4},
        {"first_step": 5, "steps": 1, "batch_size": 7, "samples_consumed": 13},
        {"first_step": 6, "steps": 1, "batch_size": 2**40, "samples_consumed": 20},
    ]
    back = js.BatchSchedule.from_json(sched.to_json())
    np.testing.assert_array_equal(back.batch_sizes, b)
    assert back.batch_sizes.dtype == sched.batch_sizes.dtype


def test_batch_schedule_validation():
    for bad in ([], [[1, 2]], [1.5, 2.0], [0, 3], [4, -1]):
        with pytest.raises(ValueError, match="batch_sizes"):
            js.schedule_fn(bad)
    with pytest.raises(ValueError, match="text"):
        js.BatchSchedule.from_json("[1, 2]")
    with pytest.raises(ValueError, match="batch_sizes"):
        js.BatchSchedule.from_json('{"batch_sizes": [1, 2.5]}')
    assert int(js.schedule_fn(np.array([2.0, 4.0]))(1)) == 4  # integral floats are accepted


def _brute_force_stages(phi, samples, stages, multiple, lo, hi):
    """Minimum of sum phi/b over all schedules with <= `stages` constant stages of multiples."""
    steps = len(phi)
    levels = [c for c in range(lo, hi + 1) if c % multiple == 0]
    best = np.inf
    for s in range(1, stages + 1):
        for cuts in itertools.combinations(range(1, steps), s - 1):
            lengths = np.diff([0, *cuts, steps])
            for vals in itertools.product(levels, repeat=s):
                if np.dot(lengths, vals) == samples:
                    best = min(best, np.sum(phi / np.repeat(vals, lengths)))
    return best


def _check_compressed(phi, samples, stages, multiple, lo, hi, out):
    b, obj, unconstrained = out
    _check_schedule(b, samples, lo, hi)
    assert np.all(b % multiple == 0)
    assert np.count_nonzero(np.diff(b)) + 1 <= stages
    assert obj == pytest.approx(np.sum(phi / b), rel=1e-14)
    assert obj >= unconstrained * (1 - 1e-12)


_ROUTES = {  # module constants selecting compress_stages' route (see its docstring)
    "stage_dp": {},
    "partitions": {"_FULL_DP_WORK": 0},
    "heuristic": {"_FULL_DP_WORK": 0, "_EXHAUSTIVE_PARTITIONS": 0},
}


@pytest.mark.parametrize("route", ["stage_dp", "partitions"])
def test_compress_stages_brute_force_tiny(route, monkeypatch):
    for name, value in _ROUTES[route].items():
        monkeypatch.setattr(_schedules, name, value)
    rng = np.random.default_rng(6)
    steps = K
    for _ in range(12):
        phi = rng.exponential(size=steps) * np.linspace(0.3, 3.0, steps) ** 2
        if rng.random() < 0.3:
            phi[rng.integers(steps)] = -0.1
        stages, multiple = int(rng.integers(1, 4)), int(rng.choice([1, 2, 3]))
        lo, hi = int(rng.integers(1, 4)), int(rng.integers(8, 15))
        samples = multiple * int(rng.integers(-(-steps * lo // multiple), steps * hi // multiple + 1))
        kw = {"stages": stages, "multiple_of": multiple, "min_batch": lo, "max_batch": hi}
        best = _brute_force_stages(phi, samples, stages, multiple, lo, hi)
        if not np.isfinite(best):
            with pytest.raises(ValueError, match="samples"):
                js.compress_stages(phi, samples, **kw)
            continue
        out = js.compress_stages(phi, samples, **kw)
        _check_compressed(phi, samples, stages, multiple, lo, hi, out)
        # Both exact routes are optimal, up to float rounding of a 6-term sum.
        assert out[1] == pytest.approx(best, rel=1e-12)


def _compress(route, monkeypatch, *args, **kwargs):
    with monkeypatch.context() as patch:
        for name, value in _ROUTES[route].items():
            patch.setattr(_schedules, name, value)
        return js.compress_stages(*args, **kwargs)


def test_compress_stages_routes_agree(monkeypatch):
    """The two exact routes agree where both apply (20 steps: 191 partitions into <= 3 stages),
    and the heuristic route is valid, never better, and close (measured gaps printed)."""
    rng = np.random.default_rng(7)
    steps, gaps = 20, []
    for _ in range(4):
        phi = rng.exponential(size=steps) * np.linspace(0.3, 3.0, steps) ** rng.uniform(0.5, 3.0)
        multiple = int(rng.choice([2, 4]))
        samples = multiple * steps * int(rng.integers(2, 6))
        kw = {"stages": 3, "multiple_of": multiple, "min_batch": 1, "max_batch": None}
        exact = _compress("stage_dp", monkeypatch, phi, samples, **kw)
        other = _compress("partitions", monkeypatch, phi, samples, **kw)
        heur = _compress("heuristic", monkeypatch, phi, samples, **kw)
        assert other[1] == pytest.approx(exact[1], rel=1e-12)  # independent exact methods
        _check_compressed(phi, samples, 3, multiple, 1, None, heur)
        assert heur[1] >= exact[1] * (1 - 1e-12)
        gaps.append(heur[1] / exact[1] - 1)
    print("heuristic gaps", gaps)
    assert max(gaps) < 0.03  # measured <= 0.8% on such cases; loose bound against regressions


def test_compress_stages_larger_problem():
    rng = np.random.default_rng(8)
    steps = 80  # big budget and > 2000 partitions into 4 stages: the heuristic route
    phi = rng.exponential(size=steps) * np.linspace(0.2, 3.0, steps) ** 2
    samples = 32 * steps
    previous = np.inf
    for stages in [1, 2, 4]:
        out = js.compress_stages(phi, samples, stages=stages, multiple_of=8)
        _check_compressed(phi, samples, stages, 8, 1, None, out)
        assert out[1] <= previous * (1 + 1e-12)  # more stages never hurts
        previous = out[1]
    # Bracketed by the continuous optimum without stages (theory 4) and the constant schedule.
    assert previous >= np.sum(np.sqrt(phi)) ** 2 / samples
    assert previous < np.sum(phi) / 32


def test_compress_stages_equals_integer_optimum_when_unconstrained():
    rng = np.random.default_rng(9)
    steps = K
    phi = rng.exponential(size=steps)
    b, obj, unconstrained = js.compress_stages(
        phi, 60, stages=steps, multiple_of=1, min_batch=2, max_batch=20
    )
    ref = js.integer_optimum(phi, 60, min_batch=2, max_batch=20)
    np.testing.assert_array_equal(b, ref)
    assert obj == pytest.approx(unconstrained, rel=1e-14)


def test_compress_stages_validation():
    phi = np.ones(6)
    with pytest.raises(ValueError, match="samples.*multiple_of"):
        js.compress_stages(phi, 61, stages=2, multiple_of=4)
    with pytest.raises(ValueError, match="multiple_of"):
        js.compress_stages(phi, 60, stages=2, multiple_of=8, min_batch=9, max_batch=15)
    with pytest.raises(ValueError, match="stages"):
        js.compress_stages(phi, 60, stages=0)
    with pytest.raises(ValueError, match="phi"):
        js.compress_stages(np.ones((2, 3)), 60, stages=2)
