"""Baseline schedule families (constant, linear ramp, step doubling), integer rounding to an exact
budget, and the step -> batch-size callable (``schedule_fn``).

Every schedule here meets its sample budget ``sum_k b_k = samples`` exactly, within
``min_batch <= b_k <= max_batch``. The jitted functions take ``steps`` as a static Python int (it
is a shape) and everything else as array leaves, so sweeping ``samples``, the bounds or a family
parameter never recompiles.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._control.allocation import (
    _check_budget,
    _check_scalar,
    _check_steps_array,
    _guard_feasible,
    _is_tracer,
    _scale_clip,
)
from .._types import Array, ArrayLike, Float, Int, ScalarLike
from .batch_schedule import BatchSchedule

__all__ = [
    "constant_schedule",
    "linear_ramp",
    "round_to_budget",
    "schedule_fn",
    "step_doubling",
]


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: must be a Python int >= 1 (it is a shape), got {steps!r}")
    return int(steps)


# --------------------------------------------------------------------------------------------
# rounding to an exact integer budget
# --------------------------------------------------------------------------------------------
def _round_core(beta, samples, lo, hi):
    """Traced body of ``round_to_budget`` (integer ``samples``, ``lo``, ``hi``)."""
    steps = beta.shape[0]
    fdtype = jnp.result_type(beta.dtype, float)
    hi = jnp.minimum(hi, samples - (steps - 1) * lo)  # implied by the budget; keeps it finite
    n_f, lo_f, hi_f = (x.astype(fdtype) for x in (samples, lo, hi))
    w = jnp.maximum(beta.astype(fdtype), 0.0)
    target = _scale_clip(w, n_f, lo_f, hi_f)
    # Zero weights stay at lo unless the positive steps are all at hi: then spread the excess.
    zero = w == 0
    n_zero = jnp.sum(zero)
    excess = jnp.maximum(n_f - (steps - n_zero) * hi_f - n_zero * lo_f, 0.0)
    target = target + jnp.where(zero, excess / jnp.maximum(n_zero, 1), 0.0)
    target = jnp.clip(target, lo_f, hi_f)

    b = jnp.clip(jnp.floor(target).astype(lo.dtype), lo, hi)
    left = samples - jnp.sum(b)
    frac = jnp.where(b < hi, target - b, -jnp.inf)
    # Largest remainders first; exact ties go to later steps (schedules usually grow).
    order = steps - 1 - jnp.argsort(-frac[::-1], stable=True)
    rank = jnp.zeros(steps, lo.dtype).at[order].set(jnp.arange(steps, dtype=lo.dtype))
    b = b + (rank < left).astype(b.dtype)

    # Safety net for rounding pathologies (never triggers in exact arithmetic): move single
    # samples towards the target until the budget is exact.
    def move(b):
        gap = samples - jnp.sum(b)
        err = target - b
        up = b.shape[0] - 1 - jnp.argmax(jnp.where(b < hi, err, -jnp.inf)[::-1])
        down = jnp.argmin(jnp.where(b > lo, err, jnp.inf))
        b = b.at[up].add((gap > 0).astype(b.dtype))
        return b.at[down].add(-(gap < 0).astype(b.dtype))

    return lax.while_loop(lambda b: jnp.sum(b) != samples, move, b)


# One compiled program per number of steps (and dtypes), shared by round_to_budget and every
# baseline family: the families build their real-valued shape on the host (NumPy) when their
# parameter is concrete, so `jaxsched optimize` compiles one rounding program, not one per family.
_round_jit = eqx.filter_jit(_round_core)


def _rounded(beta, n, lo, hi):
    """``round_to_budget``'s program, with the budget rule guarded when the budget is traced by
    the caller (concrete budgets were refused on the host already)."""
    return _guard_feasible(_round_jit(beta, n, lo, hi), n, lo, hi)


def _int_budget(steps, samples, min_batch, max_batch):
    n, lo, hi = _check_budget(steps, samples, min_batch, max_batch, integer=True)
    dtype = jnp.result_type(n.dtype, lo.dtype, hi.dtype)
    return n.astype(dtype), lo.astype(dtype), hi.astype(dtype)


def round_to_budget(
    beta: Float[ArrayLike, " steps"],
    samples: ScalarLike,
    *,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
) -> Int[Array, " steps"]:
    """Integer batch sizes close to ``beta`` with ``sum == samples`` exactly, within bounds.

    ``beta`` is first rescaled and clipped into the bounds, ``t_k = clip(s beta_k, lo, hi)`` with
    ``s`` chosen so that ``sum t = samples`` (the same exact solve as the square-root rule; a
    feasible ``beta`` is returned unchanged), then floored, and the remaining samples go to the
    largest fractional parts among steps below ``max_batch`` (largest-remainder rounding). Entries
    ``beta_k <= 0`` are treated as 0 (they get ``min_batch`` unless the budget forces more).

    Args:
        beta: target real batch sizes, shape ``(steps,)``.
        samples: the integer budget.
        min_batch: integer lower bound ``>= 1``.
        max_batch: integer upper bound or ``None``.

    Returns:
        Integer batch sizes, shape ``(steps,)``.

    Raises:
        ValueError: ``beta`` not 1-D or not finite, or an infeasible budget (see
            ``integer_optimum``).
    """
    beta = _check_steps_array("beta", beta)
    n, lo, hi = _int_budget(beta.shape[0], samples, min_batch, max_batch)
    return _rounded(beta, n, lo, hi)


# --------------------------------------------------------------------------------------------
# baseline families
# --------------------------------------------------------------------------------------------
def _shape(xp, steps: int, family: str, param):
    """The real-valued shape of a baseline family before rounding, with NumPy (``xp=np``, on the
    host: no compiled program) or ``jax.numpy`` (a traced parameter)."""
    dtype = jnp.result_type(float)
    if family == "constant":
        return xp.ones(steps, dtype)
    if family == "ramp":
        t = xp.linspace(0.0, 1.0, steps, dtype=dtype) if steps > 1 else xp.zeros(1, dtype)
        return 1.0 + (param - 1.0) * t
    stage = (xp.arange(steps) * param) // steps
    return xp.exp2(stage.astype(dtype))


def _family(steps: int, family: str, param, budget):
    xp = jnp if _is_tracer(param) else np
    value = param if xp is jnp else (None if param is None else np.asarray(param))
    beta = jnp.asarray(_shape(xp, steps, family, value))
    return _rounded(beta, *budget)


def constant_schedule(
    steps: int,
    samples: ScalarLike,
    *,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
) -> Int[Array, " steps"]:
    """The constant schedule ``b_k = samples / steps``, rounded to integers with the exact budget
    (when ``steps`` does not divide ``samples`` the last ``samples mod steps`` steps get one more).

    Raises:
        ValueError: ``steps`` not a positive int, or an infeasible budget.
    """
    steps = _check_steps(steps)
    return _family(steps, "constant", None, _int_budget(steps, samples, min_batch, max_batch))


def linear_ramp(
    steps: int,
    samples: ScalarLike,
    *,
    ratio: ScalarLike = 8.0,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
) -> Int[Array, " steps"]:
    """A linearly growing schedule with ``b_last / b_first = ratio`` (before rounding and
    clipping into the bounds), integer with the exact budget (``round_to_budget``).

    Args:
        steps: number of steps (static).
        samples: integer budget.
        ratio: last-to-first ratio, ``> 0`` (``< 1`` gives a decreasing ramp); an array leaf.
        min_batch, max_batch: integer bounds.

    Raises:
        ValueError: ``ratio <= 0``, ``steps`` not a positive int, or an infeasible budget.
    """
    steps = _check_steps(steps)
    r = _check_scalar("ratio", ratio, integer=False)
    if not _is_tracer(r) and float(r) <= 0:
        raise ValueError(f"ratio: must be > 0, got {float(r):g}")
    return _family(steps, "ramp", r, _int_budget(steps, samples, min_batch, max_batch))


def step_doubling(
    steps: int,
    samples: ScalarLike,
    *,
    stages: ScalarLike = 4,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
) -> Int[Array, " steps"]:
    """``stages`` stages of (nearly) equal length, step ``k`` in stage ``floor(k stages/steps)``,
    the batch size doubling from one stage to the next; integer with the exact budget
    (``round_to_budget``), so the doubling holds up to rounding and clipping into the bounds.

    Raises:
        ValueError: ``stages`` not in ``[1, steps]``, or an infeasible budget.
    """
    steps = _check_steps(steps)
    s = _check_scalar("stages", stages, integer=True)
    if not _is_tracer(s) and not 1 <= int(s) <= steps:
        raise ValueError(f"stages: must be between 1 and steps = {steps}, got {int(s)}")
    return _family(steps, "doubling", s, _int_budget(steps, samples, min_batch, max_batch))


# --------------------------------------------------------------------------------------------
# a schedule callable
# --------------------------------------------------------------------------------------------
def schedule_fn(batch_sizes: Int[ArrayLike, " steps"]) -> BatchSchedule:
    """Wrap per-step batch sizes as an optax-style schedule ``step -> batch size``.

    The result is a :class:`BatchSchedule`: callable with a (possibly traced) integer step inside
    ``jax.jit``/``lax.scan``, returning a 0-d integer array; steps past the end give the last batch
    size, negative steps the first. It is a pytree, so passing it to a jitted function and then
    passing another table of the same length does not recompile.

    Args:
        batch_sizes: ``(steps,)`` integer batch sizes (integral floats are converted).

    Returns:
        The :class:`BatchSchedule` over this table.

    Raises:
        ValueError: naming ``batch_sizes``, when it is not a non-empty 1-D array, has
            non-integral values, or has a value ``<= 0``.
    """
    return BatchSchedule(batch_sizes)
