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
from . import allocation as alloc
from . import free_form as ff
from .progress import NoProgress, ProgressMeter, TqdmProgress

__all__ = ["AbstractControl", "ClosedForm", "ExactDiscrete", "FirstOrderGradient", "METHODS",
           "OptimalSchedule", "optimal_schedule"]

METHODS = ("closed_form", "gradient", "exact")


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
            twice the mean-square stability batch where the problem can compute it).
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
            result=RESULTS.successful) -> OptimalSchedule:
    steps = parts.phi.shape[0]
    dtype = parts.phi.dtype
    phi = parts.effective_phi
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
        result=RESULTS.where(parts.result == RESULTS.successful, result, parts.result),
        method=method,
    )


def _allocation_weights(problem, parts: FirstOrderParts) -> StepArray:
    # noise_weight(b) is affine in 1/b; its 1/b coefficient rescales phi for the allocation
    # (1 with replacement, n/(n-1) without).
    return parts.effective_phi * problem.inverse_batch_coefficient()


def _first_order_allocation(problem, parts, budget: _Budget):
    phi_alloc = _allocation_weights(problem, parts)
    beta = alloc.relaxed_optimum(phi_alloc, budget.samples, min_batch=budget.lo, max_batch=budget.hi)
    b = alloc.integer_optimum(phi_alloc, budget.samples, min_batch=budget.lo, max_batch=budget.hi)
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
        beta, b = _first_order_allocation(problem, parts, budget)
        return _finish(problem, parts, budget, beta, b, 0, self.name)


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
        return _finish(problem, parts, budget, beta, b, it, self.name, result)


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
        s, lo, hi = budget.samples, budget.lo, budget.hi
        beta_fo, b_fo = _first_order_allocation(problem, parts, budget)

        def loss(b):
            return _exact_loss(problem, b, optimizer)

        theta0 = ff.free_form_init(beta_fo, s, min_batch=lo, max_batch=hi)
        floor = jax.lax.stop_gradient(loss(jnp.full(steps, jnp.inf, beta_fo.dtype)))  # plain GD
        scale = jax.lax.stop_gradient(loss(beta_fo) - floor)

        def objective(theta):
            b = ff.free_form_batch_sizes(theta, s, min_batch=lo, max_batch=hi)
            return (loss(b) - floor) / scale

        theta, it, result = _lbfgs(objective, theta0, self.max_iter,
                                   jnp.asarray(self.gtol, theta0.dtype), meter)
        beta = ff.free_form_batch_sizes(theta, s, min_batch=lo, max_batch=hi)
        phi_seen = jax.grad(lambda u: loss(1.0 / u))(1.0 / beta)
        b_lin = alloc.integer_optimum(phi_seen, s, min_batch=lo, max_batch=hi)
        b = jnp.where(loss(b_lin) <= loss(b_fo), b_lin, b_fo)
        return _finish(problem, parts, budget, beta, b, it, self.name, result)


_ALIASES = {"closed_form": ClosedForm, "gradient": FirstOrderGradient, "exact": ExactDiscrete}


def _as_control(method, max_iter, gtol) -> AbstractControl:
    if isinstance(method, str):
        if method not in _ALIASES:
            raise ValueError(f"method: must be one of {METHODS} or a control object, got {method!r}")
        if method == "closed_form":
            return ClosedForm()
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter: must be an int >= 1, got {max_iter!r}")
        return _ALIASES[method](max_iter=int(max_iter), gtol=gtol)
    if not isinstance(method, AbstractControl):
        raise ValueError(
            "method: expected 'closed_form', 'gradient', 'exact', js.ClosedForm(), "
            f"js.FirstOrderGradient() or js.ExactDiscrete(), got {type(method).__name__}")
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


def _budget(problem, steps, samples, min_batch, max_batch, dtype) -> _Budget:
    lo = _as_count("min_batch", min_batch).astype(dtype)
    n = _as_count("samples", samples).astype(dtype)
    hi = None if max_batch is None else _as_count("max_batch", max_batch).astype(dtype)
    cap = problem.batch_cap()
    n, lo, hi_checked = alloc._check_budget(steps, n, lo, hi, integer=False, batch_cap=cap)
    hi = hi_checked.astype(dtype) if (hi is not None or cap is not None) else None
    return _Budget(samples=n.astype(dtype), lo=lo.astype(dtype), hi=hi,
                   floor=jnp.full(steps, lo, dtype))


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
        method: :class:`ClosedForm` (default), :class:`FirstOrderGradient` or
            :class:`ExactDiscrete` (or their aliases ``"closed_form"``, ``"gradient"``, ``"exact"``).
        sensitivity: how ``phi`` is computed: ``"auto"`` (default), :class:`jaxsched.DenseAdjoint`,
            :class:`jaxsched.Eigenbasis`, :class:`jaxsched.MatrixFree` (or ``"dense"``, ``"eigen"``,
            ``"matrix-free"``).
        rtol, atol, solver: ODE solver options (see :func:`jaxsched.expansion`).
        max_iter, gtol: L-BFGS iteration cap and tolerance for the string aliases of the iterative
            methods (the method objects carry their own).
        progress: ``True`` for a tqdm bar of the L-BFGS iterations, or a progress meter object
            (``jaxsched.TqdmProgress()``, ``jaxsched.NoProgress()``).
        throw: raise when a solve fails (default); otherwise the outcome is in ``result``.

    Returns:
        An :class:`OptimalSchedule`.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, ``steps <= 0``, an infeasible budget,
            ``min_batch > max_batch``, an unknown ``method`` or ``sensitivity``, or ``"exact"`` on a
            non-quadratic problem.
    """
    control = _as_control(method, max_iter, gtol)
    check_problem(problem)
    steps = check_steps(steps)
    dtype = problem.x0.dtype
    opt = cm.resolve_optimizer(optimizer, lr, dtype)
    budget = _budget(problem, steps, samples, min_batch, max_batch, dtype)
    control.check(problem)
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
