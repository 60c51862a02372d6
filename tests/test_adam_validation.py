"""Validation of the Adam / RMSprop moment model and of its optimal schedule against real optax
(docs/theory.md §9; issue 14), at the issue's Monte Carlo size: 6000 paths per schedule.

tests/test_adam.py keeps its 400-path checks (cheap, always run); this file carries the 6000-path
ones, so every test here is marked ``slow`` (CI runs them; ``-m 'not slow'`` skips them locally).

* Gaussian linear regression (d = 5, eigenvalues spanning 100x, label noise 1; the problem of
  tests/test_adam.py), h = 0.01, K = 1000, N = 8000, optax defaults, Adam and RMSprop; logistic
  regression on scikit-learn's breast-cancer data (standardised, 5 principal components + bias),
  Adam. For the constant, ramp and optimised schedules: ``|model / MC - 1| <= 3% + 2 SE / MC``;
  the optimum's real loss at most 0.70x the constant's; the predicted ratio within 0.03 of the
  measured one. Losses are excess losses ``F - min f`` (``min f`` by SciPy for the logistic loss).
* The O(h) structure: under ``1 - b1 = 10 h``, ``1 - b2 = 0.1 h``, ``T = K h = 10``,
  ``(MC - L0) / h`` agrees within 5% across h = 0.02, 0.01, 0.005, where ``L0`` is the loss at
  ``T`` of the h-independent limit ODE of §9.3 integrated by SciPy.
* The diffrax form and the discrete recursion give the same optimum: the two optimised schedules'
  real-Adam losses agree within two standard errors.

The reference is an independent Monte Carlo written here: optax's own ``adam`` / ``rmsprop``
(built from optax, not from the library's optimizer objects) on minibatch gradients computed from
the samples, every path owning one stream of samples that each schedule consumes in order. All
schedules of a problem run on the same samples (common random numbers: the ratios' errors shrink)
and the streams — drawing them is the dominant cost — are drawn once per problem for all schedules
and both optimizers. It shares no code with ``jaxsched._check.adaptive``, whose per-sample keying
costs several times more at this size; tests/test_adam.py checks that one against optax step by step.
The Gaussian normals are drawn in float32 and used in float64 (their rounding, 1e-7 relative, is
far below the Monte Carlo error of 1e-2).

Cost: over the ~60 s target. The library's optimisations dominate (compiling
``adaptive_optimal_schedule`` costs about 10 s per optimizer and 30+ s for the diffrax form; the
breast-cancer model costs about 15x the Gaussian one per step), then drawing the 288M Gaussian
normals of 6000 x 8000 samples (about 5 s).

Known shortfall (reported, not loosened): on the breast-cancer logistic regression the optimum
gains only 0.928x the constant's excess loss on real Adam, not the issue's 0.70x (the model
predicts that small gain); that case is an explicit strict xfail.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.optimize
from sklearn.datasets import load_breast_cancer
from test_adam import issue_problem

import jaxsched as js
from jaxsched._expansion.adaptive import UntestedRangeWarning
from jaxsched.datasets import standardise

pytestmark = pytest.mark.slow

H, K, N = 0.01, 1000, 8000
PATHS = 6000
MAX_ITER = 30  # L-BFGS iterations: the optimum's predicted loss is settled to 1e-5 relative by then


# ------------------------------------------------------------------------------------------------
# The independent Monte Carlo of real optax Adam / RMSprop
# ------------------------------------------------------------------------------------------------
CHUNK = 500  # paths per chunk: a (500, N + width, d + 1) float32 stream is 100 MB at N = 8000


def adam_tx(lr, b1, b2, eps):
    """optax's Adam (bias-corrected; PyTorch's rule)."""
    return optax.adam(learning_rate=lr, b1=b1, b2=b2, eps=eps)


def rmsprop_tx(lr, b2, eps):
    """optax's RMSprop with ``eps`` outside the root: PyTorch's rule (docs/theory.md §9)."""
    return optax.rmsprop(learning_rate=lr, decay=b2, eps=eps, eps_in_sqrt=False)


# ------------------------------------------------------------------------------------------------
# per-problem minibatch gradients from a window of the stream
# ------------------------------------------------------------------------------------------------
def gaussian_gradient(data, x, block, mask):
    """Least squares, every path at once: ``x`` is ``(paths, d)``, ``block`` ``(paths, width, d + 1)``
    standard normals (features, label noise)."""
    chol, x_star, noise_sd = data
    d = x.shape[-1]
    z = block.astype(x.dtype)
    a = z[..., :d] @ chol.T
    resid = jnp.einsum("pwi,pi->pw", a, x - x_star) - noise_sd * z[..., d]
    return jnp.einsum("pwi,pw->pi", a, jnp.where(mask, resid, 0.0))


def logistic_gradient(data, x, block, mask):
    """Logistic regression, every path at once: ``block`` is ``(paths, width)`` example indices,
    drawn with replacement."""
    features, labels = data
    a = features[block]
    resid = jax.nn.sigmoid(jnp.einsum("pwi,pi->pw", a, x)) - labels[block]
    return jnp.einsum("pwi,pw->pi", a, jnp.where(mask, resid, 0.0))


GRADIENTS = {"gaussian": gaussian_gradient, "logistic": logistic_gradient}


def _run(kind, make_tx, data, x0, stream, starts, sizes, hyper, width):
    """Final parameters ``(S, paths, d)`` of every schedule ``(starts, sizes)`` (``(S, K)``) on every
    path of ``stream`` (``(paths, N + pad, ...)``, zero-padded at the end). optax's Adam and
    RMSprop are elementwise, so one update of the ``(paths, d)`` array is every path's own update."""
    grad = GRADIENTS[kind]
    tx = make_tx(*hyper)
    x_init = jnp.broadcast_to(x0, (stream.shape[0],) + x0.shape)

    def one_schedule(start, size):
        def step(carry, inp):
            x, state = carry
            s, b = inp
            block = jax.lax.dynamic_slice_in_dim(stream, s, width, 1)
            g = grad(data, x, block, jnp.arange(width) < b) / b.astype(x.dtype)
            updates, state = tx.update(g, state, x)
            return (optax.apply_updates(x, updates), state), None

        (x, _), _ = jax.lax.scan(step, (x_init, tx.init(x_init)), (start, size))
        return x

    return jax.lax.map(lambda sb: one_schedule(*sb), (starts, sizes))


@functools.partial(jax.jit, static_argnames=("kind", "make_tx", "width"))
def _run_jit(kind, make_tx, data, x0, stream, starts, sizes, hyper, width):
    return _run(kind, make_tx, data, x0, stream, starts, sizes, hyper, width)


@functools.partial(jax.jit, static_argnames=("kind", "shape"))
def _draw(key, kind, shape, n_examples):
    if kind == "gaussian":
        return jax.random.normal(key, shape, jnp.float32)
    return jax.random.randint(key, shape, 0, n_examples, jnp.int32)


def monte_carlo(kind, data, x0, runs, *, paths, seed, n_examples=0):
    """Final parameters of real optax runs, all on the same per-path sample streams.

    Args:
        kind: ``"gaussian"`` (``data = (chol(cov), x_star, sqrt(noise_var))``) or ``"logistic"``
            (``data = (features, labels)``, ``n_examples`` rows).
        data, x0: the problem.
        runs: ``{name: (make_tx, hyper, schedules)}``: an optax builder (:func:`adam_tx`,
            :func:`rmsprop_tx`), its arguments (array leaves: changing them does not recompile)
            and a ``(S, K)`` integer array of schedules, every row summing to the same budget.
        paths: number of paths (a multiple of :data:`CHUNK` above it).
        seed: seed of the streams.

    Returns:
        ``{name: (S, paths, d)}`` final parameters.
    """
    budgets = {int(s.sum()) for _, _, sch in runs.values() for s in np.asarray(sch)}
    assert len(budgets) == 1, budgets  # one stream length serves every schedule
    budget = budgets.pop()
    # each run reads a window of its own largest batch (rounded up to a multiple of 8, so that
    # runs share compiled functions); the stream is padded for the widest
    widths = {name: -(-int(np.asarray(sch).max()) // 8) * 8 for name, (_, _, sch) in runs.items()}
    width = max(widths.values())
    d = x0.shape[0]
    chunk = min(CHUNK, paths)
    assert paths % chunk == 0
    shape = (chunk, budget) + ((d + 1,) if kind == "gaussian" else ())
    plans = {}
    for name, (make_tx, hyper, sch) in runs.items():
        sch = jnp.asarray(sch, jnp.int32)
        starts = jnp.cumsum(sch, 1) - sch
        plans[name] = (make_tx, tuple(jnp.asarray(h, x0.dtype) for h in hyper), starts, sch)
    out = {name: [] for name in runs}
    key = jax.random.key(seed)
    for c in range(paths // chunk):
        # drawn without the window's padding, so the samples do not depend on ``width``: runs
        # with the same seed and budget share them whatever schedules they hold
        stream = _draw(jax.random.fold_in(key, c), kind, shape, n_examples)
        stream = jnp.pad(stream, ((0, 0), (0, width)) + ((0, 0),) * (stream.ndim - 2))
        for name, (make_tx, hyper, starts, sch) in plans.items():
            out[name].append(_run_jit(kind, make_tx, data, x0, stream, starts, sch, hyper,
                                      widths[name]))
    return {name: np.concatenate([np.asarray(v) for v in vs], 1) for name, vs in out.items()}


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def mean_se(a):
    """Mean and standard error of per-path values."""
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size))


def paired_ratio(a, b):
    """``mean(a) / mean(b)`` and its standard error from paired per-path values (delta method:
    the common random numbers enter through the covariance of ``a`` and ``b``)."""
    r = a.mean() / b.mean()
    return float(r), float(np.std(a - r * b, ddof=1) / (np.sqrt(a.size) * b.mean()))


def quiet(fn, *args, **kwargs):
    """Call ``fn`` silencing the model's range warning (the logistic problem's ``d = 6`` and
    lr are inside the range; the warning is the subject of tests/test_adam.py, not of this file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntestedRangeWarning)
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# the problems
# ------------------------------------------------------------------------------------------------
def gaussian_data(problem):
    """The Monte Carlo's description of a Gaussian linear regression."""
    return (jnp.asarray(np.linalg.cholesky(np.asarray(problem.cov))), jnp.asarray(problem.x_star),
            jnp.sqrt(jnp.asarray(problem.noise_var)))


def gaussian_excess(problem, xs):
    """``F(x) - min f = (x - x*)^T cov (x - x*) / 2`` for final parameters ``(..., d)``."""
    v = xs - np.asarray(problem.x_star)
    return 0.5 * np.einsum("...i,ij,...j->...", v, np.asarray(problem.cov), v)


def cancer_features():
    """Breast-cancer features standardised, projected on their 5 principal components, plus a bias
    column; labels 0/1."""
    X, y = load_breast_cancer(return_X_y=True)
    X = standardise(X)
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    return np.hstack([X @ vt[:5].T, np.ones((X.shape[0], 1))]), y.astype(np.float64)


def logistic_loss(p, example):
    a, t = example
    z = a @ p
    return jnp.logaddexp(0.0, z) - t * z


def logistic_mean_loss(A, t, xs):
    """The full-data logistic loss at final parameters ``(..., d)`` (NumPy, stable form)."""
    z = np.asarray(xs) @ A.T
    return np.mean(np.logaddexp(0.0, z) - t * z, -1)


def logistic_minimum(A, t):
    """``min f`` of the logistic loss by SciPy's Newton-CG on closed-form derivatives."""
    def f(x):
        return float(logistic_mean_loss(A, t, x))

    def grad(x):
        return A.T @ (1 / (1 + np.exp(-(A @ x))) - t) / t.size

    def hess(x):
        s = 1 / (1 + np.exp(-(A @ x)))
        return (A * (s * (1 - s))[:, None]).T @ A / t.size

    res = scipy.optimize.minimize(f, np.zeros(A.shape[1]), jac=grad, hess=hess, method="trust-exact",
                                  options={"gtol": 1e-12})
    assert res.success and np.abs(grad(res.x)).max() < 1e-10
    return float(res.fun)


def optimum(problem, opt, **kw):
    """The library's optimum for the issue's run, with the ramp and doubling baselines."""
    baselines = {"ramp": js.linear_ramp(K, N), "doubling": js.step_doubling(K, N)}
    return quiet(js.adaptive_optimal_schedule, problem, optimizer=opt, steps=K, samples=N,
                 baselines=baselines, max_iter=MAX_ITER, **kw)


def model_losses(res):
    """The model's loss of the constant, ramp and optimised integer schedules (from the optimum's
    own evaluations: no further compile)."""
    names = list(res.baseline_names)
    base = np.asarray(res.baseline_losses)
    return {"constant": float(base[names.index("constant")]), "ramp": float(base[names.index("ramp")]),
            "optimised": float(res.predicted_loss)}


SCHEDULES = ("constant", "ramp", "optimised")


def schedule_rows(res, extra=()):
    return [np.asarray(js.constant_schedule(K, N)), np.asarray(js.linear_ramp(K, N)),
            np.asarray(res.batch_sizes), *[np.asarray(e) for e in extra]]


# ------------------------------------------------------------------------------------------------
# fixtures: one optimisation per (problem, optimizer, model form), one Monte Carlo per problem
# ------------------------------------------------------------------------------------------------
GAUSSIAN_SEED = 14
TX = {"adam": (adam_tx, (H, 0.9, 0.999, 1e-8)), "rmsprop": (rmsprop_tx, (H, 0.99, 1e-8))}


@pytest.fixture(scope="module")
def gaussian():
    """Gaussian linear regression: the optima of Adam and RMSprop and every schedule's per-path
    excess loss on real optax, all on the same 6000 sample streams."""
    problem = issue_problem()
    res = {"adam": optimum(problem, js.Adam(H)), "rmsprop": optimum(problem, js.RMSprop(H))}
    runs = {(which, name): (*TX[which], row[None])
            for which in res for name, row in zip(SCHEDULES, schedule_rows(res[which]), strict=True)}
    xs = monte_carlo("gaussian", gaussian_data(problem), problem.x0, runs, paths=PATHS,
                     seed=GAUSSIAN_SEED)
    losses = {k: gaussian_excess(problem, v[0]) for k, v in xs.items()}
    floor = 0.5 * float(problem.noise_var)
    models = {which: {k: v - floor for k, v in model_losses(res[which]).items()} for which in res}
    return dict(problem=problem, optima=res, losses=losses, models=models)


@pytest.fixture(scope="module")
def continuous(gaussian):
    """The Adam optimum through the diffrax form, and its per-path excess loss on real optax on the
    Gaussian fixture's samples (the same seed and budget: the same streams)."""
    problem = gaussian["problem"]
    res = optimum(problem, js.Adam(H), model="continuous")
    runs = {"adam": (*TX["adam"], np.asarray(res.batch_sizes)[None])}
    xs = monte_carlo("gaussian", gaussian_data(problem), problem.x0, runs, paths=PATHS,
                     seed=GAUSSIAN_SEED)
    return res, gaussian_excess(problem, xs["adam"][0])


@pytest.fixture(scope="module")
def logistic():
    """Logistic regression on the breast-cancer data with Adam: the optimum and the per-path excess
    losses of the three schedules on real optax."""
    A, t = cancer_features()
    problem = js.DataProblem(logistic_loss, (A, t), np.zeros(A.shape[1]))
    floor = logistic_minimum(A, t)
    res = optimum(problem, js.Adam(H), loss_floor=floor)
    runs = {("adam", name): (adam_tx, (H, 0.9, 0.999, 1e-8), row[None])
            for name, row in zip(SCHEDULES, schedule_rows(res), strict=True)}
    xs = monte_carlo("logistic", (jnp.asarray(A), jnp.asarray(t)), problem.x0, runs, paths=PATHS,
                     seed=15, n_examples=A.shape[0])
    losses = {k: logistic_mean_loss(A, t, v[0]) - floor for k, v in xs.items()}
    models = {"adam": {k: v - floor for k, v in model_losses(res).items()}}
    return dict(problem=problem, optima={"adam": res}, losses=losses, models=models)


CASES = [("gaussian", "adam"), ("gaussian", "rmsprop"), ("logistic", "adam")]


def _case(request, problem_name):
    return request.getfixturevalue(problem_name)


# ------------------------------------------------------------------------------------------------
# 1. the model's loss against real optax, schedule by schedule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("problem_name, which", CASES)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_model_agrees_with_real_optax(request, problem_name, which, schedule):
    case = _case(request, problem_name)
    mc, se = mean_se(case["losses"][which, schedule])
    model = case["models"][which][schedule]
    print(f"\n{problem_name}/{which}/{schedule}: model/MC - 1 = {model / mc - 1:+.4f}, "
          f"SE/MC = {se / mc:.4f}")
    # issue 14's bound: 3% for the model's own error (theory 9.2 measured at most 2.3% over 60+
    # schedules) plus two Monte Carlo standard errors
    assert abs(model / mc - 1) <= 0.03 + 2 * se / mc, (model, mc, se)


# ------------------------------------------------------------------------------------------------
# 2. the optimum's gain, measured and predicted
# ------------------------------------------------------------------------------------------------
def _gain(case, which):
    losses = case["losses"]
    measured, se = paired_ratio(losses[which, "optimised"], losses[which, "constant"])
    models = case["models"][which]
    return measured, se, models["optimised"] / models["constant"]


@pytest.mark.parametrize("problem_name, which", CASES)
def test_optimum_prediction_on_real_optax(request, problem_name, which):
    case = _case(request, problem_name)
    b = np.asarray(case["optima"][which].batch_sizes)
    assert b.sum() == N and b.min() >= 1
    measured, se, predicted = _gain(case, which)
    print(f"\n{problem_name}/{which}: optimum/constant measured {measured:.4f} +- {se:.4f} (SE), "
          f"predicted {predicted:.4f}")
    # at 6000 paths on common samples the ratio's standard error is a few thousandths: the
    # issue's 0.03 can be applied to the measured ratio itself
    assert se < 0.01, se
    assert abs(predicted - measured) <= 0.03, (predicted, measured, se)


GAIN_CASES = [("gaussian", "adam"), ("gaussian", "rmsprop"),
              pytest.param("logistic", "adam", marks=pytest.mark.xfail(strict=True, reason=(
                  "issue 14's 0.70x is not met on the breast-cancer logistic regression: measured "
                  "0.928 +- 0.001 (6000 paths); the model predicts the small gain correctly")))]


@pytest.mark.parametrize("problem_name, which", GAIN_CASES)
def test_optimum_gain_on_real_optax(request, problem_name, which):
    measured, se, _ = _gain(_case(request, problem_name), which)
    assert measured <= 0.70, (measured, se)  # issue 14: at most 0.70x the constant's loss


# ------------------------------------------------------------------------------------------------
# 3. the diffrax form and the discrete recursion give the same optimum
# ------------------------------------------------------------------------------------------------
def test_continuous_and_discrete_optima_agree_on_real_optax(gaussian, continuous):
    res, c = continuous
    assert res.model == "continuous" and int(res.batch_sizes.sum()) == N
    a = gaussian["losses"]["adam", "optimised"]
    diff = c - a  # the same samples: the difference's own standard error is the right yardstick
    mean, se = mean_se(diff)
    print(f"\ndiffrax - discrete optimum on real Adam: {mean:.3e} +- {se:.3e} (paired SE); "
          f"losses {a.mean():.6f}, {c.mean():.6f}; max |b_c - b_d| = "
          f"{np.abs(np.asarray(res.batch_sizes) - np.asarray(gaussian['optima']['adam'].batch_sizes)).max()}")
    assert abs(mean) <= 2 * se, (mean, se, a.mean(), c.mean())


# ------------------------------------------------------------------------------------------------
# 4. the O(h) structure under the scaling 1 - b1 = 10 h, 1 - b2 = 0.1 h
# ------------------------------------------------------------------------------------------------
T_END, C1, C2 = 10.0, 10.0, 0.1
OH_BATCH = 1  # the structure does not depend on the batch; b = 1 draws the fewest samples
OH_STEPS = (0.02, 0.01, 0.005)


def limit_loss(problem, batch):
    """``L0``: the excess loss at ``T`` of the h-independent limit ODE of theory 9.3 (the adaptive
    gradient flow with the bias correction as rates ``c_i / (1 - exp(-c_i t))``), by SciPy.
    ``diag Sigma(x) = (cov r)^2 + (r^T cov r + s2) diag(cov)``, ``r = x - x*`` (Isserlis)."""
    cov, xs, s2 = np.asarray(problem.cov), np.asarray(problem.x_star), float(problem.noise_var)
    d = xs.size

    def g2(x):
        g = cov @ (x - xs)
        return g, g * g + (g * g + (g @ (x - xs) + s2) * np.diag(cov)) / batch

    def rhs(t, y):
        x, m, v = y[:d], y[d:2 * d], y[2 * d:]
        g, q = g2(x)
        r1, r2 = C1 / -np.expm1(-C1 * t), C2 / -np.expm1(-C2 * t)
        return np.concatenate([-m / (np.sqrt(v) + 1e-8), r1 * (g - m), r2 * (q - v)])

    x0 = np.asarray(problem.x0)
    g0, q0 = g2(x0)
    # at t = 0 the rates are infinite and the moments equal their targets; start just after
    sol = scipy.integrate.solve_ivp(rhs, (1e-12, T_END), np.concatenate([x0, g0, q0]),
                                    method="Radau", rtol=1e-10, atol=1e-13)
    assert sol.success
    return float(gaussian_excess(problem, sol.y[:d, -1]))


@pytest.fixture(scope="module")
def order_h():
    problem = issue_problem()
    data = gaussian_data(problem)
    out = {}
    for h in OH_STEPS:
        steps = round(T_END / h)
        b = np.full(steps, OH_BATCH)
        runs = {"adam": (adam_tx, (h, 1 - C1 * h, 1 - C2 * h, 1e-8), b[None])}
        xs = monte_carlo("gaussian", data, problem.x0, runs, paths=PATHS, seed=16)
        out[h] = mean_se(gaussian_excess(problem, xs["adam"][0]))
    return problem, limit_loss(problem, OH_BATCH), out


def test_first_order_structure_in_h(order_h):
    _, l0, mc = order_h
    j1 = {h: ((m - l0) / h, se / h) for h, (m, se) in mc.items()}
    values = np.array([v for v, _ in j1.values()])
    ses = np.array([s for _, s in j1.values()])
    print(f"\nL0 = {l0:.6g}; (MC - L0) / h: {j1}")
    # issue 14: (MC - L0) / h agrees within 5% across h (the O(h^2) remainder is below 1% here by
    # theory 9.3's check); each value carries about 1% Monte Carlo error, within that 5%
    assert values.max() / values.min() - 1 <= 0.05, j1
    assert np.all(ses / values < 0.015), j1
