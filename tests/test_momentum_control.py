"""Optimal schedules with momentum and lr schedules, the stability clip, the joint lr/batch optimum and
the steps-versus-samples front (docs/theory.md §7, §8).

References, independent of the control code: the exact augmented-state recursion (theory 5, 7;
``exact_expected_loss``), perturbations of a schedule at equal budget, real ``optax.sgd`` with
momentum by Monte Carlo (``simulate_sgd``) with its standard error, and the table of theory 7.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsched as js
from jaxsched.datasets import diabetes_problem

# ------------------------------------------------------------------------------------------------
# The d = 6 problem of theory 7: eigenvalues 1 ... 0.04 (geometric), a random rotation, s2 = 1,
# T = 10, tau = 0.02, K = 500, N = 2000. Theory 7 does not state x0; with x0 - x* = c (1, -1, ...)
# in the eigenbasis, c = 0.7161 makes the first entry (constant batch, SGD) 0.013823, and the
# other fifteen entries are then predictions to check.
# ------------------------------------------------------------------------------------------------
LAM = np.geomspace(1.0, 0.04, 6)
Z0 = 0.7161 * np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
K7, N7 = 500, 2000
TABLE7 = {  # constant, first-order optimum, refined, true optimum (excess E f - s2/2)
    "sgd": ((0.02, 0.0, False), (0.013823, 0.012461, 0.012461, 0.012461)),
    "hb0.5": ((0.01, 0.5, False), (0.013803, 0.012464, 0.012459, 0.012459)),
    "hb0.9": ((0.002, 0.9, False), (0.013741, 0.012516, 0.012453, 0.012450)),
    "nesterov0.9": ((0.002, 0.9, True), (0.013721, 0.012502, 0.012452, 0.012450)),
}


def _rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def theory7_problem():
    U = _rotation(np.random.default_rng(0), 6)
    cov = U @ np.diag(LAM) @ U.T
    return js.GaussianLinearRegression(0.5 * (cov + cov.T), np.zeros(6), U @ Z0, 1.0)


@pytest.fixture(scope="module")
def table7():
    p = theory7_problem()
    out = {}
    for name, ((h, mu, nesterov), _) in TABLE7.items():
        opt = js.SGD(h, momentum=mu, nesterov=nesterov)

        def excess(b, opt=opt):
            return float(js.exact_expected_loss(p, jnp.asarray(b, float), optimizer=opt)) - 0.5

        kw = dict(optimizer=opt, steps=K7, samples=N7, warn=False)
        fo = js.optimal_schedule(p, **kw)
        ref = js.optimal_schedule(p, method=js.RefinedClosedForm(), **kw)
        ex = js.optimal_schedule(p, method=js.ExactDiscrete(max_iter=400, gtol=1e-12), **kw)
        out[name] = dict(values=(excess(np.full(K7, N7 / K7)), excess(fo.beta), excess(ref.beta),
                                 excess(ex.beta)), exact=ex, opt=opt, problem=p)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLE7))
def test_theory7_table_within_one_percent(table7, name):
    got = np.array(table7[name]["values"])
    want = np.array(TABLE7[name][1])
    # The tolerance: 1% on every entry (x0 is fitted to one entry only, see above).
    np.testing.assert_allclose(got, want, rtol=0.01)
    # The ordering is the content of the table: constant > first order >= refined >= optimum.
    # For SGD refined and first order differ only by the quadrature of phi over a step (2e-8
    # here), hence 1e-5 relative; the exact optimum is found to gtol 1e-12 (1e-9 relative).
    assert got[0] > got[1] and got[2] <= got[1] * (1 + 1e-5)
    assert got[3] <= min(got[1], got[2]) * (1 + 1e-9)


@pytest.mark.slow
def test_refined_closes_the_first_order_gap_at_mu_09(table7):
    const, fo, ref, true = table7["hb0.9"]["values"]
    gap_fo = (fo - true) / (const - true)
    gap_ref = (ref - true) / (const - true)
    # Theory 7 at tau = 0.02: first-order gap 0.051, refined 2.0e-3 (a factor 25). Bounds at a
    # factor ~1.6 either side of the quoted figures (x0 is not the theory's).
    assert 0.03 < gap_fo < 0.08
    assert gap_ref < 5e-3 and gap_ref < gap_fo / 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hb0.9", "nesterov0.9"])
def test_exact_discrete_with_momentum_is_kkt(table7, name):
    """No perturbation at equal budget (move eps samples from step i to step j) improves the exact
    loss of the ExactDiscrete optimum by more than 1e-9 relative."""
    ex, opt, p = table7[name]["exact"], table7[name]["opt"], table7[name]["problem"]
    beta = np.asarray(ex.beta)

    def loss(b):
        return float(js.exact_expected_loss(p, jnp.asarray(b), optimizer=opt))

    base = loss(beta)
    rng = np.random.default_rng(3)
    pairs = [(0, K7 - 1), (K7 - 1, 0), (K7 // 2, K7 - 2), (K7 - 3, 10)]
    pairs += [tuple(rng.choice(K7, 2, replace=False)) for _ in range(8)]
    for i, j in pairs:
        for eps in (1e-3, 1e-2):
            b = beta.copy()
            delta = eps * min(b[i], b[j])
            b[i] += delta
            b[j] -= delta
            assert loss(b) >= base * (1 - 1e-9), (i, j, eps)


# ------------------------------------------------------------------------------------------------
# Monte Carlo of real optax momentum SGD on diabetes vs the exact recursion
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_optax_momentum_monte_carlo_matches_exact_for_optimal_schedule():
    p = diabetes_problem()
    opt = js.SGD(0.004, momentum=0.9)  # tau = 0.04, h lam_max / (1 - mu)^2 = 1.6: warned
    with pytest.warns(RuntimeWarning, match="momentum"):
        res = js.optimal_schedule(p, optimizer=opt, steps=150, samples=1200,
                                  method=js.RefinedClosedForm())
    b = res.batch_sizes
    exact = float(js.exact_expected_loss(p, b.astype(float), optimizer=opt))
    mc = js.simulate_sgd(p, b, optimizer=opt, num_paths=3000, key=jax.random.key(11),
                         control_variate=True)
    mean, se = float(mc.mean()), float(mc.stderr())
    # 4 standard errors (the tolerance): fails with probability ~6e-5 if both are right.
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    # The test can fail: the gap between the optimal and the constant schedule is many SE.
    const = float(js.exact_expected_loss(p, jnp.full(150, 8.0), optimizer=opt))
    assert const - exact > 10 * se


# ------------------------------------------------------------------------------------------------
# theory 8: increase the batch instead of decaying the lr
# ------------------------------------------------------------------------------------------------
def test_increase_batch_instead_of_decaying_lr():
    """lr h, h/3, h/9 with batch 4 (15, 45, 135 steps) against lr h with batch 4, 12, 36 (15 steps
    each): equal samples and horizon, exact losses within 0.5% with 23% of the steps. h = 0.02 on
    the diabetes data: s lam_max = 0.08, inside the tested range (theory 8)."""
    p = diabetes_problem()
    h, stage = 0.02, 15
    decay_lr = np.concatenate([np.full(stage * 3**j, h / 3**j) for j in range(3)])
    decay_b = np.full(decay_lr.size, 4.0)
    grow_lr = np.full(3 * stage, h)
    grow_b = np.concatenate([np.full(stage, 4.0 * 3**j) for j in range(3)])
    assert decay_b.sum() == grow_b.sum() and np.isclose(decay_lr.sum(), grow_lr.sum())
    decay = float(js.exact_expected_loss(p, decay_b, optimizer=js.SGD(decay_lr)))
    grow = float(js.exact_expected_loss(p, grow_b, optimizer=js.SGD(grow_lr)))
    gd = float(js.exact_gd_loss(p, optimizer=js.SGD(grow_lr), steps=grow_lr.size))
    assert abs(grow / decay - 1) < 0.005
    assert grow_lr.size < decay_lr.size / 3
    # Not trivially equal: the noise excess over gradient descent (0.0018 here) is > 5x the
    # mismatch (0.00016: the drift term and the next order in the noise break the tie).
    assert decay - gd > 5 * abs(grow - decay)


# ------------------------------------------------------------------------------------------------
# stability clip (theory 8.2 item 3)
# ------------------------------------------------------------------------------------------------
def test_stability_clip_makes_the_exact_loss_finite():
    """At s = 0.8 (b_stab = 1.7 for eigenvalues <= 1) the unclipped square-root rule gives the
    early steps min_batch = 1 < b_stab and the exact second moments blow up; the clipped schedule
    keeps b_k >= 2 b_stab(s_k), reports it, and its exact loss is finite and close to the
    prediction."""
    p = js.DiagonalGaussianRegression(LAM, np.ones(6), 1.0)
    kw = dict(lr=0.8, steps=150, samples=1200)
    raw = js.optimal_schedule(p, stability_clip=False, **kw)
    clipped = js.optimal_schedule(p, **kw)
    b_stab = np.asarray(js.stability_batch(p, js.SGD(0.8), 150))
    assert np.min(np.asarray(raw.batch_sizes)) < b_stab[0]
    raw_loss = float(js.exact_expected_loss(p, raw.batch_sizes.astype(float), lr=0.8))
    assert not np.isfinite(raw_loss) or raw_loss > 1e3
    b = np.asarray(clipped.batch_sizes)
    assert b.sum() == 1200 and np.all(b >= np.ceil(2 * b_stab - 1e-9))
    assert int(clipped.clipped_steps) > 0
    np.testing.assert_allclose(np.asarray(clipped.stability_floor), np.maximum(1.0, 2 * b_stab))
    loss = float(js.exact_expected_loss(p, b.astype(float), lr=0.8))
    assert np.isfinite(loss) and loss < 1.0


def test_clip_does_not_bind_in_the_tested_range_and_closed_form_is_unchanged():
    p = js.DiagonalGaussianRegression(LAM, np.ones(6), 1.0)
    kw = dict(lr=0.1, steps=150, samples=600)
    a = js.optimal_schedule(p, **kw)
    b = js.optimal_schedule(p, stability_clip=False, **kw)
    assert int(a.clipped_steps) == 0
    np.testing.assert_array_equal(np.asarray(a.batch_sizes), np.asarray(b.batch_sizes))


def test_floor_allocation_is_the_exact_integer_optimum_brute_force():
    """The per-step-floor allocation against brute force over all compositions (6 steps)."""
    import itertools

    from jaxsched._control import floor as fl

    phi = jnp.array([0.1, 3.0, 0.5, 2.0, 0.05, 1.0])
    lo = jnp.array([1.0, 1.0, 2.3, 1.0, 3.0, 1.0])
    for total, hi in ((20, None), (24, 6.0), (15, 5.0)):
        b = np.asarray(fl.integer_with_floor(phi, float(total), lo, hi))
        lo_i = np.ceil(np.asarray(lo)).astype(int)
        top = total if hi is None else int(hi)
        best = min(np.sum(np.asarray(phi) / np.array(c)) for c in itertools.product(
            *[range(int(low), top + 1) for low in lo_i]) if sum(c) == total)
        assert b.sum() == total and np.all(b >= lo_i)
        # exact integer optimum up to float rounding of the objective
        assert np.sum(np.asarray(phi) / b) <= best * (1 + 1e-12)
        beta = np.asarray(fl.relaxed_with_floor(phi, float(total), lo, hi))
        assert abs(beta.sum() - total) < 1e-9 and np.all(beta >= np.asarray(lo) - 1e-12)
        assert np.sum(np.asarray(phi) / beta) <= best * (1 + 1e-12)


# ------------------------------------------------------------------------------------------------
# run-time warnings outside the tested range
# ------------------------------------------------------------------------------------------------
def test_warns_once_outside_the_tested_range_and_not_inside():
    p = js.DiagonalGaussianRegression(LAM, np.ones(6), 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        js.optimal_schedule(p, optimizer=js.SGD(0.02, momentum=0.9), steps=150, samples=600)
    assert len(caught) == 1 and "momentum" in str(caught[0].message)  # 0.02 / 0.01 = 2 > 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        js.optimal_schedule(p, optimizer=js.SGD(np.linspace(0.3, 0.1, 150)), steps=150, samples=600)
    assert len(caught) == 1 and "lr schedule" in str(caught[0].message)  # s lam_max = 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        js.optimal_schedule(p, optimizer=js.SGD(0.002, momentum=0.9), steps=150, samples=600)
        js.optimal_schedule(p, optimizer=js.SGD(np.linspace(0.09, 0.03, 150)), steps=150,
                            samples=600)


# ------------------------------------------------------------------------------------------------
# joint lr and batch, the front
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def joint_results():
    p = diabetes_problem()
    lr = 4 * js.largest_safe_lr(p)  # s lam_max = 0.4: where a late lr decay pays (theory 8)
    kw = dict(steps=120, samples=960, max_batch=16, lr=lr)
    return p, lr, js.practical_schedule(p, **kw), js.joint_schedule(p, **kw)


@pytest.mark.slow
def test_joint_beats_practical_and_constant_lr(joint_results):
    p, lr, practical, joint = joint_results
    K, N = 120, 960
    const_lr = js.optimal_schedule(p, lr=lr, steps=K, samples=N, max_batch=16)
    losses = {
        "constant": float(js.exact_expected_loss(p, jnp.full(K, N / K), lr=lr)),
        "constant lr, optimal batch": float(js.exact_expected_loss(
            p, const_lr.batch_sizes.astype(float), lr=lr)),
        "practical": float(js.exact_expected_loss(p, practical.batch_sizes.astype(float),
                                                  optimizer=js.SGD(practical.lr))),
        "joint": float(js.exact_expected_loss(p, joint.batch_sizes.astype(float),
                                              optimizer=js.SGD(joint.lr))),
    }
    # equal budgets, within the bounds, lr never above lr_max
    for sched in (practical, joint):
        b = np.asarray(sched.batch_sizes)
        assert b.sum() == N and b.max() <= 16 and b.min() >= 1
        assert np.all(np.asarray(sched.lr) <= lr * (1 + 1e-12))
    assert int(practical.decayed_steps) > 0  # the cap binds: the lr decays at the end
    np.testing.assert_allclose(float(practical.exact_loss), losses["practical"], rtol=1e-12)
    assert losses["joint"] < losses["practical"] < losses["constant lr, optimal batch"]
    assert losses["constant lr, optimal batch"] < losses["constant"]


@pytest.mark.slow
def test_front_is_monotone_and_optimal_below_constant():
    p = diabetes_problem()
    lr = js.largest_safe_lr(p)
    steps = [25, 50, 100]
    target = float(js.exact_gd_loss(p, lr=lr, steps=100)) + 0.004
    front = js.steps_samples_front(p, target=target, steps=steps, lr=lr, horizons=6, t0=1.0, t1=0.05)
    opt, const = front.samples_optimal, front.samples_constant
    assert np.all(np.diff(opt[np.isfinite(opt)]) <= 0) and np.all(np.diff(const[np.isfinite(const)]) <= 0)
    finite = np.isfinite(const)
    assert finite.any() and np.all(opt[finite] < const[finite])
    # Independent check of one point: the square-root schedule at the reported N reaches the
    # target in the exact recursion, and 2% fewer samples do not (bisection to ~1e-10 in log N).
    i = int(np.argmax(np.isfinite(opt)))
    k, rate = steps[i], front.lr_optimal[i]
    res = js.optimal_schedule(p, optimizer=js.SGD(np.full(k, rate)), steps=k, samples=opt[i] * 1.02,
                              warn=False)
    assert float(js.exact_expected_loss(p, res.beta, optimizer=js.SGD(np.full(k, rate)))) <= target
    res = js.optimal_schedule(p, optimizer=js.SGD(np.full(k, rate)), steps=k, samples=opt[i] * 0.98,
                              warn=False)
    assert float(js.exact_expected_loss(p, res.beta, optimizer=js.SGD(np.full(k, rate)))) > target
    kk, n, wall = front.cheapest()
    assert wall == pytest.approx(1.0 * kk + 0.05 * n)


def test_joint_and_front_refuse_bad_input():
    p = js.DiagonalGaussianRegression(LAM, np.ones(6), 1.0)
    with pytest.raises(ValueError, match="^lr:"):
        js.practical_schedule(p, steps=10, samples=40, lr=-1.0)
    with pytest.raises(ValueError, match="^passes:"):
        js.practical_schedule(p, steps=10, samples=40, passes=0)
    with pytest.raises(ValueError, match="^samples:"):
        js.practical_schedule(p, steps=10, samples=5)
    with pytest.raises(ValueError, match="^problem:"):
        js.joint_schedule(js.Problem(lambda x: jnp.sum(x**2), lambda x: jnp.eye(2), jnp.ones(2)),
                          steps=10, samples=40)
    with pytest.raises(ValueError, match="^t0:"):
        js.steps_samples_front(p, target=1.0, steps=[10, 20], lr=0.1, t0=1.0)
    with pytest.raises(ValueError, match="^steps:"):
        js.steps_samples_front(p, target=1.0, steps=[20, 10], lr=0.1)
    with pytest.raises(ValueError, match="^method:"):
        js.optimal_schedule(p, lr=0.1, steps=10, samples=40, method="refine")
