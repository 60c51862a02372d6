"""The forward moment system of the O(h) expansion (docs/theory.md §3, §7, §8), with diffrax.

``expansion`` / ``expected_loss`` integrate ``x, P, m, mc`` in step units (``_common``): with the
intrinsic step size ``s(sigma)`` of step ``k = floor(sigma)`` and the noise weight ``u_k = w(b_k)``,

    dx/dsigma  = -s grad f(x)
    dP/dsigma  = -s (H P + P H) + s^2 u Sigma(x)
    dm/dsigma  = -s (H m + (1/2) D3f(x)[P])
    dmc/dsigma = -s H mc - (1/2) (1 + 2L) s^2 H grad f(x)

from ``x0, 0, 0, 0``; ``P, m, mc`` here carry the factor ``h`` of theory 3, so the prediction is
``F(x_T) + grad F . (m_T + mc_T) + tr(hess F P_T) / 2 + L s_0 grad F . grad f`` with no further
scaling. For plain SGD at a constant rate this is ``F(x_T) + h J1`` exactly as in §3.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp

from .._misc import as_batch_sizes
from .._problem.base import check_problem
from .._solution import RESULTS, finish
from .._types import Array, Int, Matrix, Scalar, Vector
from . import _common as cm

__all__ = ["Expansion", "expansion", "expected_loss"]


class Expansion(eqx.Module):
    """The predicted expected terminal loss and its parts (docs/theory.md §3).

    ``predicted_loss = base_loss + lr * j1`` and ``j1 = j1_noise + j1_correction``, where ``lr`` is
    the mean intrinsic step size (the learning rate for plain SGD at a constant rate);
    ``j1_noise = (grad F . m_T + tr(hess F P_T) / 2) / lr`` depends on the schedule,
    ``j1_correction`` (modified-equation drift and, with momentum, the velocity's lag) does not.
    ``P_final, m_final, mc_final`` are the moments of theory 3 (without the factor ``lr``).
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
    result: RESULTS


@cm.vector_field
def _moment_field(sigma, y, args):
    problem, u, units, jump_ts = args
    x, P, m, mc = y
    # jump_ts are exactly the times the controller clips to; searchsorted on the same floats puts
    # a time just after a boundary in the next step.
    k = jnp.searchsorted(jump_ts, sigma, side="right")
    s = units.s[k]
    g = problem.gradient(x)
    H = problem.hessian(x)
    HP = H @ P
    dP = -s * (HP + HP.T) + (s * s * u[k]) * problem.covariance(x)
    dm = -s * (H @ m + 0.5 * problem.third_contraction(x, P))
    dmc = -s * (H @ mc) - (0.5 * units.drift_factor * s * s) * (H @ g)
    return (-s * g, dP, dm, dmc)


def _expansion_core(problem, batch_sizes, units, rtol, atol, solver, throw=False) -> Expansion:
    """The compiled moment solve, then the throw rule (on the host when the values are
    concrete); callable inside a caller's trace with ``throw=False``."""
    out = _expansion_solve(problem, batch_sizes, units, rtol, atol, solver)
    return finish(out.result, throw, out)


@eqx.filter_jit
def _expansion_solve(problem, batch_sizes, units, rtol, atol, solver) -> Expansion:
    """One compiled program per problem structure and ``steps`` (no host callback: diffrax runs
    with ``throw=False`` and the outcome is the returned ``result``, ``invalid_value`` for
    non-positive or non-finite step sizes or batch sizes)."""
    steps = batch_sizes.shape[0]
    x0 = problem.x0
    dtype = x0.dtype
    d = x0.shape[0]
    jump_ts = cm.integer_times(1, steps - 1, dtype) if steps > 1 else jnp.zeros((0,), dtype)
    u = problem.noise_weight(batch_sizes.astype(dtype))
    y0 = (x0, jnp.zeros((d, d), dtype), jnp.zeros(d, dtype), jnp.zeros(d, dtype))
    max_steps = cm.max_solver_steps(steps)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_moment_field),
        solver,
        t0=jnp.zeros((), dtype),
        t1=jnp.asarray(steps, dtype),
        dt0=None,
        y0=y0,
        args=(problem, u, units, jump_ts),
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=cm.controller(rtol, atol, jump_ts=jump_ts if steps > 1 else None),
        adjoint=cm.checkpointed(max_steps, d * d + 3 * d, jnp.dtype(dtype).itemsize),
        max_steps=max_steps,
        throw=False,
    )
    xT, PT, mT, mcT = (leaf[-1] for leaf in sol.ys)
    invalid = (~jnp.all(jnp.isfinite(units.s) & (units.s > 0))
               | ~jnp.all(jnp.isfinite(batch_sizes) & (batch_sizes > 0)))
    gF = problem.terminal_gradient(xT)
    HF = problem.terminal_hessian(xT)
    h = units.mean_step
    noise = gF @ mT + 0.5 * jnp.sum(HF * PT)
    corr = gF @ mcT + units.lag * (gF @ problem.gradient(xT))
    base = problem.terminal_value(xT)
    return Expansion(
        predicted_loss=base + noise + corr,
        base_loss=base,
        j1=(noise + corr) / h,
        j1_noise=noise / h,
        j1_correction=corr / h,
        x_final=xT,
        P_final=PT / h,
        m_final=mT / h,
        mc_final=mcT / h,
        num_steps=sol.stats["num_steps"],
        result=RESULTS.where(invalid, RESULTS.invalid_value, RESULTS.promote(sol.result)),
    )


def expansion(problem, batch_sizes, *, lr=None, optimizer=None, rtol=None, atol=None, solver=None,
              throw: bool = True) -> Expansion:
    """Integrate the moment system of docs/theory.md §3 (§7 momentum, §8 lr schedules) for a
    piecewise-constant batch schedule.

    Args:
        problem: a jaxsched problem.
        batch_sizes: ``(steps,)`` batch sizes ``b_k`` (real values allowed: the expansion is
            differentiable in them).
        lr: learning rate ``h > 0`` of plain SGD (the horizon is ``T = steps * h``); or give
            ``optimizer`` instead.
        optimizer: a :class:`jaxsched.SGD` (momentum, Nesterov, a per-step lr schedule).
        rtol, atol: tolerances of the adaptive step controller (defaults 1e-9/1e-12 in float64,
            1e-5/1e-7 in float32); array leaves, so changing them does not recompile.
        solver: a diffrax ODE solver (default ``Tsit5``).
        throw: raise when the solve fails (default; a :class:`jaxsched.SolveError` after the
            call, or an ``EquinoxRuntimeError`` when this call is traced by the caller's own
            ``jit``/``vmap``); with ``throw=False`` the failure is in ``result`` (a
            :class:`jaxsched.RESULTS` code) instead. Either way the same program is compiled.

    Returns:
        An :class:`Expansion` with ``predicted_loss = F(x_T) + h J1`` and its parts; differentiable
        in the batch sizes, the learning rate(s), the momentum and the problem's leaves.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, bad ``batch_sizes`` or a non-problem.
    """
    if getattr(optimizer, "is_adaptive", False):  # Adam / RMSprop: the moment model of §9
        from .adaptive import adaptive_expansion

        return adaptive_expansion(problem, batch_sizes, lr=lr, optimizer=optimizer, rtol=rtol,
                                  atol=atol, solver=solver, throw=throw)
    check_problem(problem)
    b = as_batch_sizes(batch_sizes)
    dtype = problem.x0.dtype
    units = cm.step_units(cm.resolve_optimizer(optimizer, lr, dtype), b.shape[0], dtype)
    rtol, atol = cm.tolerances(dtype, rtol, atol)
    return _expansion_core(problem, b, units, rtol, atol, cm.default_solver(solver), throw)


def expected_loss(problem, batch_sizes, *, lr=None, optimizer=None, rtol=None, atol=None, solver=None,
                  throw: bool = True) -> Scalar:
    """Predicted ``E F(x_K) = F(x_T) + h J1`` (docs/theory.md §3) for batch sizes ``b_k``; see
    :func:`expansion` for the arguments."""
    return expansion(problem, batch_sizes, lr=lr, optimizer=optimizer, rtol=rtol, atol=atol,
                     solver=solver, throw=throw).predicted_loss
