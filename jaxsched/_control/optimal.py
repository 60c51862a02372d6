"""Optimal batch schedules (docs/theory.md §4, §7, §8): the closed form from ``phi`` (square-root
rule, bounds, exact integer optimum), L-BFGS (optimistix) through the diffrax-integrated expected
loss, and L-BFGS through the exact discrete recursion (quadratic problems).

The control method is an object (``ClosedForm()``, ``FirstOrderGradient()``, ``ExactDiscrete()``;
the strings ``"closed_form"``, ``"gradient"``, ``"exact"`` are aliases), the sensitivity too
(``sensitivity=js.Eigenbasis()`` etc., default ``"auto"``).
"""

from __future__ import annotations

import abc
import inspect
import warnings
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from .._expansion import _common as cm
from .._expansion.moments import _expansion_core
from .._expansion.sensitivity import (
    FirstOrderParts,
    as_method,
    first_order_parts,
    noise_objective,
    predicted_loss_from_parts,
)
from .._misc import _is_concrete, check_steps
from .._problem.base import check_problem
from .._solution import RESULTS
from .._types import Array, Int, IntStepArray, Scalar, StepArray
from . import allocation as alloc, floor as fl, free_form as ff
from .progress import NoProgress, ProgressMeter, TqdmProgress
from .refine import refined_phi

__all__ = ["AbstractControl", "ClosedForm", "ExactDiscrete", "FirstOrderGradient", "METHODS",
           "OptimalSchedule", "RefinedClosedForm", "optimal_schedule"]

METHODS = ("closed_form", "refined", "gradient", "exact")


class OptimalSchedule(eqx.Module):
    """The optimal schedule and what it is worth.

    Attributes:
        batch_sizes: ``(steps,)`` integer batch sizes, ``sum == samples``, within the bounds.
        beta: ``(steps,)`` the real-valued optimum before rounding.
        predicted_loss: the expansion's ``E F(x_K)`` for ``batch_sizes``.
        phi: ``(steps,)`` sensitivities ``phi_k`` (docs/theory.md §4; for an lr schedule the
            effective ``(s_k / mean s) phi_k``).
        objective: ``sum_k phi_k w(b_k)`` for ``batch_sizes`` (the schedule-dependent part of J1).
        relaxed_objective: the same for ``beta``.
        constant_objective: the same for the constant real schedule ``samples / steps``.
        base_loss: ``F(x_T)``; ``correction``: the schedule-independent part of ``J1``.
        iterations: optimiser iterations (0 for the closed form).
        objective_stderr: standard error of ``objective`` from a subsampled (matrix-free)
            sensitivity (an upper bound: per-step errors added as if fully correlated); 0 when exact.
        stability_floor: ``(steps,)`` the lower bound the schedule was clipped to (``min_batch``, or
            ``max(min_batch, 2 b_stab(s_k))`` where the problem can compute the mean-square stability
            batch ``b_stab``, docs/theory.md §8.2 item 3).
        clipped_steps: the number of steps where the unclipped optimum lay below
            ``stability_floor`` (0: the clip did not bind).
        result: a :class:`jaxsched.RESULTS` code.
        method: the control method's name.
    """

    batch_sizes: IntStepArray
    beta: StepArray
    predicted_loss: Scalar
    phi: StepArray
    objective: Scalar
    relaxed_objective: Scalar
    constant_objective: Scalar
    base_loss: Scalar
    correction: Scalar
    iterations: Int[Array, ""]
    objective_stderr: Scalar
    stability_floor: StepArray
    clipped_steps: Int[Array, ""]
    result: RESULTS
    method: str = eqx.field(static=True)

    @property
    def gain_over_constant(self) -> Scalar:
        """Ratio of the constant schedule's noise term to the optimum's (>= 1)."""
        return self.constant_objective / self.objective


class _Budget(eqx.Module):
    samples: Scalar
    lo: Scalar
    hi: Scalar | None
    floor: StepArray  # per-step lower bound (min_batch or the stability floor)


def _finish(problem, parts: FirstOrderParts, budget: _Budget, beta, batch_sizes, iterations, method,
            result=RESULTS.successful, *, phi=None, clipped=0) -> OptimalSchedule:
    steps = parts.phi.shape[0]
    dtype = parts.phi.dtype
    phi = parts.effective_phi if phi is None else phi
    constant = jnp.full(steps, budget.samples / steps, dtype)
    w = problem.noise_weight(jnp.asarray(batch_sizes, dtype))
    return OptimalSchedule(
        batch_sizes=batch_sizes,
        beta=beta,
        predicted_loss=predicted_loss_from_parts(problem, parts, batch_sizes),
        phi=phi,
        objective=noise_objective(problem, phi, batch_sizes),
        relaxed_objective=noise_objective(problem, phi, beta),
        constant_objective=noise_objective(problem, phi, constant),
        base_loss=parts.base_loss,
        correction=parts.correction,
        iterations=jnp.asarray(iterations),
        objective_stderr=jnp.sum(jnp.abs(w) * parts.phi_stderr * parts.step_sizes)
        / jnp.mean(parts.step_sizes),
        stability_floor=budget.floor,
        clipped_steps=jnp.asarray(clipped, jnp.result_type(int)),
        result=RESULTS.where(parts.result == RESULTS.successful, result, parts.result),
        method=method,
    )


def _allocation_weights(problem, parts: FirstOrderParts) -> StepArray:
    # noise_weight(b) is affine in 1/b; its 1/b coefficient rescales phi for the allocation
    # (1 with replacement, n/(n-1) without).
    return parts.effective_phi * problem.inverse_batch_coefficient()


def _clipped_allocation(phi_alloc, budget: _Budget):
    """``(beta, b, clipped)``: the square-root rule and the exact integer optimum for the weights
    ``phi_alloc``, with the per-step floor ``budget.floor`` where the unclipped optimum violates it
    (docs/theory.md §8.2 item 3); ``clipped`` counts the steps where it does."""
    beta = alloc.relaxed_optimum(phi_alloc, budget.samples, min_batch=budget.lo, max_batch=budget.hi)
    b = alloc.integer_optimum(phi_alloc, budget.samples, min_batch=budget.lo, max_batch=budget.hi)
    clipped = fl.floor_binds(beta, budget.floor)
    beta_c = fl.relaxed_with_floor(phi_alloc, budget.samples, budget.floor, budget.hi)
    b_c = fl.integer_with_floor(phi_alloc, budget.samples, budget.floor, budget.hi)
    bind = clipped > 0
    return jnp.where(bind, beta_c, beta), jnp.where(bind, b_c, b).astype(b.dtype), clipped


def _first_order_allocation(problem, parts, budget: _Budget):
    beta, b, _ = _clipped_allocation(_allocation_weights(problem, parts), budget)
    return beta, b


def _lbfgs(objective, theta0, max_iter: int, gtol, meter: ProgressMeter):
    """Minimise ``objective`` with optimistix's L-BFGS; returns ``(theta, iterations, result)``.
    ``gtol`` is the tolerance of optimistix's Cauchy termination (relative and absolute, on the
    objective's change and on the step)."""
    solver = optx.LBFGS(rtol=gtol, atol=gtol, verbose=meter.callback)
    sol = optx.minimise(lambda th, _: objective(th), solver, theta0, max_steps=max_iter, throw=False)
    result = RESULTS.where(sol.result == optx.RESULTS.nonlinear_max_steps_reached,
                           RESULTS.max_iterations_reached, RESULTS.promote(sol.result))
    return sol.value, sol.stats["num_steps"], result


class AbstractControl(eqx.Module):
    """A method that turns :class:`FirstOrderParts` into an :class:`OptimalSchedule`."""

    name: ClassVar[str] = ""

    def check(self, problem) -> None:
        """Refuse, eagerly and naming the argument, a problem this method cannot optimise."""

    def iteration_cap(self) -> int:
        """The iteration cap of an iterative method (0 for a closed form)."""
        return 0

    @abc.abstractmethod
    def solve(self, problem, parts, optimizer, budget, rtol, atol, solver, meter) -> OptimalSchedule:
        """The optimal schedule (traced inside one jitted call)."""


class ClosedForm(AbstractControl):
    """The square-root rule ``b_k* = clip(sqrt(phi_k / nu), b_min, b_max)`` for ``beta`` and the
    exact integer optimum of ``sum_k phi_k w(b_k)`` (threshold search plus marginal allocation)
    for ``batch_sizes`` (docs/theory.md §4)."""

    name: ClassVar[str] = "closed_form"

    def solve(self, problem, parts, optimizer, budget, rtol, atol, solver, meter):
        beta, b, clipped = _clipped_allocation(_allocation_weights(problem, parts), budget)
        return _finish(problem, parts, budget, beta, b, 0, self.name, clipped=clipped)


def _refined_weights(problem, parts: FirstOrderParts, optimizer) -> StepArray:
    phi_ref = refined_phi(problem, parts, optimizer)
    return phi_ref * parts.step_sizes / jnp.mean(parts.step_sizes)


class RefinedClosedForm(AbstractControl):
    """The square-root rule on the boundary-layer refined sensitivity of momentum
    (docs/theory.md §7): ``b_k`` proportional to ``sqrt(s_k phi_ref_k)`` with
    ``phi_ref_k = beta_k^2 tr(Lam(min(t_k + (1 + L) tau, T)) Sigma(x(t_k)))`` and
    ``beta_k = 1 - mu^(K-k)`` (Nesterov ``1 - mu^(K-k+1)``), then the exact integer optimum of the
    refined objective. Equal to :class:`ClosedForm` to first order; for plain SGD the two differ
    only by the quadrature of ``phi`` over a step. ``phi`` and the objectives of the result are the
    refined ones; ``predicted_loss`` is the first-order prediction. Non-quadratic problems get the
    arrival factor ``beta_k^2`` only (see :mod:`jaxsched._control.refine`)."""

    name: ClassVar[str] = "refined"

    def solve(self, problem, parts, optimizer, budget, rtol, atol, solver, meter):
        phi = _refined_weights(problem, parts, optimizer)
        beta, b, clipped = _clipped_allocation(phi * problem.inverse_batch_coefficient(), budget)
        return _finish(problem, parts, budget, beta, b, 0, self.name, phi=phi, clipped=clipped)


class FirstOrderGradient(AbstractControl):
    """L-BFGS (optimistix) over a free-form schedule (one degree of freedom per step, budget and
    bounds met by construction) through the diffrax-integrated moment system: reverse mode through
    ``diffeqsolve``. Recovers the closed form; a cross-check of it.

    Args:
        max_iter: iteration cap; gtol: termination tolerance.
    """

    max_iter: int = eqx.field(static=True, default=200)
    gtol: float = 1e-9
    name: ClassVar[str] = "gradient"

    def iteration_cap(self) -> int:
        return self.max_iter

    def solve(self, problem, parts, optimizer, budget, rtol, atol, solver, meter):
        steps = parts.phi.shape[0]
        units = cm.step_units(optimizer, steps, parts.phi.dtype)
        s, lo, hi = budget.samples, budget.lo, budget.hi

        def noise_part(theta):
            b = ff.free_form_batch_sizes(theta, s, min_batch=lo, max_batch=hi)
            return _expansion_core(problem, b, units, rtol, atol, solver, False).j1_noise

        theta0 = jnp.zeros(steps, parts.phi.dtype)  # the constant schedule, projected into the bounds
        # Normalise by the constant schedule's noise term (from phi: no extra solve to compile).
        b0 = ff.free_form_batch_sizes(theta0, s, min_batch=lo, max_batch=hi)
        scale = jnp.abs(noise_objective(problem, parts.effective_phi, b0))
        theta, it, result = _lbfgs(lambda th: noise_part(th) / scale, theta0, self.max_iter,
                                   jnp.asarray(self.gtol, theta0.dtype), meter)
        beta = ff.free_form_batch_sizes(theta, s, min_batch=lo, max_batch=hi)
        # Integers: J1 is affine in w(b), so the exact integer optimum of the first-order objective
        # is defined by phi alone (the linearisation of J1 at beta is phi, to solver tolerance).
        b = alloc.integer_optimum(_allocation_weights(problem, parts), s, min_batch=lo, max_batch=hi)
        return _finish(problem, parts, budget, beta, b, it, self.name, result,
                       clipped=fl.floor_binds(beta, budget.floor))

    def check(self, problem) -> None:
        del problem  # any problem; the stability floor is reported, not imposed (``clipped_steps``)


def _exact_loss(problem, b, optimizer):
    from .._problem.exact import exact_expected_loss

    if "optimizer" in inspect.signature(exact_expected_loss).parameters:
        return exact_expected_loss(problem, b, optimizer=optimizer)
    return exact_expected_loss(problem, b, lr=optimizer.lr)


class ExactDiscrete(AbstractControl):
    """L-BFGS through the exact discrete recursion (quadratic problems only, docs/theory.md §5.2,
    §5.3, §7): the true optimum of discrete SGD's expected loss, started from the first-order
    optimum; then the exact integer optimum of the exact loss linearised in ``1/b`` at the real
    optimum, kept if it beats the first-order integer schedule in the exact loss.

    Args:
        max_iter: iteration cap; gtol: termination tolerance.
    """

    max_iter: int = eqx.field(static=True, default=200)
    gtol: float = 1e-9
    name: ClassVar[str] = "exact"

    def iteration_cap(self) -> int:
        return self.max_iter

    def check(self, problem) -> None:
        if not problem.is_quadratic:
            raise ValueError(
                f"method: 'exact' needs a quadratic problem with an exact recursion, got "
                f"{type(problem).__name__}")

    def solve(self, problem, parts, optimizer, budget, rtol, atol, solver, meter):
        steps = parts.phi.shape[0]
        s, hi = budget.samples, budget.hi
        # Start from the refined rule (theory 7: closer to the exact optimum with momentum).
        phi_ref = _refined_weights(problem, parts, optimizer) * problem.inverse_batch_coefficient()
        beta_fo, b_fo, clipped = _clipped_allocation(phi_ref, budget)
        # b = floor + free-form share of the spare budget: every iterate respects the stability
        # floor (and min_batch) and the budget by construction.
        lo_k = budget.floor
        spare = s - jnp.sum(lo_k)
        width = None if hi is None else hi - jnp.max(lo_k)

        def batches(theta):
            return lo_k + ff.free_form_batch_sizes(theta, spare, min_batch=0.0, max_batch=width)

        def loss(b):
            return _exact_loss(problem, b, optimizer)

        theta0 = ff.free_form_init(jnp.maximum(beta_fo - lo_k, 0.0), spare, min_batch=0.0,
                                   max_batch=width)
        gd = jax.lax.stop_gradient(loss(jnp.full(steps, jnp.inf, beta_fo.dtype)))  # plain GD
        scale = jax.lax.stop_gradient(loss(beta_fo) - gd)

        def objective(theta):
            return (loss(batches(theta)) - gd) / scale

        theta, it, result = _lbfgs(objective, theta0, self.max_iter,
                                   jnp.asarray(self.gtol, theta0.dtype), meter)
        beta = batches(theta)
        phi_seen = jax.grad(lambda u: loss(1.0 / u))(1.0 / beta)
        _, b_lin, _ = _clipped_allocation(phi_seen, budget)
        b = jnp.where(loss(b_lin) <= loss(b_fo), b_lin, b_fo)
        return _finish(problem, parts, budget, beta, b, it, self.name, result, clipped=clipped)


_ALIASES = {"closed_form": ClosedForm, "refined": RefinedClosedForm, "gradient": FirstOrderGradient,
            "exact": ExactDiscrete}


def _as_control(method, max_iter, gtol) -> AbstractControl:
    if isinstance(method, str):
        if method not in _ALIASES:
            raise ValueError(f"method: must be one of {METHODS} or a control object, got {method!r}")
        if method in ("closed_form", "refined"):
            return _ALIASES[method]()
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter: must be an int >= 1, got {max_iter!r}")
        return _ALIASES[method](max_iter=int(max_iter), gtol=gtol)
    if not isinstance(method, AbstractControl):
        raise ValueError(
            "method: expected 'closed_form', 'refined', 'gradient', 'exact', js.ClosedForm(), "
            "js.RefinedClosedForm(), js.FirstOrderGradient() or js.ExactDiscrete(), got "
            f"{type(method).__name__}")
    return method


@eqx.filter_jit
def _control_core(control, problem, parts, optimizer, budget, rtol, atol, solver, meter):
    return control.solve(problem, parts, optimizer, budget, rtol, atol, solver, meter)


def _as_count(name: str, value, minimum: int = 1) -> Array:
    arr = jnp.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name}: must be a scalar, got shape {arr.shape}")
    if _is_concrete(arr):
        v = float(arr)
        if not np.isfinite(v) or v < minimum:
            raise ValueError(f"{name}: must be a number >= {minimum}, got {v}")
    return arr.astype(jnp.result_type(float))


def _budget(problem, steps, samples, min_batch, max_batch, dtype, floor=None) -> _Budget:
    lo = _as_count("min_batch", min_batch).astype(dtype)
    n = _as_count("samples", samples).astype(dtype)
    hi = None if max_batch is None else _as_count("max_batch", max_batch).astype(dtype)
    cap = problem.batch_cap()
    n, lo, hi_checked = alloc._check_budget(steps, n, lo, hi, integer=False, batch_cap=cap)
    hi = hi_checked.astype(dtype) if (hi is not None or cap is not None) else None
    lo, n = lo.astype(dtype), n.astype(dtype)
    floor = jnp.full(steps, lo, dtype) if floor is None else jnp.maximum(floor.astype(dtype), lo)
    if _is_concrete(floor, n):
        need = float(jnp.sum(floor))
        if not np.isfinite(need):
            raise ValueError("lr: full-batch gradient descent is unstable at this learning rate "
                             "(no batch size makes SGD mean-square stable)")
        if need > float(n) * (1 + 1e-12):
            raise ValueError(f"samples: the stability clip b_k >= 2 b_stab(s_k) needs at least "
                             f"{need:.6g} samples, got {float(n):g}")
        if hi is not None and float(jnp.max(floor)) > float(hi):
            raise ValueError(f"max_batch: the stability clip needs batches up to "
                             f"{float(jnp.max(floor)):.6g} > max_batch = {float(hi):g}")
    return _Budget(samples=n, lo=lo, hi=hi, floor=floor)


def stability_floor(problem, optimizer, steps: int):
    """``2 b_stab(s_k)`` per step where the problem can compute its mean-square stability batch
    (quadratic problems, docs/theory.md §8.2 item 3), else ``None``. ``s_k`` are the optimizer's
    learning rates."""
    rates = optimizer.step_sizes(steps)
    b_stab = problem.stability_batch(rates, optimizer)
    if b_stab is None and problem.is_quadratic:  # until every quadratic problem has the method
        from .._problem.stability import stability_batch_at

        b_stab = stability_batch_at(problem, rates, optimizer)
    return None if b_stab is None else 2.0 * jnp.asarray(b_stab, rates.dtype)


def _largest_curvature(problem) -> float | None:
    """``lam_max`` of the Hessian: the eigen form for quadratic problems, else the Hessian at ``x0``
    (power iteration on Hessian-vector products above 256 parameters); ``None`` if not concrete."""
    if not _is_concrete(problem.x0):
        return None
    if problem.is_quadratic:
        return float(jnp.max(problem.eigen_form().lam))
    if problem.dim <= 256:
        hess = np.asarray(problem.hessian(problem.x0), dtype=np.float64)
        return float(np.linalg.eigvalsh(0.5 * (hess + hess.T))[-1])
    v = jnp.ones_like(problem.x0) / float(np.sqrt(problem.dim))  # a Python float keeps x0.dtype
    lam = 0.0
    for _ in range(30):
        hv = problem.hvp(problem.x0, v)
        lam = float(jnp.vdot(v, hv))
        v = hv / jnp.maximum(jnp.linalg.norm(hv), 1e-300)
    return lam


def validity_warnings(problem, optimizer, steps: int) -> list[str]:
    """The messages for a run outside the tested range of the expansion (docs/theory.md §7, §8):
    ``h lam_max / (1 - mu)^2 > 0.5`` with momentum, ``s lam_max > 0.1`` with an lr schedule
    (``s`` the largest intrinsic step ``lr / (1 - mu)``)."""
    if not _is_concrete(optimizer.lr, optimizer.momentum):
        return []
    lam = _largest_curvature(problem)
    if lam is None:
        return []
    rates = np.asarray(optimizer.step_sizes(steps), dtype=np.float64)
    mu = float(optimizer.momentum)
    out = []
    h = float(rates.max())
    if mu > 0 and h * lam / (1.0 - mu) ** 2 > 0.5:
        out.append(f"lr * lam_max / (1 - momentum)^2 = {h * lam / (1 - mu) ** 2:.3g} > 0.5: outside "
                   "the tested range of the momentum expansion (docs/theory.md §7)")
    if not optimizer.constant_lr and h / (1.0 - mu) * lam > 0.1:
        out.append(f"s * lam_max = {h / (1 - mu) * lam:.3g} > 0.1 for an lr schedule: outside the "
                   "tested range of the first-order rule (docs/theory.md §8)")
    return out


def optimal_schedule(
    problem,
    *,
    lr=None,
    steps: int,
    samples,
    min_batch=1,
    max_batch=None,
    method="closed_form",
    sensitivity="auto",
    optimizer=None,
    rtol=None,
    atol=None,
    solver=None,
    max_iter: int = 200,
    gtol: float = 1e-9,
    progress=False,
    stability_clip: bool = True,
    warn: bool = True,
    throw: bool = True,
) -> OptimalSchedule:
    """The batch schedule minimising the predicted expected final loss for a sample budget.

    Minimises ``sum_k phi_k w(b_k)`` subject to ``sum_k b_k = samples`` and
    ``min_batch <= b_k <= max_batch`` (docs/theory.md §4; a data set sampled without replacement
    also caps ``b_k <= n``).

    Args:
        problem: a jaxsched problem.
        lr: learning rate ``h > 0`` of plain SGD; or give ``optimizer`` (:class:`jaxsched.SGD` with
            momentum, Nesterov or a per-step lr schedule).
        steps: number of steps ``K`` (Python int).
        samples: sample budget ``N``, ``steps * min_batch <= N <= steps * max_batch``.
        min_batch, max_batch: bounds on each batch size (``max_batch=None``: unbounded).
        method: :class:`ClosedForm` (default), :class:`RefinedClosedForm` (momentum, theory 7),
            :class:`FirstOrderGradient` or :class:`ExactDiscrete` (or their aliases
            ``"closed_form"``, ``"refined"``, ``"gradient"``, ``"exact"``).
        sensitivity: how ``phi`` is computed: ``"auto"`` (default), :class:`jaxsched.DenseAdjoint`,
            :class:`jaxsched.Eigenbasis`, :class:`jaxsched.MatrixFree` (or ``"dense"``, ``"eigen"``,
            ``"matrix-free"``).
        rtol, atol, solver: ODE solver options (see :func:`jaxsched.expansion`).
        max_iter, gtol: L-BFGS iteration cap and tolerance for the string aliases of the iterative
            methods (the method objects carry their own).
        progress: ``True`` for a tqdm bar of the L-BFGS iterations, or a progress meter object
            (``jaxsched.TqdmProgress()``, ``jaxsched.NoProgress()``).
        stability_clip: keep ``b_k >= max(min_batch, 2 b_stab(s_k))`` where the problem can compute
            its mean-square stability batch (quadratic problems; docs/theory.md §8.2 item 3); the
            number of steps where the clip binds is ``clipped_steps``. ``False`` keeps only
            ``min_batch`` (the schedule may then make the exact second moments diverge).
        warn: ``warnings.warn`` once per call when the run is outside the tested range of the
            expansion: ``h lam_max / (1 - mu)^2 > 0.5`` with momentum, ``s lam_max > 0.1`` with an
            lr schedule (``lam_max`` from the problem's eigen form, or the Hessian at ``x0``).
        throw: raise when a solve fails (default); otherwise the outcome is in ``result``.

    Returns:
        An :class:`OptimalSchedule`.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, ``steps <= 0``, an infeasible budget,
            ``min_batch > max_batch``, an unknown ``method`` or ``sensitivity``, or ``"exact"`` on a
            non-quadratic problem; ``samples`` below what the stability clip needs, or an ``lr`` at
            which full-batch gradient descent is unstable (quadratic problems).
    """
    if getattr(optimizer, "is_adaptive", False):  # Adam / RMSprop: through the moment model (§9.4)
        from .adaptive import adaptive_optimal_schedule

        return adaptive_optimal_schedule(problem, optimizer=optimizer, lr=lr, steps=steps,
                                         samples=samples, min_batch=min_batch, max_batch=max_batch,
                                         method=method, rtol=rtol, atol=atol, solver=solver,
                                         max_iter=max_iter, gtol=gtol, progress=progress,
                                         throw=throw)
    control = _as_control(method, max_iter, gtol)
    check_problem(problem)
    steps = check_steps(steps)
    dtype = problem.x0.dtype
    opt = cm.resolve_optimizer(optimizer, lr, dtype)
    opt.step_sizes(steps)  # a ValueError naming lr for an lr schedule of the wrong length
    floor = stability_floor(problem, opt, steps) if stability_clip else None
    budget = _budget(problem, steps, samples, min_batch, max_batch, dtype, floor)
    control.check(problem)
    if warn:
        messages = validity_warnings(problem, opt, steps)
        if messages:
            warnings.warn("; ".join(messages), RuntimeWarning, stacklevel=2)
    sens = as_method(sensitivity, problem)
    parts = first_order_parts(problem, steps=steps, optimizer=opt, method=sens, rtol=rtol, atol=atol,
                              solver=solver, throw=throw)
    rtol, atol = cm.tolerances(dtype, rtol, atol)
    solver = cm.default_solver(solver)
    meter = TqdmProgress() if progress is True else (NoProgress() if progress is False else progress)
    if not isinstance(meter, ProgressMeter):
        raise ValueError(f"progress: must be a bool or a progress meter, got {type(progress).__name__}")
    with meter.session(total=control.iteration_cap(), desc=f"optimal_schedule[{control.name}]") as live:
        out = _control_core(control, problem, parts, opt, budget, rtol, atol, solver, live)
        out = jax.block_until_ready(out)
    if throw:
        out = out.result.error_if(out, (out.result != RESULTS.successful)
                                  & (out.result != RESULTS.max_iterations_reached))
    return out
