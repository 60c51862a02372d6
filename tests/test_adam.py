"""Adam and RMSprop (docs/theory.md §9): the optimizers, the Monte Carlo with real optax, the moment
model and the schedule found by gradient descent through it.

References are independent of the code under test: a hand-written optax loop and a NumPy
implementation of the PyTorch update rules (the Monte Carlo), full-batch optax Adam (the model at
``b = 1e12``), and Monte Carlo of real optax Adam / RMSprop with its standard error (the model's
prediction and the optimum's gain).

The problem is the one of the issue: Gaussian linear regression with ``d = 5``, eigenvalues
spanning 100x, label noise 1, ``h = 0.01``, ``K = 1000``, ``N = 8000``, optax defaults. Losses are
compared as excess losses ``F - min f`` (``min f = noise_var / 2``): the floor would make any
relative comparison vacuous. Monte Carlo sizes are the smallest that give a standard error of about
2% of the excess loss (a few hundred paths); experiments/adam_schedules.py runs the full size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsched as js
from jaxsched._check.adaptive import simulate_adaptive
from jaxsched._expansion.adaptive import (
    UntestedRangeWarning,
    adaptive_expansion,
)

H, K, N = 0.01, 1000, 8000
PATHS = 400


def issue_problem(d=5, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.logspace(0, -2, d)  # eigenvalues spanning 100x
    cov = (Q * lam) @ Q.T
    return js.GaussianLinearRegression(0.5 * (cov + cov.T), np.zeros(d), np.ones(d), 1.0)


@pytest.fixture(scope="module")
def problem():
    return issue_problem()


def excess(problem, loss):
    return loss - 0.5 * problem.noise_var


# ------------------------------------------------------------------------------------------------
# 1. the optimizers
# ------------------------------------------------------------------------------------------------
def test_optimizer_fields_and_validation():
    a = js.Adam(1e-3)
    assert a.is_adaptive and not js.SGD(0.1).is_adaptive
    assert float(a.b1) == 0.9 and float(a.b2) == 0.999 and float(a.eps) == 1e-8
    r = js.RMSprop(1e-3)
    assert float(r.b1) == 0.0 and float(r.b2) == 0.99
    for bad, name in [(dict(lr=-1.0), "lr"), (dict(lr=0.1, b1=1.0), "b1"),
                      (dict(lr=0.1, b2=0.0), "b2"), (dict(lr=0.1, eps=-1.0), "eps"),
                      (dict(lr=np.ones((2, 2))), "lr")]:
        with pytest.raises(ValueError, match=name):
            js.Adam(**bad)
    with pytest.raises(ValueError, match="decay"):
        js.RMSprop(0.1, decay=1.5)
    # array leaves: a different lr is the same pytree structure (no recompile)
    assert jax.tree_util.tree_structure(js.Adam(0.1)) == jax.tree_util.tree_structure(js.Adam(0.2))


# ------------------------------------------------------------------------------------------------
# 2. the Monte Carlo runs real optax, step by step
# ------------------------------------------------------------------------------------------------
def _hand_loop(problem, batch_sizes, tx, key):
    """One path by hand, with the documented keying (path 0, step k, sample j)."""
    pkey = jax.random.fold_in(key, 0)
    x, state, losses = problem.x0, tx.init(problem.x0), [problem.value(problem.x0)]
    for k, b in enumerate(np.asarray(batch_sizes)):
        skey = jax.random.fold_in(pkey, k)
        g = sum(problem.sample_gradient(x, jax.random.fold_in(skey, j)) for j in range(b)) / b
        updates, state = tx.update(g, state, x)
        x = optax.apply_updates(x, updates)
        losses.append(problem.value(x))
    return np.asarray(losses), np.asarray(x)


def _numpy_loop(problem, batch_sizes, key, *, lr, b1, b2, eps, bias_correction):
    """PyTorch's update rules in NumPy (Adam; RMSprop is b1 = 0 without bias correction)."""
    pkey = jax.random.fold_in(key, 0)
    x = np.asarray(problem.x0)
    m, v = np.zeros_like(x), np.zeros_like(x)
    for k, b in enumerate(np.asarray(batch_sizes)):
        skey = jax.random.fold_in(pkey, k)
        g = sum(np.asarray(problem.sample_gradient(jnp.asarray(x), jax.random.fold_in(skey, j)))
                for j in range(b)) / b
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        c1, c2 = (1 - b1 ** (k + 1), 1 - b2 ** (k + 1)) if bias_correction else (1.0, 1.0)
        x = x - lr[k] * (m / c1) / (np.sqrt(v / c2) + eps)
    return x


@pytest.mark.parametrize("which", ["adam", "rmsprop"])
def test_monte_carlo_is_optax_step_by_step(problem, which):
    b = np.array([1, 3, 2, 7, 1, 4, 5, 2, 9, 1, 3, 6])
    lr = 0.05 * (1 + np.arange(b.size) % 3)  # an lr schedule exercises the per-step lookup
    if which == "adam":
        opt = js.Adam(lr, b1=0.8, b2=0.95, eps=1e-3)
        tx = optax.adam(lambda c: jnp.asarray(lr)[c], b1=0.8, b2=0.95, eps=1e-3)
        ref = dict(b1=0.8, b2=0.95, bias_correction=True)
    else:
        opt = js.RMSprop(lr, decay=0.9, eps=1e-3)
        tx = optax.rmsprop(lambda c: jnp.asarray(lr)[c], decay=0.9, eps=1e-3, eps_in_sqrt=False)
        ref = dict(b1=0.0, b2=0.9, bias_correction=False)
    key = jax.random.key(3)
    res = simulate_adaptive(problem, b, optimizer=opt, num_paths=1, key=key, record_every=1)
    losses, x = _hand_loop(problem, b, tx, key)
    # the same optax code on the same samples: only the order of the minibatch sums may differ
    np.testing.assert_allclose(np.asarray(res.loss_paths[0]), losses, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(res.final_params[0]), x, rtol=0, atol=1e-12)
    # ... and optax is PyTorch's rule (eps outside the root for RMSprop)
    x_np = _numpy_loop(problem, b, key, lr=lr, eps=1e-3, **ref)
    np.testing.assert_allclose(x, x_np, rtol=0, atol=1e-12)


def test_monte_carlo_refuses_bad_input(problem):
    with pytest.raises(ValueError, match="optimizer"):
        simulate_adaptive(problem, [1, 2], optimizer=js.SGD(0.1), num_paths=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="batch_sizes"):
        simulate_adaptive(problem, [1.5, 2], optimizer=js.Adam(0.1), num_paths=2,
                          key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_paths"):
        simulate_adaptive(problem, [1, 2], optimizer=js.Adam(0.1), num_paths=0,
                          key=jax.random.key(0))


# ------------------------------------------------------------------------------------------------
# 3. the discrete moment model
# ------------------------------------------------------------------------------------------------
def _full_batch(problem, tx, steps):
    x, state = problem.x0, tx.init(problem.x0)
    for _ in range(steps):
        updates, state = tx.update(problem.gradient(x), state, x)
        x = optax.apply_updates(x, updates)
    return float(problem.value(x))


@pytest.mark.parametrize("which", ["adam", "rmsprop"])
def test_model_at_huge_batches_is_full_batch_optax(problem, which):
    opt = js.Adam(H) if which == "adam" else js.RMSprop(H)
    tx = optax.adam(H) if which == "adam" else optax.rmsprop(H, decay=0.99, eps_in_sqrt=False)
    ref = _full_batch(problem, tx, 300)
    got = adaptive_expansion(problem, jnp.full(300, 1e12), optimizer=opt)
    # the noise enters as Sigma / 1e12 ~ 1e-12 relative to g^2: far below the 1e-9 asked
    assert abs(float(got.predicted_loss) - ref) < 1e-9
    assert got.model == "discrete" and got.level == "L1"


@pytest.fixture(scope="module")
def mc_runs(problem):
    """Real optax runs of the constant and the ramp schedules (one compile: traced schedules)."""
    out = {}
    for which, opt in [("adam", js.Adam(H)), ("rmsprop", js.RMSprop(H))]:
        for name, b in [("constant", js.constant_schedule(K, N)), ("ramp", js.linear_ramp(K, N))]:
            r = simulate_adaptive(problem, b, optimizer=opt, num_paths=PATHS,
                                  key=jax.random.key(11))
            out[which, name] = (b, opt, float(excess(problem, r.mean())), float(r.stderr()))
    return out


@pytest.mark.parametrize("which", ["adam", "rmsprop"])
@pytest.mark.parametrize("name", ["constant", "ramp"])
def test_model_agrees_with_real_optax(problem, mc_runs, which, name):
    b, opt, mc, se = mc_runs[which, name]
    model = float(excess(problem, adaptive_expansion(problem, b, optimizer=opt).predicted_loss))
    # theory 9.2: the L1 model is within 2.3% of Monte Carlo over 60+ schedules; the issue's bound
    # is 3% plus two standard errors of the Monte Carlo
    assert abs(model / mc - 1) <= 0.03 + 2 * se / mc, (model, mc, se)


def test_model_warns_outside_tested_range(problem):
    with pytest.warns(UntestedRangeWarning, match="lr"):
        adaptive_expansion(problem, jnp.full(5, 4.0), optimizer=js.Adam(0.1))
    with pytest.warns(UntestedRangeWarning, match="experimental"):
        adaptive_expansion(problem, jnp.full(5, 4.0), optimizer=js.Adam(0.01),
                           covariance="diagonal")
    with pytest.raises(ValueError, match="model"):
        adaptive_expansion(problem, jnp.full(5, 4.0), optimizer=js.Adam(0.01), model="l2")
    with pytest.raises(ValueError, match="optimizer"):
        adaptive_expansion(problem, jnp.full(5, 4.0), optimizer=js.SGD(0.01))


# ------------------------------------------------------------------------------------------------
# 4. the optimum by gradient descent through the model, measured on real optax
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def optima(problem):
    floor = 0.5 * problem.noise_var
    baselines = {"ramp": js.linear_ramp(K, N), "doubling": js.step_doubling(K, N)}
    return {which: js.adaptive_optimal_schedule(problem, optimizer=opt, steps=K, samples=N,
                                                loss_floor=floor, baselines=baselines)
            for which, opt in [("adam", js.Adam(H)), ("rmsprop", js.RMSprop(H))]}


@pytest.mark.parametrize("which", ["adam", "rmsprop"])
def test_optimum_beats_constant_on_real_optax(problem, optima, mc_runs, which):
    res = optima[which]
    b = np.asarray(res.batch_sizes)
    assert b.sum() == N and b.min() >= 1
    assert isinstance(res, js.AdaptiveSchedule)
    assert res.model == "discrete" and res.level == "L1"
    assert set(res.gains) == {"constant", "sgd_sqrt_rule", "ramp", "doubling"}
    _, opt, mc_const, se_const = mc_runs[which, "constant"]
    # the same key as the constant run: common random numbers make the ratio's error smaller
    r = simulate_adaptive(problem, b, optimizer=opt, num_paths=PATHS, key=jax.random.key(11))
    mc_opt, se_opt = float(excess(problem, r.mean())), float(r.stderr())
    measured = mc_opt / mc_const
    se_ratio = measured * np.hypot(se_opt / mc_opt, se_const / mc_const)  # ignoring the positive
    # correlation of common random numbers: an upper bound on the ratio's standard error
    predicted = res.ratios["constant"]
    # issue 14: real-Adam loss at most 0.70x the constant's (theory 9.4 measured 0.60 / 0.53)
    assert measured + 2 * se_ratio <= 0.70 + 0.03, (measured, se_ratio)
    assert measured <= 0.70
    # the predicted ratio within 0.03 of the measured one (plus the MC error at this test's size;
    # experiments/adam_schedules.py checks 0.03 alone at 6000 paths)
    assert abs(predicted - measured) <= 0.03 + 2 * se_ratio, (predicted, measured, se_ratio)
    # the model's prediction for the optimum itself, as for the baselines above
    model = float(excess(problem, res.predicted_loss))
    assert abs(model / mc_opt - 1) <= 0.03 + 2 * se_opt / mc_opt



# ------------------------------------------------------------------------------------------------
# 5. the continuous (diffrax) form
# ------------------------------------------------------------------------------------------------
def test_continuous_form_approaches_the_discrete_recursion(problem):
    # Under the scaling 1 - b1 = 10 h, 1 - b2 = 0.1 h the continuous form of theory 9.3 is the
    # h -> 0 limit of the recursion; at h = 0.005 the omitted O(h) terms are below 1% of the excess
    # loss (theory 9.3: +0.7% at h = 0.01 at optax defaults), so 2% leaves room for the solver.
    h = 0.005
    opt = js.Adam(h, b1=1 - 10 * h, b2=1 - 0.1 * h)
    b = jnp.asarray(js.linear_ramp(200, 1600), float)
    disc = adaptive_expansion(problem, b, optimizer=opt)
    cont = adaptive_expansion(problem, b, optimizer=opt, model="continuous")
    assert cont.model == "continuous" and cont.result == js.RESULTS.successful
    ratio = float(excess(problem, cont.predicted_loss)) / float(excess(problem, disc.predicted_loss))
    assert abs(ratio - 1) < 0.02, ratio


# ------------------------------------------------------------------------------------------------
# 6. the public entries dispatch on the optimizer
# ------------------------------------------------------------------------------------------------
def test_simulate_sgd_dispatches_to_optax_adam(problem, mc_runs):
    b, opt, mc_const, _ = mc_runs["adam", "constant"]
    # the same shapes and key as the fixture's run: no new compile, the same numbers
    mc = js.simulate_sgd(problem, b, optimizer=opt, num_paths=PATHS, key=jax.random.key(11))
    assert float(excess(problem, mc.mean())) == mc_const
    with pytest.raises(ValueError, match="replace"):
        js.simulate_sgd(problem, b, optimizer=opt, num_paths=2, key=jax.random.key(0),
                        replace=False)


def test_expansion_and_optimal_schedule_dispatch(problem, mc_runs):
    b, opt, _, _ = mc_runs["adam", "constant"]
    direct = adaptive_expansion(problem, b, optimizer=opt)
    assert float(js.expected_loss(problem, b, optimizer=opt)) == float(direct.predicted_loss)
    assert js.expansion(problem, b, optimizer=opt).model == "discrete"
    with pytest.raises(ValueError, match="lr"):
        js.expected_loss(problem, b, lr=0.1, optimizer=opt)
    with pytest.raises(ValueError, match="method"):
        js.optimal_schedule(problem, optimizer=opt, steps=K, samples=N, method=js.ClosedForm())
    res = js.optimal_schedule(problem, optimizer=opt, steps=20, samples=80, max_iter=2)
    assert isinstance(res, js.AdaptiveSchedule) and int(res.batch_sizes.sum()) == 80
