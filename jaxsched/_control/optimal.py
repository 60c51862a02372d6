"""Optimal batch schedules (theory 4): closed form from ``phi``, gradient descent (optax) through the
diffrax-integrated expected loss, and gradient descent through the exact discrete recursion."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._expansion import moments as ex
from .._misc import _is_concrete
from .._types import Array, Int, IntStepArray, Scalar, StepArray
from . import allocation as alloc, free_form as sched

__all__ = ["OptimalSchedule", "optimal_schedule", "METHODS"]

METHODS = ("closed_form", "gradient", "exact")


class OptimalSchedule(eqx.Module):
    """The optimal schedule and what it is worth.

    Attributes:
        batch_sizes: ``(steps,)`` integer batch sizes, ``sum == samples``, within the bounds.
        beta: ``(steps,)`` the real-valued optimum before rounding.
        predicted_loss: the expansion's ``E F(x_K)`` for ``batch_sizes``.
        phi: ``(steps,)`` sensitivities ``phi_k`` (theory 4).
        objective: ``sum_k phi_k w(b_k)`` for ``batch_sizes`` (the schedule-dependent part of J1).
        relaxed_objective: the same for ``beta``.
        constant_objective: the same for the constant real schedule ``samples / steps``.
        base_loss: ``F(x_T)``; ``correction``: the drift-correction part of ``J1``.
        iterations: optimiser iterations (0 for the closed form).
        method: the method used.
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
    method: str = eqx.field(static=True)

    @property
    def gain_over_constant(self) -> Scalar:
        """Ratio of the constant schedule's noise term to the optimum's (>= 1)."""
        return self.constant_objective / self.objective


def _inverse_b_coefficient(problem, dtype) -> Array:
    # noise_weight(b) is affine in 1/b; its 1/b coefficient rescales phi for the allocation
    # (1 with replacement, n/(n-1) without).
    w1, w2 = problem.noise_weight(jnp.asarray([1.0, 2.0], dtype))
    return 2.0 * (w1 - w2)


# The live progress bar of an iterative solve (set by ``optimal_schedule(progress=True)``).
_PROGRESS: dict = {"bar": None}


def _tick(value):
    bar = _PROGRESS["bar"]
    if bar is not None:
        bar.update(1)
        bar.set_postfix(objective=f"{float(value):.6g}", refresh=False)


def _lbfgs(objective, theta0, max_iter, gtol, progress, cheap_compile: bool):
    """Minimise ``objective`` with optax's L-BFGS inside a ``while_loop``.

    ``cheap_compile``: a backtracking line search, which needs only values, so the compiled program
    holds one gradient of ``objective`` instead of two (used when ``objective`` is a diffrax solve
    whose reverse mode is costly to compile); otherwise the zoom (strong Wolfe) line search, which
    converges in fewer iterations.
    """
    if cheap_compile:
        opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=40))
        value_and_grad = jax.value_and_grad(objective)
    else:
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(objective)

    def cond(carry):
        _, state, it, gnorm = carry
        return (it < max_iter) & (gnorm > gtol)

    def body(carry):
        theta, state, it, _ = carry
        value, grad = value_and_grad(theta) if cheap_compile else value_and_grad(theta, state=state)
        updates, state = opt.update(
            grad, state, theta, value=value, grad=grad, value_fn=objective
        )
        theta = optax.apply_updates(theta, updates)
        # A traced flag, so runs with and without a progress bar share one compiled function.
        jax.lax.cond(progress, lambda v: jax.debug.callback(_tick, v), lambda v: None, value)
        return theta, state, it + 1, optax.tree_utils.tree_norm(grad)

    init = (theta0, opt.init(theta0), jnp.asarray(0), jnp.asarray(jnp.inf, theta0.dtype))
    theta, _, it, _ = jax.lax.while_loop(cond, body, init)
    return theta, it


def _finish(problem, parts, lr, beta, batch_sizes, samples, iterations, method):
    steps = parts.phi.shape[0]
    dtype = parts.phi.dtype
    constant = jnp.full(steps, samples / steps, dtype)
    return OptimalSchedule(
        batch_sizes=batch_sizes,
        beta=beta,
        predicted_loss=ex.predicted_loss_from_parts(problem, parts, batch_sizes, lr),
        phi=parts.phi,
        objective=ex.noise_objective(problem, parts.phi, batch_sizes),
        relaxed_objective=ex.noise_objective(problem, parts.phi, beta),
        constant_objective=ex.noise_objective(problem, parts.phi, constant),
        base_loss=parts.base_loss,
        correction=parts.correction,
        iterations=jnp.asarray(iterations),
        method=method,
    )


def _first_order_allocation(problem, parts, samples, lo, hi):
    phi_alloc = parts.phi * _inverse_b_coefficient(problem, parts.phi.dtype)
    beta = alloc.relaxed_optimum(phi_alloc, samples, min_batch=lo, max_batch=hi)
    b = alloc.integer_optimum(phi_alloc, samples, min_batch=lo, max_batch=hi)
    return beta, b


# The adjoint solve (``_expansion._first_order_core``) is its own jitted function, shared with
# ``sensitivity``: each method's core below takes its result, so that expensive compile happens once
# per problem shape, not once per entry point.


@eqx.filter_jit
def _closed_form_core(problem, parts, lr, samples, lo, hi):
    ex.TRACE_COUNTS["optimal_closed_form"] += 1
    beta, b = _first_order_allocation(problem, parts, samples, lo, hi)
    return _finish(problem, parts, lr, beta, b, samples, 0, "closed_form")


@eqx.filter_jit
def _gradient_core(problem, parts, lr, samples, lo, hi, rtol, atol, solver, max_iter, gtol, progress):
    ex.TRACE_COUNTS["optimal_gradient"] += 1
    steps = parts.phi.shape[0]

    def noise_part(theta):
        b = sched.free_form_batch_sizes(theta, samples, min_batch=lo, max_batch=hi)
        return ex._expansion_core(problem, b, lr, rtol, atol, solver).j1_noise

    theta0 = jnp.zeros(steps, parts.phi.dtype)  # the constant schedule (projected into the bounds)
    # Normalise by the constant schedule's noise term (from phi: no extra solve to compile).
    b0 = sched.free_form_batch_sizes(theta0, samples, min_batch=lo, max_batch=hi)
    scale = jnp.abs(ex.noise_objective(problem, parts.phi, b0))
    theta, it = _lbfgs(lambda th: noise_part(th) / scale, theta0, max_iter, gtol, progress, True)
    beta = sched.free_form_batch_sizes(theta, samples, min_batch=lo, max_batch=hi)
    # Integers: J1 is affine in 1/b, so the exact integer optimum of the first-order objective is
    # defined by phi alone (the linearisation of J1 at beta is phi, to solver tolerance).
    phi_alloc = parts.phi * _inverse_b_coefficient(problem, parts.phi.dtype)
    b = alloc.integer_optimum(phi_alloc, samples, min_batch=lo, max_batch=hi)
    return _finish(problem, parts, lr, beta, b, samples, it, "gradient")


@eqx.filter_jit
def _exact_core(problem, parts, lr, samples, lo, hi, max_iter, gtol, progress):
    from .._problem.exact import exact_expected_loss

    ex.TRACE_COUNTS["optimal_exact"] += 1
    steps = parts.phi.shape[0]
    beta_fo, b_fo = _first_order_allocation(problem, parts, samples, lo, hi)

    def loss(b):
        return exact_expected_loss(problem, b, lr=lr)

    theta0 = sched.free_form_init(beta_fo, samples, min_batch=lo, max_batch=hi)
    floor = jax.lax.stop_gradient(loss(jnp.full(steps, jnp.inf, beta_fo.dtype)))  # plain GD
    scale = jax.lax.stop_gradient(loss(beta_fo) - floor)

    def objective(theta):
        b = sched.free_form_batch_sizes(theta, samples, min_batch=lo, max_batch=hi)
        return (loss(b) - floor) / scale

    theta, it = _lbfgs(objective, theta0, max_iter, gtol, progress, False)
    beta = sched.free_form_batch_sizes(theta, samples, min_batch=lo, max_batch=hi)
    # Integer schedule: exact integer optimum of the exact loss linearised in u = 1/b at beta; kept
    # only if it beats the first-order integer optimum in the exact loss (it nearly always does).
    phi_seen = jax.grad(lambda u: loss(1.0 / u))(1.0 / beta)
    b_lin = alloc.integer_optimum(phi_seen, samples, min_batch=lo, max_batch=hi)
    b = jnp.where(loss(b_lin) <= loss(b_fo), b_lin, b_fo)
    return _finish(problem, parts, lr, beta, b, samples, it, "exact")


def _as_count(name: str, value, minimum: int = 1) -> Array:
    arr = jnp.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name}: must be a scalar, got shape {arr.shape}")
    if _is_concrete(arr):
        v = float(arr)
        if not np.isfinite(v) or v < minimum:
            raise ValueError(f"{name}: must be a number >= {minimum}, got {v}")
    return arr.astype(jnp.result_type(float))


def optimal_schedule(
    problem,
    *,
    lr,
    steps: int,
    samples,
    min_batch=1,
    max_batch=None,
    method: str = "closed_form",
    rtol=None,
    atol=None,
    solver=None,
    max_iter: int = 200,
    gtol: float = 1e-9,
    progress: bool = False,
) -> OptimalSchedule:
    """The batch schedule minimising the predicted expected final loss for a sample budget.

    Minimises ``sum_k phi_k / b_k`` subject to ``sum_k b_k = samples`` and
    ``min_batch <= b_k <= max_batch`` (theory 4).

    Methods:
        ``"closed_form"``: ``phi`` from the adjoint system, the sqrt rule with bounds for ``beta``
            and the exact integer optimum (threshold search plus marginal allocation) for
            ``batch_sizes``.
        ``"gradient"``: L-BFGS (optax) over a free-form schedule (one degree of freedom per step,
            budget and bounds met by construction) through the diffrax-integrated moment system
            (reverse mode through ``diffeqsolve``). Recovers the closed form; a cross-check.
        ``"exact"``: L-BFGS through the exact discrete recursion (quadratic problems only): the
            true optimum of discrete SGD's expected loss, started from the first-order optimum.

    Args:
        problem: a jaxsched problem.
        lr: learning rate ``h > 0``.
        steps: number of steps ``K`` (Python int).
        samples: sample budget ``N``, ``steps * min_batch <= N <= steps * max_batch``.
        min_batch, max_batch: bounds on each batch size (``max_batch=None``: unbounded).
        method: one of ``"closed_form"``, ``"gradient"``, ``"exact"``.
        rtol, atol, solver: ODE solver options (see :func:`jaxsched.expansion`).
        max_iter, gtol: L-BFGS iteration cap and gradient-norm tolerance (iterative methods).
        progress: show a tqdm bar of the L-BFGS iterations (iterative methods; not under vmap).

    Returns:
        An :class:`OptimalSchedule`.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, ``steps <= 0``, an infeasible budget,
            ``min_batch > max_batch``, an unknown ``method``, or ``"exact"`` on a non-quadratic
            problem.
    """
    if method not in METHODS:
        raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
    ex.check_problem(problem)
    steps = ex.check_steps(steps)
    dtype = problem.x0.dtype
    lr = ex.as_positive_scalar("lr", lr).astype(dtype)
    lo = _as_count("min_batch", min_batch).astype(dtype)
    samples_arr = _as_count("samples", samples).astype(dtype)
    hi = None if max_batch is None else _as_count("max_batch", max_batch).astype(dtype)
    if _is_concrete(lo, samples_arr, hi):
        if hi is not None and float(lo) > float(hi):
            raise ValueError(f"min_batch: {float(lo):g} exceeds max_batch {float(hi):g}")
        if float(samples_arr) < steps * float(lo):
            raise ValueError(
                f"samples: budget {float(samples_arr):g} is below steps * min_batch = "
                f"{steps * float(lo):g}"
            )
        if hi is not None and float(samples_arr) > steps * float(hi):
            raise ValueError(
                f"samples: budget {float(samples_arr):g} exceeds steps * max_batch = "
                f"{steps * float(hi):g}"
            )
    if method == "exact" and not problem.is_quadratic:
        raise ValueError(
            f"method: 'exact' needs a quadratic problem with an exact recursion, got "
            f"{type(problem).__name__}"
        )
    rtol, atol = ex._tolerances(dtype, rtol, atol)
    solver = ex._default_solver(solver)
    parts = ex._first_order_core(problem, lr, rtol, atol, solver, steps)
    if method == "closed_form":
        return _closed_form_core(problem, parts, lr, samples_arr, lo, hi)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter: must be an int >= 1, got {max_iter!r}")
    # Array leaves: changing the iteration cap or tolerance never recompiles.
    opts = (jnp.asarray(max_iter), jnp.asarray(gtol, dtype), jnp.asarray(bool(progress)))
    if method == "gradient":
        core = functools.partial(_gradient_core, problem, parts, lr, samples_arr, lo, hi, rtol, atol,
                                 solver)
    else:
        core = functools.partial(_exact_core, problem, parts, lr, samples_arr, lo, hi)
    call = opts
    if not progress:
        return core(*call)
    from tqdm.auto import tqdm

    with tqdm(total=int(max_iter), desc=f"optimal_schedule[{method}]", unit="it") as bar:
        _PROGRESS["bar"] = bar
        try:
            return jax.block_until_ready(core(*call))
        finally:
            _PROGRESS["bar"] = None
