"""Learning rate and batch size together, and the budgets people have (docs/theory.md §8).

- :func:`practical_schedule`: the first-order practical optimum of theory 8.2: the largest safe
  constant lr, the schedule in the batch (``b_k`` proportional to ``s_k sqrt(phi_k)``), the lr decayed
  only where the batch would exceed ``max_batch`` (``s = min(s_max, B_max / n*)``, ``b = n* s``,
  with ``n* = b / s`` the samples per unit of intrinsic time).
- :func:`joint_schedule`: for quadratic problems, the exact joint optimum over ``(s_k, b_k)`` of the
  exact discrete recursion (theory 5, 7) by L-BFGS (optimistix) on a parametrisation that meets the
  sample budget, the batch bounds and ``0 < s_k < s_max`` by construction.
- :func:`steps_samples_front`: for a target expected loss, the fewest samples that reach it at each
  step count, for the optimal and for the constant batch, and the cheapest wall-clock point of the
  step-time model ``t0 K + t1 N`` (the first-principles counterpart of the critical-batch-size curve).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._expansion.sensitivity import as_method, first_order_parts, predicted_loss_from_parts
from .._misc import check_steps
from .._optimizer import SGD
from .._problem.base import check_problem
from .._solution import RESULTS
from .._types import Array, Int, IntStepArray, Scalar, StepArray
from . import allocation as alloc, free_form as ff
from .optimal import _budget, _exact_loss, _largest_curvature, _lbfgs

__all__ = ["JointSchedule", "StepsSamplesFront", "joint_schedule", "largest_safe_lr",
           "practical_schedule", "steps_samples_front", "wall_clock"]

#: Validity range of the first-order rule with an lr schedule (docs/theory.md §8): ``s lam_max <= 0.1``.
SAFE_STEP = 0.1


class JointSchedule(eqx.Module):
    """A schedule in both the learning rate and the batch size.

    Attributes:
        lr: ``(steps,)`` per-step learning rates (pass as ``js.SGD(lr=..., momentum=...)``).
        batch_sizes: ``(steps,)`` integer batch sizes, ``sum == samples``.
        beta: ``(steps,)`` the real-valued batch sizes before rounding.
        predicted_loss: the first-order prediction of ``E F(x_K)`` for ``(lr, batch_sizes)``.
        exact_loss: the exact ``E f(x_K)`` (quadratic problems; NaN otherwise).
        decayed_steps: the number of steps whose lr is below ``lr_max``.
        lr_max: the largest (safe) constant learning rate the schedule was built from.
        iterations: optimiser iterations (fixed-point passes for the practical rule).
        result: a :class:`jaxsched.RESULTS` code.
        method: ``"practical"`` or ``"exact_joint"``.
    """

    lr: StepArray
    batch_sizes: IntStepArray
    beta: StepArray
    predicted_loss: Scalar
    exact_loss: Scalar
    decayed_steps: Int[Array, ""]
    lr_max: Scalar
    iterations: Int[Array, ""]
    result: RESULTS
    method: str = eqx.field(static=True)

    def optimizer(self, momentum=0.0, nesterov: bool = False) -> SGD:
        """The ``js.SGD`` to pair with ``batch_sizes``."""
        return SGD(self.lr, momentum=momentum, nesterov=nesterov)


def largest_safe_lr(problem, *, momentum=0.0, step=SAFE_STEP) -> float:
    """The largest constant learning rate inside the tested range of the first-order rule with an lr
    schedule (docs/theory.md §8: ``s lam_max <= 0.1`` with the intrinsic step ``s = lr / (1 - mu)``):
    ``lr = step (1 - mu) / lam_max``, ``lam_max`` from the eigen form (quadratic problems) or the
    Hessian at ``x0``.

    Raises:
        ValueError: ``momentum`` outside ``[0, 1)``, ``step <= 0``, or a non-positive ``lam_max``.
    """
    mu = float(momentum)
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"momentum: must satisfy 0 <= momentum < 1, got {mu}")
    if not float(step) > 0:
        raise ValueError(f"step: must be > 0, got {step}")
    lam = _largest_curvature(problem)
    if lam is None or not lam > 0:
        raise ValueError("problem: the largest Hessian eigenvalue must be > 0 to choose a safe lr")
    return float(step) * (1.0 - mu) / lam


def _scalar_lr(lr, problem, momentum) -> float:
    if lr is None:
        return largest_safe_lr(problem, momentum=momentum)
    arr = np.asarray(lr, dtype=np.float64)
    if arr.ndim != 0 or not np.isfinite(arr) or arr <= 0:
        raise ValueError(f"lr: the largest constant learning rate must be a finite scalar > 0, got {lr!r}")
    return float(arr)


def _exact_or_nan(problem, b, opt):
    if not problem.is_quadratic:
        return jnp.asarray(jnp.nan, b.dtype)
    return _exact_loss(problem, b, opt)


@eqx.filter_jit
def _practical_pass(problem, parts, lr, lr_max, budget):
    """One fixed-point pass: the square-root rule at the current rates, then the rates lowered where
    the batch would exceed the cap, keeping the sample density ``n = b / s``."""
    coef = problem.inverse_batch_coefficient()
    b_free = alloc.relaxed_optimum(parts.weights * coef, budget.samples, min_batch=budget.lo)
    density = b_free / lr
    new_lr = lr_max if budget.hi is None else jnp.minimum(lr_max, budget.hi / density)
    return new_lr


@eqx.filter_jit
def _practical_finish(problem, parts, lr, lr_max, budget, momentum, nesterov, iterations):
    coef = problem.inverse_batch_coefficient()
    w = parts.weights * coef
    beta = alloc.relaxed_optimum(w, budget.samples, min_batch=budget.lo, max_batch=budget.hi)
    b = alloc.integer_optimum(w, budget.samples, min_batch=budget.lo, max_batch=budget.hi)
    opt = SGD(lr, momentum=momentum, nesterov=nesterov)
    return JointSchedule(
        lr=lr, batch_sizes=b, beta=beta,
        predicted_loss=predicted_loss_from_parts(problem, parts, b),
        exact_loss=_exact_or_nan(problem, b.astype(lr.dtype), opt),
        decayed_steps=jnp.sum(lr < lr_max * (1.0 - 1e-9)),
        lr_max=lr_max, iterations=jnp.asarray(iterations), result=parts.result,
        method="practical")


def _setup(problem, lr, steps, samples, min_batch, max_batch, momentum, nesterov):
    check_problem(problem)
    steps = check_steps(steps)
    dtype = problem.x0.dtype
    lr_max = _scalar_lr(lr, problem, momentum)
    budget = _budget(problem, steps, samples, min_batch, max_batch, dtype)
    SGD(lr_max, momentum=momentum, nesterov=nesterov)  # ValueErrors naming momentum / nesterov
    return steps, dtype, jnp.asarray(lr_max, dtype), budget


def practical_schedule(problem, *, steps: int, samples, lr=None, momentum=0.0, nesterov: bool = False,
                       min_batch=1, max_batch=None, sensitivity="auto", passes: int = 6
                       ) -> JointSchedule:
    """The practical joint optimum of docs/theory.md §8.2 (first order, ``s lam_max <~ 0.1``):
    a constant lr ``lr`` (the largest safe one), the batch schedule from the square-root rule at the
    actual rates (``b_k`` proportional to ``s_k sqrt(phi_k)``), and the lr lowered only where that batch
    would exceed ``max_batch``: ``s_k = min(lr, max_batch / n*_k)`` with ``n*_k = b_k / s_k``, found
    by ``passes`` fixed-point passes (each recomputes ``phi`` for the new rates: the horizon
    shortens where the lr decays). Without ``max_batch`` this is :func:`jaxsched.optimal_schedule` at
    the constant rate.

    Args:
        problem: a jaxsched problem.
        steps: the step budget ``K``; samples: the sample budget ``N``.
        lr: the largest constant learning rate (default :func:`largest_safe_lr`).
        momentum, nesterov: the optimizer (theory 7).
        min_batch, max_batch: batch bounds (``max_batch`` is where the lr starts to decay).
        sensitivity: as for :func:`jaxsched.optimal_schedule`.
        passes: fixed-point passes (Python int >= 1).

    Returns:
        A :class:`JointSchedule` (``exact_loss`` for quadratic problems).

    Raises:
        ValueError: naming the argument (infeasible budget, ``lr <= 0``, bad ``momentum``, ...).
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes: must be an int >= 1, got {passes!r}")
    steps, dtype, lr_max, budget = _setup(problem, lr, steps, samples, min_batch, max_batch, momentum,
                                          nesterov)
    method = as_method(sensitivity, problem)
    rates = jnp.full(steps, lr_max, dtype)

    def parts_at(r):
        return first_order_parts(problem, steps=steps, method=method,
                                 optimizer=SGD(r, momentum=momentum, nesterov=nesterov))

    parts = parts_at(rates)
    done = 0
    if budget.hi is not None:
        for _ in range(passes):
            new = _practical_pass(problem, parts, rates, lr_max, budget)
            done += 1
            if bool(jnp.allclose(new, rates, rtol=1e-10, atol=0.0)):
                break
            rates = new
            parts = parts_at(rates)
    return _practical_finish(problem, parts, rates, lr_max, budget, jnp.asarray(momentum, dtype),
                             nesterov, done)


class _JointObjective(eqx.Module):
    problem: object
    lr_max: Scalar
    momentum: Scalar
    samples: Scalar
    lo: Scalar
    hi: Scalar | None
    nesterov: bool = eqx.field(static=True)
    steps: int = eqx.field(static=True)

    def unpack(self, theta):
        b = ff.free_form_batch_sizes(theta[: self.steps], self.samples, min_batch=self.lo,
                                     max_batch=self.hi)
        # s = s_max / (1 + theta^2): smooth, onto (0, s_max], and not flat away from s_max
        return b, self.lr_max / (1.0 + theta[self.steps:] ** 2)

    def loss(self, theta):
        b, lr = self.unpack(theta)
        return _exact_loss(self.problem, b, SGD(lr, momentum=self.momentum, nesterov=self.nesterov))


class _Silent(eqx.Module):
    """No progress display and no host callback inside the compiled loop."""

    def callback(self, **kwargs) -> None:
        del kwargs


@eqx.filter_jit
def _joint_core(obj: _JointObjective, b0, lr0, max_iter, gtol):
    theta_b = ff.free_form_init(b0, obj.samples, min_batch=obj.lo, max_batch=obj.hi)
    share = jnp.clip(lr0 / obj.lr_max, 1e-6, 1.0)
    theta = jnp.concatenate([theta_b, jnp.sqrt(1.0 / share - 1.0)])
    gd_inf = jnp.full(obj.steps, jnp.inf, b0.dtype)
    start = jax.lax.stop_gradient(obj.loss(theta))
    floor = jax.lax.stop_gradient(_exact_loss(obj.problem, gd_inf, SGD(
        jnp.full(obj.steps, obj.lr_max), momentum=obj.momentum, nesterov=obj.nesterov)))
    scale = jnp.abs(start - floor) + 1e-300

    theta, it, result = _lbfgs(lambda th: (obj.loss(th) - start) / scale, theta, max_iter,
                               jnp.asarray(gtol, theta.dtype), _Silent())
    beta, lr = obj.unpack(theta)
    opt = SGD(lr, momentum=obj.momentum, nesterov=obj.nesterov)
    phi_seen = jax.grad(lambda u: _exact_loss(obj.problem, 1.0 / u, opt))(1.0 / beta)
    b = alloc.integer_optimum(phi_seen, obj.samples, min_batch=obj.lo, max_batch=obj.hi)
    return lr, beta, b, it, result


def joint_schedule(problem, *, steps: int, samples, lr=None, momentum=0.0, nesterov: bool = False,
                   min_batch=1, max_batch=None, sensitivity="auto", max_iter: int = 300,
                   gtol: float = 1e-10) -> JointSchedule:
    """The exact joint optimum over per-step learning rates and batch sizes for a quadratic problem
    (docs/theory.md §8.2): L-BFGS (optimistix) on the exact discrete recursion (theory 5, 7) in
    ``(theta_b, theta_s)``, with ``b = free_form(theta_b)`` (sample budget and bounds exact) and
    ``s_k = lr / (1 + theta_s_k^2)`` (``0 < s_k <= lr``), started from :func:`practical_schedule`;
    integers by the exact integer optimum of the exact loss linearised in ``1/b`` at the optimum.

    Args: as :func:`practical_schedule` (``lr``: the largest learning rate allowed, default
        :func:`largest_safe_lr`); ``max_iter``, ``gtol``: L-BFGS cap and tolerance.

    Returns:
        A :class:`JointSchedule` with ``method == "exact_joint"``.

    Raises:
        ValueError: ``problem`` not quadratic, or as :func:`practical_schedule`.
    """
    check_problem(problem)
    if not problem.is_quadratic:
        raise ValueError(f"problem: the exact joint optimum needs a quadratic problem, got "
                         f"{type(problem).__name__}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: must be an int >= 1, got {max_iter!r}")
    start = practical_schedule(problem, steps=steps, samples=samples, lr=lr, momentum=momentum,
                               nesterov=nesterov, min_batch=min_batch, max_batch=max_batch,
                               sensitivity=sensitivity)
    steps, dtype, lr_max, budget = _setup(problem, lr, steps, samples, min_batch, max_batch, momentum,
                                          nesterov)
    obj = _JointObjective(problem, lr_max, jnp.asarray(momentum, dtype), budget.samples, budget.lo,
                          budget.hi, nesterov, steps)
    lr_opt, beta, b, it, result = _joint_core(obj, start.beta, start.lr, max_iter, gtol)
    opt = SGD(lr_opt, momentum=momentum, nesterov=nesterov)
    parts = first_order_parts(problem, steps=steps, optimizer=opt, method=as_method(sensitivity, problem))
    exact_int = _exact_loss(problem, b.astype(dtype), opt)
    # Keep the practical schedule if rounding made the optimum worse (cannot happen at the real
    # optimum; the integers are a linearisation).
    better = exact_int <= start.exact_loss
    pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731
    return JointSchedule(
        lr=pick(lr_opt, start.lr), batch_sizes=pick(b, start.batch_sizes).astype(b.dtype),
        beta=pick(beta, start.beta),
        predicted_loss=pick(predicted_loss_from_parts(problem, parts, b), start.predicted_loss),
        exact_loss=pick(exact_int, start.exact_loss),
        decayed_steps=jnp.sum(pick(lr_opt, start.lr) < lr_max * (1.0 - 1e-6)),
        lr_max=lr_max, iterations=jnp.asarray(it), result=result, method="exact_joint")


# ------------------------------------------------------------------------------------------------
# the steps-versus-samples front
# ------------------------------------------------------------------------------------------------
def wall_clock(steps, samples, t0: float, t1: float):
    """The step-time model's wall-clock ``t0 K + t1 N`` (``step_time = t0 + t1 b``)."""
    return t0 * np.asarray(steps, dtype=np.float64) + t1 * np.asarray(samples, dtype=np.float64)


class StepsSamplesFront(eqx.Module):
    """The fewest samples that reach ``target`` at each step count (docs/theory.md §8).

    Attributes:
        steps: ``(m,)`` step counts ``K``.
        samples_optimal: ``(m,)`` minimal ``N`` with the optimal (square-root-rule) schedule at the
            best constant lr ``<= lr_max`` (``inf`` where even full-batch descent misses the target).
        samples_constant: ``(m,)`` the same for the constant batch ``N / K``.
        lr_optimal, lr_constant: ``(m,)`` the learning rates attaining them.
        target: the target expected loss; loss: ``"exact"`` or ``"predicted"``.
        wall_optimal, wall_constant: ``t0 K + t1 N`` (``None`` without a step-time model).
    """

    steps: np.ndarray
    samples_optimal: np.ndarray
    samples_constant: np.ndarray
    lr_optimal: np.ndarray
    lr_constant: np.ndarray
    target: float
    loss: str = eqx.field(static=True)
    wall_optimal: np.ndarray | None = None
    wall_constant: np.ndarray | None = None

    def _pick(self, which):
        if which not in ("optimal", "constant"):
            raise ValueError(f"which: must be 'optimal' or 'constant', got {which!r}")
        return (self.samples_optimal, self.wall_optimal) if which == "optimal" else (
            self.samples_constant, self.wall_constant)

    def cheapest(self, which: str = "optimal") -> tuple[int, float, float]:
        """``(K, N, wall-clock)`` of the cheapest point of the step-time model."""
        samples, wall = self._pick(which)
        if wall is None:
            raise ValueError("which: the front was computed without a step-time model (t0, t1)")
        i = int(np.argmin(np.where(np.isfinite(wall), wall, np.inf)))
        return int(self.steps[i]), float(samples[i]), float(wall[i])

    def critical_batch(self, which: str = "optimal") -> float:
        """``N_min / K_min`` (McCandlish et al.'s critical batch): the fewest samples over the grid
        divided by the fewest steps that reach the target."""
        samples, _ = self._pick(which)
        finite = np.isfinite(samples)
        if not finite.any():
            return float("inf")
        return float(np.min(samples[finite]) / np.min(self.steps[finite]))


@eqx.filter_jit
def _min_samples(problem, weights, opt, target, lo, hi, use_exact: bool, parts):
    """Bisection in ``log N`` for the fewest samples whose schedule reaches ``target``, for the
    square-root rule and for the constant batch (``inf`` when unreachable)."""
    steps = weights.shape[0]
    dtype = weights.dtype

    def loss(b):
        val = _exact_loss(problem, b, opt) if use_exact else predicted_loss_from_parts(problem, parts, b)
        return jnp.where(jnp.isfinite(val), val, jnp.inf)

    def sched(log_n, kind):
        n = jnp.exp(log_n)
        if kind == "constant":
            return jnp.full(steps, n / steps, dtype)
        return alloc.relaxed_optimum(weights, n, min_batch=lo, max_batch=hi)

    a0 = jnp.log(steps * lo) + 1e-12
    b0 = jnp.log(steps * (jnp.asarray(1e9, dtype) if hi is None else hi))

    def solve(kind):
        def halve(_, ab):
            a, b = ab
            mid = 0.5 * (a + b)
            ok = loss(sched(mid, kind)) <= target
            return jnp.where(ok, a, mid), jnp.where(ok, mid, b)

        reachable = loss(sched(b0, kind)) <= target
        at_lo = loss(sched(a0, kind)) <= target
        a, b = jax.lax.fori_loop(0, 80, halve, (a0, b0))
        n = jnp.where(at_lo, jnp.exp(a0), jnp.exp(b))
        return jnp.where(reachable, n, jnp.inf)

    return solve("optimal"), solve("constant")


def steps_samples_front(problem, *, target, steps, lr=None, momentum=0.0, nesterov: bool = False,
                        min_batch=1, max_batch=None, horizons: int = 12, loss: str = "auto",
                        sensitivity="auto", t0=None, t1=None) -> StepsSamplesFront:
    """For a target expected loss, the fewest samples ``N(K)`` that reach it in at most ``K`` steps, for the
    square-root-rule schedule and for the constant batch, each at its best constant learning rate
    ``<= lr`` (docs/theory.md §4.2, §8): the first-principles counterpart of the empirical
    critical-batch-size curve (McCandlish et al. 2018).

    At fixed horizon ``T = K lr / (1 - mu)`` the noise term depends on the samples only (the
    degeneracy of theory 8.2), so more steps help only by allowing a longer horizon: ``N(K)`` falls
    from infinity (``K`` too small for even full-batch descent) to a plateau, and the optimal
    schedule's front lies below the constant batch's. For each ``K`` the horizon is chosen from
    ``horizons`` geometric values ``T_j = K_max lr_max 2^(-j/2)`` with ``T_j <= K lr_max`` plus
    ``K lr_max`` itself (learning rates are array values: no recompilation per horizon).

    Args:
        problem: a jaxsched problem.
        target: the target ``E F(x_K)``.
        steps: increasing step counts ``K`` (Python ints; each is one compiled shape).
        lr: the largest constant learning rate allowed (default :func:`largest_safe_lr`).
        momentum, nesterov: the optimizer (theory 7).
        min_batch, max_batch: batch bounds.
        horizons: size of the horizon grid (Python int >= 1).
        loss: ``"exact"`` (quadratic problems), ``"predicted"`` or ``"auto"`` (exact when available).
        sensitivity: as for :func:`jaxsched.optimal_schedule`.
        t0, t1: the step-time model ``t0 + t1 b`` (both or neither): wall-clock ``t0 K + t1 N``.

    Returns:
        A :class:`StepsSamplesFront`.

    Raises:
        ValueError: naming the argument (non-increasing ``steps``, a non-finite ``target``, an
            unknown ``loss`` or ``"exact"`` on a non-quadratic problem, only one of ``t0``/``t1``).
    """
    check_problem(problem)
    ks = [check_steps(k) for k in (steps if isinstance(steps, (list, tuple, np.ndarray)) else [steps])]
    if any(b <= a for a, b in zip(ks, ks[1:], strict=False)):
        raise ValueError(f"steps: must be strictly increasing, got {ks}")
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise ValueError(f"target: must be a number, got {target!r}") from None
    if not np.isfinite(target):
        raise ValueError(f"target: must be a finite number, got {target!r}")
    if loss not in ("auto", "exact", "predicted"):
        raise ValueError(f"loss: must be 'auto', 'exact' or 'predicted', got {loss!r}")
    if loss == "exact" and not problem.is_quadratic:
        raise ValueError("loss: 'exact' needs a quadratic problem")
    if isinstance(horizons, bool) or not isinstance(horizons, int) or horizons < 1:
        raise ValueError(f"horizons: must be an int >= 1, got {horizons!r}")
    if (t0 is None) != (t1 is None):
        raise ValueError("t0: give both t0 and t1 (step time t0 + t1 * batch) or neither")
    use_exact = problem.is_quadratic if loss == "auto" else loss == "exact"
    dtype = problem.x0.dtype
    lr_max = _scalar_lr(lr, problem, momentum)
    SGD(lr_max, momentum=momentum, nesterov=nesterov)
    method = as_method(sensitivity, problem)
    grid = ks[-1] * lr_max * 2.0 ** (-0.5 * np.arange(horizons))
    out = {"optimal": [], "constant": [], "lr_optimal": [], "lr_constant": []}
    for k in ks:
        budget = _budget(problem, k, k * float(min_batch), min_batch, max_batch, dtype)
        rates = sorted({k * lr_max, *[t for t in grid if t <= k * lr_max * (1 + 1e-12)]})
        best = {"optimal": (np.inf, np.nan), "constant": (np.inf, np.nan)}
        for horizon in rates:
            rate = jnp.full(k, horizon / k, dtype)  # an array lr: one compile for every rate
            opt = SGD(rate, momentum=momentum, nesterov=nesterov)
            parts = first_order_parts(problem, steps=k, optimizer=opt, method=method)
            w = parts.weights * problem.inverse_batch_coefficient()
            n_opt, n_const = _min_samples(problem, w, opt, jnp.asarray(target, dtype), budget.lo,
                                          budget.hi, use_exact, parts)
            for name, n in (("optimal", float(n_opt)), ("constant", float(n_const))):
                if n < best[name][0]:
                    best[name] = (n, horizon / k)
        for name in ("optimal", "constant"):
            out[name].append(best[name][0])
            out["lr_" + name].append(best[name][1])
    k_arr = np.asarray(ks)
    # A step budget is an upper bound: with at most K steps the fewest samples are the running
    # minimum over the grid (the horizon grid leaves O(h^2) wiggles in the raw values).
    front = StepsSamplesFront(
        steps=k_arr, samples_optimal=np.minimum.accumulate(np.asarray(out["optimal"])),
        samples_constant=np.minimum.accumulate(np.asarray(out["constant"])),
        lr_optimal=np.asarray(out["lr_optimal"]),
        lr_constant=np.asarray(out["lr_constant"]), target=target,
        loss="exact" if use_exact else "predicted")
    if t0 is not None:
        t0, t1 = float(t0), float(t1)
        if not (np.isfinite(t0) and np.isfinite(t1) and t0 >= 0 and t1 >= 0 and t0 + t1 > 0):
            raise ValueError(f"t0: the step-time model needs t0, t1 >= 0, not both 0; got {t0}, {t1}")
        front = eqx.tree_at(lambda f: (f.wall_optimal, f.wall_constant), front,
                            (wall_clock(k_arr, front.samples_optimal, t0, t1),
                             wall_clock(k_arr, front.samples_constant, t0, t1)),
                            is_leaf=lambda x: x is None)
    return front
