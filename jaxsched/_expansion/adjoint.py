"""The dense adjoint sensitivity (docs/theory.md §4) for any problem, in step units.

One forward solve of the gradient flow (with a dense interpolant of ``x`` and the drift-correction
state ``mc``, vectors only) and one backward solve of

    da/dsigma   = s H a,                                  a(K)   = grad F(x_T)
    dLam/dsigma = s (H Lam + Lam H + (1/2) D3f(x)[a]),    Lam(K) = (1/2) hess F(x_T)
    dq/dsigma   = -s tr(Lam Sigma(x)),                    q(K)   = 0

so that ``phi_k = q(k) - q(k + 1)`` is the integral of ``phi`` over step ``k`` in intrinsic time.
The backward solve saves only the scalar ``q`` at the ``K + 1`` step boundaries
(``SaveAt(ts=..., fn=...)``), never a ``d x d`` matrix per step.

Two ways to reach the boundaries:

* **Long steps** (the default at a constant learning rate, where the fields are smooth across the
  boundaries): both solves use DOP853 (:class:`_Dop853`, 8th order with a 7th-order dense
  output) and take steps of up to ``_MAX_STEP`` schedule steps; ``q`` at a boundary comes from the
  backward solve's dense output. A schedule of 200 steps then costs about 40-50 solver steps
  instead of at least 200. Why DOP853 and not diffrax's ``Dopri8``: its interpolant is a degree-6
  polynomial, and on long steps its error (measured 2e-6 per step on the benchmark problem of
  ``experiments/bench_scaling.py`` at d = 100) is far above the step's own error; DOP853's
  interpolant brings that to 5e-9. Why the step cap: ``phi_k`` is a difference of interpolated
  ``q`` values, so an interpolation error relative to one solver step's increment of ``q`` is
  shared among the boundaries inside it; without the cap the last steps (slow modes only) grew
  to tens of schedule steps and the smallest ``phi_k`` lost accuracy (7e-7 per step, 5e-9 with the
  cap). The backward solve runs at ``rtol / 100`` (``_BACKWARD_TOL``) and the path at
  ``rtol / 100`` (``_PATH_TOL``): see the measurements there.
* **Landing on every boundary** (with an lr schedule, where the field jumps at every boundary, or
  ``DenseAdjoint(land_on_boundaries=True)``, the earlier method kept as a reference): the given
  ``solver`` (default Tsit5) stops at every boundary, where ``q`` is the step's end value.

Cost: ``O(d^3)`` per right-hand side evaluation (one product ``H Lam``; ``H Lam + Lam H`` is
formed as ``HL + HL^T``) plus one ``Sigma(x)`` and one ``D3f(x)[a]``, times 15 evaluations per
DOP853 step (tens of steps at a constant step size) or 6 per schedule step with Tsit5 landing on
every boundary; plus ``O(1)`` per boundary for the saved ``q``.

Memory: the backward state ``(a, Lam, q)``, DOP853's 16 stages and its error estimate, ``H``,
``Sigma(x)`` and a product: about 25 ``d x d`` buffers; the path's dense output, ``O(d)`` per
solver step for at most ``steps + 256`` steps (long steps); the saved values, ``K + 1`` scalars.
Measured with XLA's memory analysis (``experiments/bench_scaling.py``, 200 steps, d = 1210): see
that script's output (the landing method held about 260 ``d x d`` buffers, most of them the saved
``Lam`` at every boundary). Reverse-mode differentiation adds the checkpoints of
``_common.checkpointed`` (bounded by 256 MiB).
"""

from __future__ import annotations

from typing import Any, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._solution import RESULTS, combine, finish
from . import _common as cm
from .sensitivity import AbstractSensitivity, FirstOrderParts

__all__ = ["DenseAdjoint", "first_order_solves"]

# Longest backward step of the long-step method, in schedule steps (module docstring). Measured on
# the rotated Gaussian problem of bench_scaling (d = 100, 200 steps, lr 0.1): largest per-step
# relative error of phi 7.3e-7 without a cap, 5.0e-9 with 8, 5.0e-9 with 4 (58 steps instead of 41).
_MAX_STEP = 8.0
# Tolerance factors of the long-step method against the caller's rtol/atol. The backward solve,
# largest per-step relative error of phi at the default rtol 1e-9 against a tight reference (the
# closed form, or the landing method at rtol 1e-13): with factor 0.1, 5.1e-8 (random 8-d Gaussian of
# tests/conftest.py, lr 0.1, 60 steps), 3.6e-9 (bench_scaling's problem, d = 100), 1.4e-8 (the
# breast-cancer logistic problem of tests/test_data_problem.py, 15 steps); with 0.01: 5.2e-9, 3.0e-9,
# 8.7e-10, for about 25% more steps. The path is cheap (vectors) and is solved tighter still, so
# that its interpolant (evaluated inside the backward field) is never what limits Lam.
_BACKWARD_TOL = 0.01
_PATH_TOL = 0.01


def _step_index(jump_ts, sigma):
    return jnp.searchsorted(jump_ts, sigma, side="right")


@cm.vector_field
def _flow_field(sigma, y, args):
    problem, units, jump_ts = args
    x, mc = y
    s = units.s[_step_index(jump_ts, sigma)]
    g = problem.gradient(x)
    H = problem.hessian(x)
    return (-s * g, -s * (H @ mc) - (0.5 * units.drift_factor * s * s) * (H @ g))


@cm.vector_field
def _adjoint_field(sigma, y, args):
    problem, path, units, jump_ts = args
    a, Lam, _ = y
    s = units.s[_step_index(jump_ts, sigma)]
    x = path.evaluate(sigma)[0]
    H = problem.hessian(x)
    HL = H @ Lam
    dLam = s * (HL + HL.T + 0.5 * problem.third_hessian(x, a))
    return (s * (H @ a), dLam, -s * jnp.sum(Lam * problem.covariance(x)))


def _running_integral(sigma, y, args):
    """What the backward solve saves at a boundary: ``q`` only (XLA drops the unused rest of the
    interpolated state)."""
    return y[2]


# ------------------------------------------------------------------------------------------------
# DOP853 with its dense output


def _dop853_coefficients():
    # Hairer's DOP853 (Hairer, Norsett & Wanner, Solving Ordinary Differential Equations I, 2nd ed.,
    # §II.10): 12 stages of the 8th-order method, a 13th at the step's end (the next step's first),
    # 3 more for the 7th-order dense output. SciPy ships the published table (scipy is a dependency);
    # it is read at trace time as plain numbers.
    from scipy.integrate._ivp import dop853_coefficients as c

    return c.A, c.B, c.C, c.E3, c.E5, c.D


def _combine(weights, ks):
    """``sum_j weights[j] ks[j]`` over the nonzero weights (pytrees of arrays)."""
    pairs = [(float(w), k) for w, k in zip(weights, ks, strict=False) if w != 0.0]

    def dot(*leaves):
        return sum(w * leaf for (w, _), leaf in zip(pairs, leaves, strict=True))

    return jtu.tree_map(dot, *[k for _, k in pairs])


class _Dop853Interpolation(diffrax.AbstractLocalInterpolation):
    """DOP853's continuous extension of order 7 on one step (Hairer's ``CONTD8``)."""

    t0: Any
    t1: Any
    y0: Any
    F: tuple

    def evaluate(self, t0, t1=None, left=True):
        del left
        if t1 is not None:
            return jtu.tree_map(jnp.subtract, self.evaluate(t1), self.evaluate(t0))
        x = (t0 - self.t0) / (self.t1 - self.t0)
        out = None
        for i, f in enumerate(reversed(self.F)):  # F0 + x (F1 + (1 - x) (F2 + x (F3 + ...)))
            out = f if out is None else jtu.tree_map(jnp.add, out, f)
            w = x if i % 2 == 0 else 1 - x
            out = jtu.tree_map(lambda v, w=w: w * v, out)
        return jtu.tree_map(jnp.add, self.y0, out)


class _Dop853(diffrax.AbstractAdaptiveSolver):
    """DOP853 (Dormand & Prince's 8th-order pair as arranged by Hairer) with its 7th-order dense
    output, for ODE terms: 15 vector-field evaluations per step. The error estimate is Hairer's
    combination of the 5th- and 3rd-order embedded errors, ``e5^2 / sqrt(e5^2 + 0.01 e3^2)``
    (here per component: the scaling of each component by ``atol + rtol |y|`` cancels in the
    ratio), which behaves like the 8th-order method's own error."""

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = _Dop853Interpolation

    def order(self, terms):
        return 8

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        A, B, C, E3, E5, D = _dop853_coefficients()
        h = t1 - t0
        control = terms.contr(t0, t1)  # h, sign included (diffrax reverses time for t1 < t0)
        f = [jax.lax.cond(made_jump, lambda: terms.vf(t0, y0, args), lambda: solver_state)]
        ks = [terms.prod(f[0], control)]
        y1 = None
        for i in range(1, 16):
            if i == 12:  # the step's end, reused as the next step's first stage
                y1 = jtu.tree_map(jnp.add, y0, _combine(B, ks))
                yi = y1
            else:
                yi = jtu.tree_map(jnp.add, y0, _combine(A[i, :i], ks))
            f.append(terms.vf(t0 + float(C[i]) * h, yi, args))
            ks.append(terms.prod(f[-1], control))

        def hairer(e5, e3):
            den = jnp.sqrt(e5 * e5 + 0.01 * e3 * e3)
            return jnp.where(den > 0, e5 * jnp.abs(e5) / jnp.where(den > 0, den, 1.0), 0.0)

        y_error = jtu.tree_map(hairer, _combine(E5, ks), _combine(E3, ks))
        dy = jtu.tree_map(jnp.subtract, y1, y0)
        F1 = jtu.tree_map(jnp.subtract, ks[0], dy)
        F2 = jtu.tree_map(lambda d, k12, k0: 2 * d - (k12 + k0), dy, ks[12], ks[0])
        F = (dy, F1, F2, *(_combine(D[r], ks) for r in range(D.shape[0])))
        return y1, y_error, dict(y0=y0, F=F), f[12], diffrax.RESULTS.successful


# ------------------------------------------------------------------------------------------------
# the solves


def _path_steps(steps: int, long_steps: bool, max_steps: int) -> int:
    # The path's dense output holds its coefficients for every one of its max_steps solver steps
    # (O(d) each), allocated up front, so the long-step method caps them near what it needs:
    # measured 39-95 DOP853 steps for 15-200 schedule steps at rtol 1e-11 to 1e-13. Reaching the
    # cap is reported as max_steps_reached, never silent. Landing on every boundary keeps the
    # earlier cap (Tsit5 took 568 steps for 15 schedule steps at rtol 1e-13).
    return min(max_steps, steps + 256) if long_steps else max_steps


def first_order_solves(problem, units: cm.StepUnits, rtol, atol, solver, steps, max_steps=None,
                       throw=True, *, land_on_boundaries: bool = False) -> FirstOrderParts:
    """The forward and backward solves of the dense method (traced; module docstring).

    Args:
        problem, units, rtol, atol: as for :class:`DenseAdjoint`'s ``parts``.
        solver: the solver of both solves when they land on every step boundary (an lr schedule,
            or ``land_on_boundaries``); at a constant lr the long-step method uses DOP853.
        steps: the number of schedule steps (static).
        max_steps: solver step cap of the backward solve (default ``_common.max_solver_steps``).
        throw: with ``True`` a failure raises through ``eqx.error_if`` when the caller's program
            runs (the library's own entries pass ``False`` and apply the throw rule on the host);
            either way it is in the result's ``result``. The solves run with diffrax's
            ``throw=False``.
        land_on_boundaries: the earlier method (every boundary a solver step end) also at a
            constant lr (static).

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
    long_steps = jumps is None and not land_on_boundaries
    boundaries = cm.integer_times(steps, 0, dtype)  # K, K - 1, ..., 0
    if long_steps:
        fwd_solver = bwd_solver = _Dop853()
        fwd_ctrl = cm.controller(rtol * _PATH_TOL, atol * _PATH_TOL)
        bwd_ctrl = diffrax.PIDController(rtol=rtol * _BACKWARD_TOL, atol=atol * _BACKWARD_TOL,
                                         dtmax=_MAX_STEP)
    else:
        fwd_solver = bwd_solver = solver
        fwd_ctrl = cm.controller(rtol, atol, jump_ts=jumps)
        # Landing exactly on every step boundary makes each phi_k accurate relative to itself,
        # not only relative to the running integral q.
        bwd_ctrl = cm.controller(rtol, atol, jump_ts=jumps, step_ts=boundaries)
    fwd_steps = _path_steps(steps, long_steps, max_steps)
    fwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_flow_field),
        fwd_solver,
        t0=zero,
        t1=K,
        dt0=None,
        y0=(x0, jnp.zeros(d, dtype)),
        args=(problem, units, jump_ts),
        saveat=diffrax.SaveAt(t1=True, dense=True),
        stepsize_controller=fwd_ctrl,
        adjoint=cm.checkpointed(fwd_steps, 2 * d, itemsize),
        max_steps=fwd_steps,
        throw=False,
    )
    xT = fwd.ys[0][-1]
    mcT = fwd.ys[1][-1]
    gF = problem.terminal_gradient(xT)
    bwd = diffrax.diffeqsolve(
        diffrax.ODETerm(_adjoint_field),
        bwd_solver,
        t0=K,
        t1=zero,
        dt0=None,
        y0=(gF, 0.5 * problem.terminal_hessian(xT), zero),
        args=(problem, fwd, units, jump_ts),
        saveat=diffrax.SaveAt(ts=boundaries, fn=_running_integral),
        stepsize_controller=bwd_ctrl,
        adjoint=cm.checkpointed(max_steps, d * d + d + 1, itemsize),
        max_steps=max_steps,
        throw=False,
    )
    q = bwd.ys[::-1]  # q(0), ..., q(K)
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

    Cost ``O(d^3)`` per right-hand side evaluation (one product ``H Lam``). At a constant learning
    rate the backward solve takes long DOP853 steps (at most 8 schedule steps each; 15
    evaluations per step, about 45 steps for 200 schedule steps on the benchmark problem of
    ``experiments/bench_scaling.py``) and reads ``phi_k`` off its dense output; with an lr
    schedule (or ``land_on_boundaries=True``) the solver stops at every step boundary (Tsit5: at
    least 6 evaluations per schedule step). Memory ``O(d^2)``: about 25 ``d x d`` buffers for the
    backward state and the solver's stages, none per schedule step (module docstring), plus
    ``O(d^2)`` per reverse-mode checkpoint. Practical up to ``d`` of a few hundred on a CPU (see
    ``DENSE_MAX_DIM``); use :class:`jaxsched.Eigenbasis` for quadratic problems and
    :class:`jaxsched.MatrixFree` for large models.

    Args:
        land_on_boundaries: make every step boundary a solver step end also at a constant lr (the
            earlier method: at least one solver step per schedule step, with the ``solver`` of the
            entry functions); a reference for the long-step default, which it agrees with to
            about 1e-8 per step (``tests/test_dense_adjoint.py``).
    """

    land_on_boundaries: bool = eqx.field(static=True, default=False)

    def parts(self, problem, units, steps, rtol, atol, solver) -> FirstOrderParts:
        return first_order_solves(problem, units, rtol, atol, solver, steps, throw=False,
                                  land_on_boundaries=self.land_on_boundaries)
