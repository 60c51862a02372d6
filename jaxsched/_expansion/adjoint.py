"""The dense adjoint sensitivity (docs/theory.md §4) for any problem, in step units.

One forward solve of the gradient flow (with a dense interpolant of ``x`` and the drift-correction
state ``mc``) and one backward solve of

    da/dsigma   = s H a,                                  a(K)   = grad F(x_T)
    dLam/dsigma = s (H Lam + Lam H + (1/2) D3f(x)[a]),    Lam(K) = (1/2) hess F(x_T)
    dq/dsigma   = -s tr(Lam Sigma(x)),                    q(K)   = 0

so that ``phi_k = q(k) - q(k + 1)`` is the integral of ``phi`` over step ``k`` in intrinsic time.
Cost per right-hand side: ``O(d^3)`` for ``H Lam`` plus one ``Sigma(x)``; memory ``O(d^2)`` per
checkpoint.
"""

from __future__ import annotations

import diffrax
import jax.numpy as jnp

from .._solution import RESULTS, combine, finish
from . import _common as cm
from .sensitivity import AbstractSensitivity, FirstOrderParts

__all__ = ["DenseAdjoint", "first_order_solves"]


def _step_index(jump_ts, sigma):
    return jnp.searchsorted(jump_ts, sigma, side="right")


def _flow_field(sigma, y, args):
    problem, units, jump_ts = args
    x, mc = y
    s = units.s[_step_index(jump_ts, sigma)]
    g = problem.gradient(x)
    H = problem.hessian(x)
    return (-s * g, -s * (H @ mc) - (0.5 * units.drift_factor * s * s) * (H @ g))


def _adjoint_field(sigma, y, args):
    problem, path, units, jump_ts = args
    a, Lam, _ = y
    s = units.s[_step_index(jump_ts, sigma)]
    x = path.evaluate(sigma)[0]
    H = problem.hessian(x)
    HL = H @ Lam
    dLam = s * (HL + HL.T + 0.5 * problem.third_hessian(x, a))
    return (s * (H @ a), dLam, -s * jnp.sum(Lam * problem.covariance(x)))


def first_order_solves(problem, units: cm.StepUnits, rtol, atol, solver, steps, max_steps=None,
                       throw=True) -> FirstOrderParts:
    """The forward and backward solves of the dense method (traced). The solves run with diffrax's
    ``throw=False``; a failure is in the result's ``result``, and with ``throw=True`` it also
    raises through ``eqx.error_if`` when the caller's program runs (the library's own entries pass
    ``throw=False`` and apply the throw rule on the host)."""
    x0 = problem.x0
    dtype = x0.dtype
    d = x0.shape[0]
    zero = jnp.zeros((), dtype)
    K = jnp.asarray(steps, dtype)
    itemsize = jnp.dtype(dtype).itemsize
    max_steps = cm.max_solver_steps(steps) if max_steps is None else max_steps
    jump_ts = cm.integer_times(1, steps - 1, dtype) if steps > 1 else jnp.zeros((0,), dtype)
    # With a constant step size the fields are smooth across step boundaries: no jumps to clip to.
    jumps = None if units.constant or steps == 1 else jump_ts
    fwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_flow_field),
        solver,
        t0=zero,
        t1=K,
        dt0=None,
        y0=(x0, jnp.zeros(d, dtype)),
        args=(problem, units, jump_ts),
        saveat=diffrax.SaveAt(t1=True, dense=True),
        stepsize_controller=cm.controller(rtol, atol, jump_ts=jumps),
        adjoint=cm.checkpointed(max_steps, 2 * d, itemsize),
        max_steps=max_steps,
        throw=False,
    )
    xT = fwd.ys[0][-1]
    mcT = fwd.ys[1][-1]
    gF = problem.terminal_gradient(xT)
    boundaries = cm.integer_times(steps, 0, dtype)  # K, K - 1, ..., 0
    bwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_adjoint_field),
        solver,
        t0=K,
        t1=zero,
        dt0=None,
        y0=(gF, 0.5 * problem.terminal_hessian(xT), zero),
        args=(problem, fwd, units, jump_ts),
        saveat=diffrax.SaveAt(ts=boundaries),
        # Landing exactly on every step boundary makes each phi_k accurate relative to itself,
        # not only relative to the running integral q.
        stepsize_controller=cm.controller(rtol, atol, jump_ts=jumps, step_ts=boundaries),
        adjoint=cm.checkpointed(max_steps, d * d + d + 1, itemsize),
        max_steps=max_steps,
        throw=False,
    )
    q = bwd.ys[2][::-1]  # q(0), ..., q(K)
    drift = gF @ mcT + units.lag * (gF @ problem.gradient(xT))
    phi = q[:-1] - q[1:]
    parts = FirstOrderParts(
        phi=phi,
        base_loss=problem.terminal_value(xT),
        correction=drift / units.mean_step,
        step_sizes=units.s,
        phi_stderr=jnp.zeros_like(phi),
        result=combine(RESULTS.promote(fwd.result), RESULTS.promote(bwd.result)),
        x_final=xT,
    )
    return finish(parts.result, throw, parts)


class DenseAdjoint(AbstractSensitivity):
    """The adjoint system of docs/theory.md §4 with dense ``d x d`` matrices: any problem (general
    loss, state-dependent ``Sigma``, third derivatives by autodiff, never a ``d^3`` tensor).

    Cost ``O(d^3)`` per right-hand side evaluation (``H Lam``) and a few hundred to a few thousand
    evaluations; memory ``O(d^2)`` per reverse-mode checkpoint. Practical up to ``d`` of a few
    hundred on a CPU; use :class:`jaxsched.Eigenbasis` for quadratic problems and
    :class:`jaxsched.MatrixFree` for large models.
    """

    def parts(self, problem, units, steps, rtol, atol, solver) -> FirstOrderParts:
        return first_order_solves(problem, units, rtol, atol, solver, steps, throw=False)
