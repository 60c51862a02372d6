"""Shared pieces of the expansion layer: solver settings, and the optimizer in step units.

Time in every ODE of this layer is the step index ``sigma in [0, K]`` (docs/theory.md §8, "integrate
in step units"): step ``k`` is ``[k, k + 1]``, so the jump times of a schedule are the integers, fixed,
and the learning rate enters only as a factor ``s(sigma)`` of the vector fields. That makes the
learning rate (and an lr schedule, and the momentum) ordinary array leaves: reverse-mode gradients in
them are correct, and changing them never recompiles.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax.numpy as jnp

from .._misc import as_positive_scalar
from .._optimizer import AbstractOptimizer, as_optimizer
from .._types import Array, Float, Scalar

# Memory allowed for the checkpoints of reverse-mode differentiation through diffeqsolve.
_CHECKPOINT_BYTES = 2**28


class StepUnits(eqx.Module):
    """The optimizer as the expansion sees it (docs/theory.md §7, §8).

    ``s``: the ``(steps,)`` intrinsic step sizes (``s_k = lr_k / (1 - mu)``), so intrinsic time is
    ``t_k = sum_{j<k} s_j``; ``drift_factor``: ``1 + 2 L`` multiplies the modified-equation drift
    correction (``L`` the mean gradient age, 0 for SGD); ``lag``: ``L * s_0``, the coefficient of
    ``grad F . grad f`` at ``x_T`` from the zero-initialised velocity (trace form).
    """

    s: Float[Array, " steps"]
    drift_factor: Scalar
    lag: Scalar
    constant: bool = eqx.field(static=True, default=False)  # one step size for every step

    @property
    def mean_step(self) -> Scalar:
        return jnp.mean(self.s)

    def at(self, sigma) -> Scalar:
        """``s(sigma)``: the step size of the step containing ``sigma`` (right-continuous)."""
        k = jnp.clip(jnp.floor(sigma).astype(jnp.int32), 0, self.s.shape[0] - 1)
        return self.s[k]


def step_units(optimizer: AbstractOptimizer, steps: int, dtype) -> StepUnits:
    """The :class:`StepUnits` of ``optimizer`` for a run of ``steps`` steps."""
    s = optimizer.step_sizes(steps).astype(dtype) * optimizer.time_scale.astype(dtype)
    L = optimizer.lag.astype(dtype)
    return StepUnits(s=s, drift_factor=1.0 + 2.0 * L, lag=L * s[0], constant=optimizer.constant_lr)


def resolve_optimizer(optimizer, lr, dtype) -> AbstractOptimizer:
    """``optimizer=`` / ``lr=`` (one of them) as an optimizer whose leaves have ``dtype``."""
    if optimizer is None and lr is not None:
        lr = as_positive_scalar("lr", lr).astype(dtype)
    return as_optimizer(optimizer, lr).astype(dtype)


def tolerances(dtype, rtol, atol):
    f64 = jnp.dtype(dtype) == jnp.float64
    rtol = (1e-9 if f64 else 1e-5) if rtol is None else rtol
    atol = (1e-12 if f64 else 1e-7) if atol is None else atol
    return jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype)


def max_solver_steps(steps: int) -> int:
    # Every schedule step is its own interval (jump times); a few solver steps per interval and
    # some slack for stiff problems.
    return 16 * steps + 4096


def checkpointed(max_steps: int, state_size: int, itemsize: int) -> diffrax.AbstractAdjoint:
    # One checkpoint per solver step makes reverse mode O(n) (not O(n log n)) when memory allows.
    checkpoints = int(min(max_steps, max(16, _CHECKPOINT_BYTES // max(1, state_size * itemsize))))
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)


def controller(rtol, atol, *, jump_ts=None, step_ts=None):
    pid = diffrax.PIDController(rtol=rtol, atol=atol)
    if jump_ts is None and step_ts is None:
        return pid
    return diffrax.ClipStepSizeController(pid, jump_ts=jump_ts, step_ts=step_ts)


def default_solver(solver):
    return diffrax.Tsit5() if solver is None else solver


def integer_times(start: int, stop: int, dtype) -> Array:
    """``start, start +- 1, ..., stop`` as floats: step boundaries in step units (fixed numbers)."""
    step = 1 if stop >= start else -1
    return jnp.arange(start, stop + step, step, dtype=dtype)


def vector_field(fn):
    """An ODE vector field as a jitted function (``eqx.filter_jit``; arrays traced, the rest of
    ``args`` static).

    A Runge-Kutta step calls its field once per stage (15 times for DOP853) and diffrax traces
    the step several times; a jitted field is traced once per signature and JAX reuses that
    jaxpr, and its derivatives, at every call. That is what most of the dense method's trace time
    was: ``first_order_parts`` (dense) on a 2-d non-quadratic problem, 20 steps, traces in
    1.7 s instead of 6.2 s, and its reverse-mode gradient in the learning rate in 11.7 s instead of
    42.6 s (``experiments/bench_compile.py``); XLA's compile time is about the same (it inlines
    the calls) and the values are equal to rounding.
    """
    return eqx.filter_jit(fn)
