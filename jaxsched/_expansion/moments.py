"""The O(h) perturbation expansion (theory 3) and the sensitivity phi (theory 4), with diffrax.

Two independent routes are implemented, and the tests check one against the other:

- ``expansion`` / ``expected_loss`` integrate the forward moment system ``x, P, m, mc`` with the
  schedule's step boundaries passed as jump times, and return ``F(x_T) + h J1``;
- ``sensitivity`` integrates the adjoint system ``a, Lam`` backward along the gradient-flow path and
  returns the per-step integrals ``phi_k`` of ``phi(t) = tr(Lam(t) Sigma(x(t)))``.

Because ``J1`` is affine in ``u = 1/b``: ``J1 = correction + sum_k phi_k w(b_k)`` where ``w`` is the
problem's noise weight (``1/b`` with replacement).
"""

from __future__ import annotations

import collections

import diffrax
import equinox as eqx
import jax.numpy as jnp

from .._misc import as_batch_sizes, as_positive_scalar, check_steps
from .._problem.base import check_problem
from .._types import Array, Float, Int, Matrix, Scalar, StepArray, Vector

__all__ = ["Expansion", "FirstOrderParts", "expansion", "expected_loss", "sensitivity",
           "first_order_parts"]

#: Number of times each jitted core has been traced; tests use it to prove nothing recompiles.
TRACE_COUNTS: collections.Counter = collections.Counter()

# Memory allowed for the checkpoints of reverse-mode differentiation through diffeqsolve.
_CHECKPOINT_BYTES = 2**28


class Expansion(eqx.Module):
    """The predicted expected terminal loss and its parts (theory 3).

    ``predicted_loss = base_loss + lr * j1`` and ``j1 = j1_noise + j1_correction`` where
    ``j1_noise = grad F . m_T + tr(hess F P_T) / 2`` depends on the schedule and
    ``j1_correction = grad F . mc_T`` (modified-equation drift correction) does not.
    """

    predicted_loss: Scalar
    base_loss: Scalar
    j1: Scalar
    j1_noise: Scalar
    j1_correction: Scalar
    x_final: Vector
    P_final: Matrix
    m_final: Vector
    mc_final: Vector
    num_steps: Int[Array, ""]


class FirstOrderParts(eqx.Module):
    """Everything the first-order objective needs, independent of the schedule:
    ``E F(x_K) ~ base_loss + lr * (correction + sum_k phi_k w(b_k))``."""

    phi: StepArray
    base_loss: Scalar
    correction: Scalar
    x_final: Vector


# ------------------------------------------------------------------------------------------------
# validation helpers shared by the public entry points


def _tolerances(dtype, rtol, atol):
    f64 = jnp.dtype(dtype) == jnp.float64
    rtol = (1e-9 if f64 else 1e-5) if rtol is None else rtol
    atol = (1e-12 if f64 else 1e-7) if atol is None else atol
    return jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype)


def _max_steps(steps: int) -> int:
    # Every schedule step is its own interval (jump times); a few solver steps per interval and
    # some slack for stiff problems.
    return 16 * steps + 4096


def _adjoint(max_steps: int, state_size: int, itemsize: int) -> diffrax.AbstractAdjoint:
    # One checkpoint per solver step makes reverse mode O(n) (not O(n log n)) when memory allows.
    checkpoints = int(min(max_steps, max(16, _CHECKPOINT_BYTES // max(1, state_size * itemsize))))
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)


def _controller(rtol, atol, jump_ts):
    pid = diffrax.PIDController(rtol=rtol, atol=atol)
    if jump_ts is None:
        return pid
    return diffrax.ClipStepSizeController(pid, jump_ts=jump_ts)


# ------------------------------------------------------------------------------------------------
# forward moment system (theory 3)


def _moment_field(t, y, args):
    problem, u, jump_ts = args
    x, P, m, mc = y
    # jump_ts are exactly the times the controller clips to; searchsorted on the same floats puts
    # t just after a boundary in the next step, whatever the rounding of k * h.
    k = jnp.searchsorted(jump_ts, t, side="right")
    g = problem.gradient(x)
    H = problem.hessian(x)
    HP = H @ P
    dP = -(HP + HP.T) + u[k] * problem.covariance(x)
    dm = -H @ m - 0.5 * problem.third_contraction(x, P)
    dmc = -H @ mc - 0.5 * H @ g
    return (-g, dP, dm, dmc)


@eqx.filter_jit
def _expansion_core(problem, batch_sizes, lr, rtol, atol, solver):
    TRACE_COUNTS["expansion"] += 1
    steps = batch_sizes.shape[0]
    x0 = problem.x0
    dtype = x0.dtype
    d = x0.shape[0]
    T = lr * steps
    jump_ts = lr * jnp.arange(1, steps, dtype=dtype)
    u = problem.noise_weight(batch_sizes.astype(dtype))
    y0 = (x0, jnp.zeros((d, d), dtype), jnp.zeros(d, dtype), jnp.zeros(d, dtype))
    max_steps = _max_steps(steps)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_moment_field),
        solver,
        t0=jnp.zeros((), dtype),
        t1=T,
        dt0=None,
        y0=y0,
        args=(problem, u, jump_ts),
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=_controller(rtol, atol, jump_ts if steps > 1 else None),
        adjoint=_adjoint(max_steps, d * d + 3 * d, jnp.dtype(dtype).itemsize),
        max_steps=max_steps,
    )
    xT, PT, mT, mcT = (leaf[-1] for leaf in sol.ys)
    gF = problem.terminal_gradient(xT)
    HF = problem.terminal_hessian(xT)
    j1_noise = gF @ mT + 0.5 * jnp.sum(HF * PT)
    j1_corr = gF @ mcT
    j1 = j1_noise + j1_corr
    base = problem.terminal_value(xT)
    return Expansion(
        predicted_loss=base + lr * j1,
        base_loss=base,
        j1=j1,
        j1_noise=j1_noise,
        j1_correction=j1_corr,
        x_final=xT,
        P_final=PT,
        m_final=mT,
        mc_final=mcT,
        num_steps=sol.stats["num_steps"],
    )


def _default_solver(solver):
    return diffrax.Tsit5() if solver is None else solver


def expansion(problem, batch_sizes, *, lr, rtol=None, atol=None, solver=None) -> Expansion:
    """Integrate the moment system of theory 3 for a piecewise-constant schedule.

    Args:
        problem: a jaxsched problem.
        batch_sizes: ``(steps,)`` batch sizes ``b_k`` (real values allowed: the expansion is
            differentiable in them).
        lr: learning rate ``h > 0``; the horizon is ``T = steps * h``.
        rtol, atol: tolerances of the adaptive step controller (defaults 1e-9/1e-12 in float64,
            1e-5/1e-7 in float32); array leaves, so changing them does not recompile.
        solver: a diffrax ODE solver (default ``Tsit5``).

    Returns:
        An :class:`Expansion` with ``predicted_loss = F(x_T) + h J1`` and its parts.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, bad ``batch_sizes`` or a non-problem.
    """
    check_problem(problem)
    b = as_batch_sizes(batch_sizes)
    lr = as_positive_scalar("lr", lr).astype(problem.x0.dtype)
    rtol, atol = _tolerances(problem.x0.dtype, rtol, atol)
    return _expansion_core(problem, b, lr, rtol, atol, _default_solver(solver))


def expected_loss(problem, batch_sizes, *, lr, rtol=None, atol=None, solver=None) -> Scalar:
    """Predicted ``E F(x_K) = F(x_T) + h J1`` (theory 3) for batch sizes ``b_k`` and learning rate
    ``h``; see :func:`expansion` for the arguments."""
    return expansion(problem, batch_sizes, lr=lr, rtol=rtol, atol=atol, solver=solver).predicted_loss


# ------------------------------------------------------------------------------------------------
# adjoint system (theory 4)


def _flow_field(t, y, args):
    problem = args
    x, mc = y
    g = problem.gradient(x)
    H = problem.hessian(x)
    return (-g, -H @ mc - 0.5 * H @ g)


def _adjoint_field(t, y, args):
    problem, path = args
    a, Lam, _ = y
    x = path.evaluate(t)[0]
    H = problem.hessian(x)
    HL = H @ Lam
    dLam = HL + HL.T + 0.5 * problem.third_hessian(x, a)
    phi = jnp.sum(Lam * problem.covariance(x))
    # q(t) = int_t^T phi(s) ds, so dq/dt = -phi
    return (H @ a, dLam, -phi)


def first_order_solves(problem, lr, rtol, atol, solver, steps, max_steps=None, throw=True):
    """The forward gradient flow (dense interpolant, with the drift-correction state ``mc``) and the
    backward adjoint ``a, Lam, q`` of theory 4. Cost per right-hand side: ``O(d^3)`` for ``H Lam``
    plus one ``Sigma(x)``. Returns the parts and diffrax's result code (the first failure of the two
    solves); with ``throw=True`` a failure raises instead."""
    x0 = problem.x0
    dtype = x0.dtype
    d = x0.shape[0]
    T = lr * steps
    zero = jnp.zeros((), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    max_steps = _max_steps(steps) if max_steps is None else max_steps
    fwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_flow_field),
        solver,
        t0=zero,
        t1=T,
        dt0=None,
        y0=(x0, jnp.zeros(d, dtype)),
        args=problem,
        saveat=diffrax.SaveAt(t1=True, dense=True),
        stepsize_controller=_controller(rtol, atol, None),
        adjoint=_adjoint(max_steps, 2 * d, itemsize),
        max_steps=max_steps,
        throw=throw,
    )
    xT = fwd.ys[0][-1]
    mcT = fwd.ys[1][-1]
    gF = problem.terminal_gradient(xT)
    boundaries = lr * jnp.arange(steps, -1, -1, dtype=dtype)  # T, T - h, ..., 0
    bwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_adjoint_field),
        solver,
        t0=T,
        t1=zero,
        dt0=None,
        y0=(gF, 0.5 * problem.terminal_hessian(xT), zero),
        args=(problem, fwd),
        saveat=diffrax.SaveAt(ts=boundaries),
        # Landing exactly on every step boundary makes each phi_k accurate relative to itself,
        # not only relative to the running integral q.
        stepsize_controller=diffrax.ClipStepSizeController(
            diffrax.PIDController(rtol=rtol, atol=atol), step_ts=boundaries
        ),
        adjoint=_adjoint(max_steps, d * d + d + 1, itemsize),
        max_steps=max_steps,
        throw=throw,
    )
    q = bwd.ys[2][::-1]  # q(t_0), ..., q(t_K)
    parts = FirstOrderParts(
        phi=q[:-1] - q[1:],
        base_loss=problem.terminal_value(xT),
        correction=gF @ mcT,
        x_final=xT,
    )
    ok = diffrax.RESULTS.successful._value
    f_code, b_code = fwd.result._value, bwd.result._value
    return parts, jnp.where(f_code != ok, f_code, b_code)


@eqx.filter_jit
def _first_order_core(problem, lr, rtol, atol, solver, steps):
    TRACE_COUNTS["sensitivity"] += 1
    return first_order_solves(problem, lr, rtol, atol, solver, steps)[0]


def first_order_parts(problem, *, lr, steps, rtol=None, atol=None, solver=None) -> FirstOrderParts:
    """The schedule-independent parts of the first-order prediction: ``phi_k`` (theory 4), ``F(x_T)``
    and the drift-correction term, from one forward and one backward (adjoint) solve.

    For any schedule, ``E F(x_K) ~ base_loss + lr * (correction + sum_k phi_k w(b_k))``.
    """
    check_problem(problem)
    steps = check_steps(steps)
    lr = as_positive_scalar("lr", lr).astype(problem.x0.dtype)
    rtol, atol = _tolerances(problem.x0.dtype, rtol, atol)
    return _first_order_core(problem, lr, rtol, atol, _default_solver(solver), steps)


def sensitivity(problem, *, lr, steps, rtol=None, atol=None, solver=None) -> StepArray:
    """Per-step sensitivities ``phi_k = int_{kh}^{(k+1)h} tr(Lam(t) Sigma(x(t))) dt`` (theory 4).

    Computed by the adjoint system: ``a' = H a``, ``Lam' = H Lam + Lam H + D3f(x)[a] / 2`` backward
    from ``a(T) = grad F(x_T)``, ``Lam(T) = hess F(x_T) / 2`` along the gradient-flow path (a dense
    forward solve). ``phi_k`` is the functional derivative of ``J1`` with respect to ``u_k = 1/b_k``.

    Args:
        problem: a jaxsched problem.
        lr: learning rate ``h > 0``.
        steps: number of SGD steps ``K`` (a Python int: it fixes the output shape).
        rtol, atol, solver: as in :func:`expansion`.

    Returns:
        ``(steps,)`` array ``phi_k``.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, ``steps <= 0`` or a non-problem.
    """
    return first_order_parts(problem, lr=lr, steps=steps, rtol=rtol, atol=atol, solver=solver).phi


def predicted_loss_from_parts(problem, parts: FirstOrderParts, batch_sizes, lr) -> Scalar:
    """``base + h (correction + sum_k phi_k w(b_k))``: the expansion's prediction via the identity
    that ``J1`` is affine in the noise weights."""
    w = problem.noise_weight(jnp.asarray(batch_sizes, parts.phi.dtype))
    return parts.base_loss + lr * (parts.correction + jnp.sum(parts.phi * w))


def noise_objective(problem, phi: Float[Array, " steps"], batch_sizes) -> Scalar:
    """``sum_k phi_k w(b_k)``: the schedule-dependent part of ``J1``."""
    return jnp.sum(phi * problem.noise_weight(jnp.asarray(batch_sizes, phi.dtype)))
