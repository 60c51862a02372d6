"""The dense adjoint sensitivity (docs/theory.md §4) for any problem, in step units.

One forward solve of the gradient flow (with a dense interpolant of ``x`` and the drift-correction
state ``mc``, vectors only) and one backward solve of

    da/dsigma   = s H a,                                  a(K)   = grad F(x_T)
    dLam/dsigma = s (H Lam + Lam H + (1/2) D3f(x)[a]),    Lam(K) = (1/2) hess F(x_T)

with ``phi_k = s_k int_k^{k+1} tr(Lam Sigma(x)) dsigma`` (the integral of ``phi`` over step ``k``
in intrinsic time) by a Gauss-Legendre rule on every step: the backward solve saves only the scalar
``tr(Lam Sigma(x))`` at the nodes, from the solver's dense output (``SaveAt(ts=nodes, fn=...)``),
never a ``d x d`` matrix per step.

Why nodes and not a running integral ``q' = -s tr(Lam Sigma)`` saved at the step boundaries (the
earlier design): the difference ``q(k) - q(k + 1)`` is only accurate relative to ``phi_k`` when the
solver lands on every boundary, which forces at least one solver step (six ``d^3`` products with
Tsit5) per schedule step. At a constant step size the fields are smooth, so the backward solve can
take long steps (Dopri8: about 30 steps for 200 schedule steps, against 250 Tsit5 steps landing on
every boundary), and each node value is accurate relative to itself. Measured on a rotated Gaussian
problem (d = 100, 200 steps, lr 0.1): largest per-step relative error 1.3e-8 against the closed
form; ``experiments/bench_scaling.py`` prints the times.

Cost: ``O(d^3)`` per right-hand side evaluation (``H Lam``: one matrix product; ``H Lam + Lam H``
is formed as ``HL + HL^T``) plus one ``Sigma(x)``, times 12 evaluations per Dopri8 step (tens of
steps at a constant step size; with an lr schedule the solver stops at every step boundary, where
the field jumps, and Tsit5 is used: six evaluations per schedule step); plus ``O(d^2)`` per node
(``nodes * steps`` of them) for the interpolated ``Lam`` and ``Sigma(x)``.

Memory: the backward state ``(a, Lam)`` and the solver's stages, ``H``, ``Sigma(x)`` and a
product: about 20 ``d x d`` buffers with Dopri8 (13 stages); the path's dense output, ``O(d)`` per
solver step for at most ``4 steps + 512`` steps; the saved values, ``nodes * steps`` scalars.
Measured with XLA's memory analysis (``experiments/bench_scaling.py``, 200 steps): about 29 ``d x d``
float64 buffers at d = 1210 in all (263 before this design). Reverse-mode differentiation adds
the checkpoints of ``_common.checkpointed`` (bounded by 256 MiB).
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np

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
    a, Lam = y
    s = units.s[_step_index(jump_ts, sigma)]
    x = path.evaluate(sigma)[0]
    H = problem.hessian(x)
    HL = H @ Lam
    dLam = s * (HL + HL.T + 0.5 * problem.third_hessian(x, a))
    return (s * (H @ a), dLam)


def _node_value(sigma, y, args):
    """``tr(Lam(sigma) Sigma(x(sigma)))``: the one scalar saved per quadrature node."""
    problem, path, _, _ = args
    return jnp.sum(y[1] * problem.covariance(path.evaluate(sigma)[0]))


def _gauss_nodes(steps: int, nodes: int, dtype):
    """Node times of a ``nodes``-point Gauss-Legendre rule on every step ``[k, k + 1]``, in the
    order of the backward solve (decreasing), and the rule's weights on ``[0, 1]``."""
    xi, w = np.polynomial.legendre.leggauss(nodes)
    times = (np.arange(steps)[:, None] + (1.0 + xi[None, :]) / 2.0).reshape(-1)[::-1]
    return jnp.asarray(times.copy(), dtype), jnp.asarray(w / 2.0, dtype)


def _backward_solver(solver, constant: bool):
    if solver is not None:
        return solver
    # Long steps pay off only where the field is smooth; with an lr schedule every step boundary
    # is a jump the solver stops at, and a cheaper method per step wins.
    return diffrax.Dopri8() if constant else diffrax.Tsit5()


def first_order_solves(problem, units: cm.StepUnits, rtol, atol, solver, steps, max_steps=None,
                       throw=True, *, nodes: int = 4, backward_solver=None) -> FirstOrderParts:
    """The forward and backward solves of the dense method (traced; module docstring).

    Args:
        problem, units, rtol, atol: as for :class:`DenseAdjoint`'s ``parts``.
        solver: the forward solver (default ``Tsit5`` via the entry functions).
        steps: the number of schedule steps (static).
        max_steps: solver step cap of each solve (default ``_common.max_solver_steps``).
        throw: with ``True`` a failure raises through ``eqx.error_if`` when the caller's program
            runs (the library's own entries pass ``False`` and apply the throw rule on the host);
            either way it is in the result's ``result``. The solves run with diffrax's
            ``throw=False``.
        nodes: Gauss-Legendre nodes per step (static).
        backward_solver: the backward solver (default: Dopri8 at a constant step size, else Tsit5).

    Returns:
        :class:`FirstOrderParts`.
    """
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
    # The path's dense output holds its coefficients for every one of max_steps solver steps (O(d)
    # each), allocated up front: a cap of 4 steps per schedule step (plus 512) keeps that at about
    # 8 d x d buffers at d = 1210, 200 steps (measured: Tsit5 takes under 2 per step at rtol 1e-11;
    # reaching the cap is reported as max_steps_reached, never silent).
    fwd_steps = min(max_steps, 4 * steps + 512)
    fwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_flow_field),
        solver,
        t0=zero,
        t1=K,
        dt0=None,
        y0=(x0, jnp.zeros(d, dtype)),
        args=(problem, units, jump_ts),
        saveat=diffrax.SaveAt(t1=True, dense=True),
        # The path is cheap (vectors): solved more tightly than the backward system, so that its
        # interpolant is not what limits the accuracy of Lam.
        stepsize_controller=cm.controller(rtol * 1e-2, atol * 1e-2, jump_ts=jumps),
        adjoint=cm.checkpointed(fwd_steps, 2 * d, itemsize),
        max_steps=fwd_steps,
        throw=False,
    )
    xT = fwd.ys[0][-1]
    mcT = fwd.ys[1][-1]
    gF = problem.terminal_gradient(xT)
    times, weights = _gauss_nodes(steps, nodes, dtype)
    bwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_adjoint_field),
        _backward_solver(backward_solver, units.constant),
        t0=K,
        t1=zero,
        dt0=None,
        y0=(gF, 0.5 * problem.terminal_hessian(xT)),
        args=(problem, fwd, units, jump_ts),
        saveat=diffrax.SaveAt(ts=times, fn=_node_value),
        stepsize_controller=cm.controller(rtol, atol, jump_ts=jumps),
        adjoint=cm.checkpointed(max_steps, d * d + d, itemsize),
        max_steps=max_steps,
        throw=False,
    )
    values = bwd.ys[::-1].reshape(steps, nodes)  # node values, step 0 first
    phi = units.s * (values @ weights)
    drift = gF @ mcT + units.lag * (gF @ problem.gradient(xT))
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


def _check_nodes(nodes) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) or not 1 <= nodes <= 32:
        raise ValueError(f"nodes: must be a Python int in [1, 32], got {nodes!r}")
    return int(nodes)


class DenseAdjoint(AbstractSensitivity):
    """The adjoint system of docs/theory.md §4 with dense ``d x d`` matrices: any problem (general
    loss, state-dependent ``Sigma``, third derivatives by autodiff, never a ``d^3`` tensor).

    Cost ``O(d^3)`` per right-hand side evaluation (one product ``H Lam``): about 12 times the
    number of Dopri8 steps (tens at a constant learning rate, fewer than the schedule's steps),
    or 6 per schedule step with an lr schedule (Tsit5 stopping at every step boundary); plus
    ``O(d^2)`` per quadrature node. Memory: about 20 ``d x d`` buffers (the backward state and
    the solver's stages), none per schedule step (module docstring). Practical up to ``d`` of a
    few hundred on a CPU (see ``DENSE_MAX_DIM``); use :class:`jaxsched.Eigenbasis` for quadratic
    problems and :class:`jaxsched.MatrixFree` for large models.

    Args:
        nodes: Gauss-Legendre nodes per step (Python int, default 4). ``phi`` is smooth on a step
            with rates at most ``2 s lambda_max``; the rule's relative error is about
            ``6e-10 (2 s lambda_max)^8`` for 4 nodes (below 1e-9 for ``s lambda_max <= 0.5``);
            use 8 near the stability limit ``s lambda_max -> 2``.
        backward_solver: a diffrax solver for the backward system (default: ``Dopri8`` at a
            constant step size, ``Tsit5`` with an lr schedule). The ``solver=`` of the entry
            functions is the forward solver.
    """

    nodes: int = eqx.field(static=True, default=4)
    backward_solver: diffrax.AbstractSolver | None = None

    def __post_init__(self):
        _check_nodes(self.nodes)

    def parts(self, problem, units, steps, rtol, atol, solver) -> FirstOrderParts:
        return first_order_solves(problem, units, rtol, atol, solver, steps, throw=False,
                                  nodes=self.nodes, backward_solver=self.backward_solver)
