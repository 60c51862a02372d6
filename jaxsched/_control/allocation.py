"""From the sensitivity ``phi_k`` to batch sizes: the optimal allocation of a sample budget
(theory sec. 4).

The first-order objective of a schedule is ``sum_k phi_k / b_k`` (the schedule-dependent part of
``J1``). Minimising it under ``sum_k b_k = N`` and ``lo <= b_k <= hi`` gives

- the relaxed optimum ``b_k = clip(sqrt(phi_k / nu), lo, hi)`` (real batch sizes), and
- the exact integer optimum by threshold search on the marginal gain ``phi_k / (b (b + 1))``,
  which is exact because the objective is separable and convex in each ``b_k`` where
  ``phi_k > 0``.

Everything here is a function of arrays only. The number of steps is the (static) shape of
``phi``; ``samples``, ``min_batch``, ``max_batch`` and ``phi`` are array leaves, so changing their
values never recompiles, and all functions can be vmapped over ``phi`` and over the scalars.

Steps with ``phi_k <= 0`` (possible only through the third-derivative term of ``phi``): there noise
does not hurt, so they keep ``min_batch`` unless the budget cannot be spent on the steps with
``phi_k > 0`` (all of those already at ``max_batch``). The forced excess then goes first, evenly, to
steps with ``phi_k == 0`` (where it costs nothing), then to steps with ``phi_k < 0`` in order of
increasing ``|phi_k|``, each filled up to ``max_batch`` before the next: the cost ``phi_k / b`` is
concave there, so this "fill the cheapest first" rule is the exact minimiser (an even spread would
be the worst choice). With all ``phi_k == 0`` this spreads the budget evenly.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._misc import _is_concrete
from .._solution import RESULTS
from .._types import Array, ArrayLike, Float, Int, ScalarLike

__all__ = ["first_order_objective", "integer_optimum", "relaxed_optimum"]

# Bisection in log space halves a bracket of width at most ~1500 (ratios of 1e+-300); 2^-100
# of that is far below float64 resolution, so the bracket ends are adjacent floats.
_BISECT_ITERS = 100


# --------------------------------------------------------------------------------------------
# validation helpers (shared with _schedules.py)
# --------------------------------------------------------------------------------------------
def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_steps_array(name: str, x: ArrayLike) -> Array:
    """A 1-D floating array with at least one entry; NaN/inf refused when concrete."""
    try:
        arr = jnp.asarray(x)
    except TypeError as e:
        raise ValueError(f"{name}: cannot be converted to an array ({e})") from None
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name}: must be a 1-D array of shape (steps,), got shape {arr.shape}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    if not _is_tracer(arr) and not np.all(np.isfinite(np.asarray(arr))):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _check_scalar(name: str, x: ScalarLike, *, integer: bool) -> Array:
    """A 0-d array (integer dtype when ``integer``); concrete non-integral values refused."""
    arr = jnp.asarray(x)
    if arr.ndim != 0:
        raise ValueError(f"{name}: must be a scalar, got shape {arr.shape}")
    if integer:
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            if not _is_tracer(arr):
                v = float(arr)
                if not np.isfinite(v) or v != round(v):
                    raise ValueError(f"{name}: must be an integer, got {v}")
            arr = jnp.round(arr).astype(jnp.result_type(int))
    else:
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(jnp.result_type(float))
        if not _is_tracer(arr) and not np.isfinite(float(arr)):
            raise ValueError(f"{name}: must be finite, got {float(arr)}")
    return arr


def _check_budget(
    steps: int,
    samples: ScalarLike,
    min_batch: ScalarLike,
    max_batch,
    *,
    integer: bool,
    zero_min_ok: bool = False,
    batch_cap: int | None = None,
) -> tuple[Array, Array, Array]:
    """Validate ``samples``, ``min_batch``, ``max_batch`` and return them as 0-d arrays: the one
    home of the budget rule ``steps * min_batch <= samples <= steps * max_batch``.

    ``max_batch=None`` becomes ``samples``: the constraint ``b_k <= samples`` is implied by the
    budget, so the result is the unbounded one. ``batch_cap`` (the problem's ``batch_cap()``, e.g.
    ``n`` for a data set sampled without replacement) caps ``max_batch``; a budget above
    ``steps * batch_cap`` is refused naming ``samples``. Value checks run when the values are
    concrete; under a trace the cores guard feasibility with ``eqx.error_if``.
    """
    n = _check_scalar("samples", samples, integer=integer)
    lo = _check_scalar("min_batch", min_batch, integer=integer)
    hi = n if max_batch is None else _check_scalar("max_batch", max_batch, integer=integer)
    if batch_cap is not None:
        if not _is_tracer(n) and float(n) > steps * batch_cap:
            raise ValueError(
                f"samples: must be <= steps * n = {steps * batch_cap:g} when sampling without "
                f"replacement from n = {batch_cap} examples (each batch is at most n), got {float(n):g}")
        if not _is_tracer(lo) and float(lo) > batch_cap:
            raise ValueError(f"min_batch: must be <= n = {batch_cap} when sampling without replacement, "
                             f"got {float(lo):g}")
        hi = jnp.minimum(hi, jnp.asarray(batch_cap, hi.dtype))
        max_batch = hi if max_batch is None else max_batch
    if not _is_tracer(lo):
        lo_v = float(lo)
        if integer and lo_v < 1:
            raise ValueError(f"min_batch: must be >= 1, got {lo_v:g}")
        if not integer and zero_min_ok and lo_v < 0:
            raise ValueError(f"min_batch: must be >= 0, got {lo_v:g}")
        if not integer and not zero_min_ok and lo_v <= 0:
            raise ValueError(f"min_batch: must be > 0, got {lo_v:g}")
    hi_vs_lo = max_batch is not None and not (_is_tracer(lo) or _is_tracer(hi))
    if hi_vs_lo and float(hi) < float(lo):
        raise ValueError(f"max_batch: must be >= min_batch = {float(lo):g}, got {float(hi):g}")
    if not (_is_tracer(n) or _is_tracer(lo)) and float(n) < steps * float(lo):
        raise ValueError(f"samples: must be >= steps * min_batch = {steps * float(lo):g}, got {float(n):g}")
    n_vs_hi = max_batch is not None and not (_is_tracer(n) or _is_tracer(hi))
    if n_vs_hi and float(n) > steps * float(hi):
        raise ValueError(f"samples: must be <= steps * max_batch = {steps * float(hi):g}, got {float(n):g}")
    return n, lo, hi


def _infeasible(steps: int, samples: Array, lo: Array, hi: Array) -> Array:
    """True where the budget rule ``steps * lo <= samples <= steps * hi``, ``lo <= hi`` fails."""
    return (samples < steps * lo) | (samples > steps * hi) | (hi < lo)


def budget_result(steps: int, samples: Array, lo: Array, hi: Array) -> RESULTS:
    """``RESULTS.infeasible_budget`` where the (traced) budget breaks the budget rule, else
    ``successful``: the code a compiled core returns instead of raising inside (traced)."""
    return RESULTS.where(_infeasible(steps, samples, lo, hi), RESULTS.infeasible_budget,
                         RESULTS.successful)


def _guard_feasible(out: Array, samples: Array, lo: Array, hi: Array) -> Array:
    """The budget rule for values that could not be checked eagerly, applied by an entry function
    *outside* its compiled core and only when the budget is traced by the caller's ``jit``/``vmap``
    (concrete budgets were refused on the host by :func:`_check_budget`): ``eqx.error_if`` then
    raises when the caller's program runs instead of returning junk."""
    if _is_concrete(samples, lo, hi):
        return out
    bad = _infeasible(out.shape[-1], samples, lo, hi)
    return eqx.error_if(out, bad, "samples: infeasible for steps, min_batch and max_batch")


# --------------------------------------------------------------------------------------------
# shared numerical kernels (traced)
# --------------------------------------------------------------------------------------------
def _scale_clip(w: Float[Array, " steps"], total, lo, hi) -> Float[Array, " steps"]:
    """``b = clip(s w, lo, hi)`` with ``s > 0`` such that ``sum b = total`` (for ``w >= 0``).

    ``sum_k clip(s w_k, lo, hi)`` is continuous, piecewise linear and nondecreasing in ``s``;
    bisection in ``log s`` finds the linear piece that holds the budget and one exact linear solve
    on that piece (the free steps share ``total - sum(clipped)`` in proportion to ``w``) removes
    the bisection error. When no bound is active this is exactly ``total * w / sum(w)``.
    Steps with ``w == 0`` stay at ``lo``; if the budget exceeds what the steps with ``w > 0`` can
    take, those sit at ``hi`` and the caller spends the excess.
    Requires ``lo > 0`` (the bracket is in log space).
    """
    pos = w > 0
    any_pos = jnp.any(pos)
    w_max = jnp.where(any_pos, jnp.max(w), 1.0)
    w_min = jnp.where(any_pos, jnp.min(jnp.where(pos, w, jnp.inf)), 1.0)
    # At s = lo / w_max every step is at lo; at s = hi / w_min every positive step is at hi.
    bracket = (jnp.log(lo / w_max), jnp.log(hi / w_min))

    def spent(log_s):
        return jnp.sum(jnp.clip(jnp.exp(log_s) * w, lo, hi))

    def halve(_, ab):
        a, b = ab
        mid = 0.5 * (a + b)
        short = spent(mid) < total
        return jnp.where(short, mid, a), jnp.where(short, b, mid)

    a, b = lax.fori_loop(0, _BISECT_ITERS, halve, bracket)
    raw = jnp.exp(0.5 * (a + b)) * w
    clipped = jnp.clip(raw, lo, hi)
    free = pos & (raw > lo) & (raw < hi)
    w_free = jnp.sum(jnp.where(free, w, 0.0))
    rest = total - jnp.sum(jnp.where(free, 0.0, clipped))
    s_exact = rest / jnp.where(w_free > 0, w_free, 1.0)
    out = jnp.where(free, s_exact * w, clipped)
    return jnp.clip(out, lo, hi)


def _fill_nonpositive(phi: Float[Array, " steps"], excess, lo, hi, *, integer: bool) -> Array:
    """Extra batch (on top of ``lo``) for the steps with ``phi_k <= 0`` when the budget forces
    ``excess`` samples onto them: evenly over ``phi == 0``, then ``phi < 0`` by increasing
    ``|phi|``, each filled to ``hi`` (exact minimiser: the cost is concave there; module doc)."""
    zero = phi == 0
    neg = phi < 0
    n_zero = jnp.sum(zero)
    cap = hi - lo
    to_zero = jnp.minimum(excess, n_zero * cap)
    if integer:
        per, extra = jnp.divmod(to_zero, jnp.maximum(n_zero, 1))
        # The remainder goes to the last zero-phi steps: later steps usually have larger batches.
        rank_from_end = jnp.cumsum(zero[::-1])[::-1] - 1
        add_zero = per + (rank_from_end < extra).astype(per.dtype)
    else:
        add_zero = to_zero / jnp.maximum(n_zero, 1)
    to_neg = excess - to_zero
    order = jnp.argsort(jnp.where(neg, -phi, jnp.inf))
    cap_sorted = jnp.where(neg, cap, 0)[order]
    before = jnp.cumsum(cap_sorted) - cap_sorted
    add_sorted = jnp.clip(to_neg - before, 0, cap_sorted)
    add_neg = jnp.zeros_like(add_sorted).at[order].set(add_sorted)
    zero_fill = jnp.zeros_like(add_neg)
    return jnp.where(zero, add_zero, zero_fill) + jnp.where(neg, add_neg, zero_fill)


# --------------------------------------------------------------------------------------------
# objective
# --------------------------------------------------------------------------------------------
def first_order_objective(
    phi: Float[ArrayLike, "*batch steps"], batch_sizes: Float[ArrayLike, "*batch steps"]
) -> Float[Array, "*batch"]:
    """The schedule-dependent part of ``J1``: ``sum_k phi_k / b_k`` (theory 4).

    Args:
        phi: per-step sensitivities ``phi_k``, shape ``(..., steps)``.
        batch_sizes: batch sizes ``b_k`` (real or integer), broadcastable against ``phi``.

    Returns:
        ``sum_k phi_k / b_k`` over the last axis.
    """
    phi = jnp.asarray(phi)
    b = jnp.asarray(batch_sizes)
    dtype = jnp.result_type(phi.dtype, b.dtype, float)
    return jnp.sum(phi.astype(dtype) / b.astype(dtype), axis=-1)


# --------------------------------------------------------------------------------------------
# relaxed (real) optimum
# --------------------------------------------------------------------------------------------
@eqx.filter_jit
def _relaxed_core(phi, samples, lo, hi):
    steps = phi.shape[0]
    # b_k <= samples - (steps - 1) lo is implied by the constraints, so this never changes the
    # optimum but makes every bound finite.
    hi = jnp.minimum(hi, samples - (steps - 1) * lo)
    b = _scale_clip(jnp.sqrt(jnp.maximum(phi, 0.0)), samples, lo, hi)
    n_pos = jnp.sum(phi > 0)
    excess = jnp.maximum(samples - n_pos * hi - (steps - n_pos) * lo, 0.0)
    return b + _fill_nonpositive(phi, excess, lo, hi, integer=False)


def relaxed_optimum(
    phi: Float[ArrayLike, " steps"],
    samples: ScalarLike,
    *,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
) -> Float[Array, " steps"]:
    """Real-valued minimiser of ``sum_k phi_k / b_k`` s.t. ``sum_k b_k = samples``,
    ``min_batch <= b_k <= max_batch`` (theory 4, the square-root rule).

    ``b_k = clip(sqrt(phi_k / nu), min_batch, max_batch)`` with ``nu > 0`` found by bisection in
    log space followed by an exact solve on the active set, so without active bounds the result is
    exactly ``samples * sqrt(phi_k) / sum_j sqrt(phi_j)``. Steps with ``phi_k <= 0`` get
    ``min_batch`` unless the budget forces more (module docstring); all ``phi <= 0`` with
    ``phi == 0`` spreads the budget evenly.

    Args:
        phi: per-step sensitivities, shape ``(steps,)``.
        samples: the budget ``N`` (real allowed).
        min_batch: lower bound, ``> 0``.
        max_batch: upper bound, or ``None`` for none.

    Returns:
        Real batch sizes, shape ``(steps,)``, summing to ``samples`` (to rounding).

    Raises:
        ValueError: ``phi`` not 1-D or not finite; ``min_batch <= 0``; ``max_batch < min_batch``;
            ``samples`` outside ``[steps * min_batch, steps * max_batch]``.
    """
    phi = _check_steps_array("phi", phi)
    n, lo, hi = _check_budget(phi.shape[0], samples, min_batch, max_batch, integer=False)
    dtype = phi.dtype
    n, lo, hi = n.astype(dtype), lo.astype(dtype), hi.astype(dtype)
    return _guard_feasible(_relaxed_core(phi, n, lo, hi), n, lo, hi)


def relaxed_allocation(phi, samples, *, min_batch=1, max_batch=None) -> Float[Array, " steps"]:
    """:func:`relaxed_optimum` for callers inside a compiled core: the same checks of shapes and
    of concrete values, but no run-time guard of a traced budget (which would put a host callback
    in the caller's program and keep it out of JAX's persistent compilation cache). Combine
    :func:`budget_result` into the caller's result code instead."""
    phi = _check_steps_array("phi", phi)
    n, lo, hi = _check_budget(phi.shape[0], samples, min_batch, max_batch, integer=False)
    dtype = phi.dtype
    return _relaxed_core(phi, n.astype(dtype), lo.astype(dtype), hi.astype(dtype))


# --------------------------------------------------------------------------------------------
# exact integer optimum
# --------------------------------------------------------------------------------------------
def _log_gain(log_phi, b):
    """log of the marginal gain ``phi / (b (b + 1))`` of raising ``b`` to ``b + 1``."""
    bf = b.astype(log_phi.dtype)
    return log_phi - jnp.log(bf) - jnp.log1p(bf)


def _threshold_allocation(log_phi, pos, log_nu, lo, hi):
    """``b_k(nu) = lo + #{b in [lo, hi) : phi_k / (b (b + 1)) > nu}`` for ``phi_k > 0``.

    ``b (b + 1) < q = phi / nu`` iff ``b < r = sqrt(q + 1/4) - 1/2``, so ``b_k = clip(ceil r)``.
    One correction pass against the gains themselves makes the count exact despite rounding in
    ``r``; that keeps the allocation a "top set" of marginal gains, which the fix-up relies on.
    """
    log_q = jnp.minimum(log_phi - log_nu, 600.0)
    q = jnp.exp(jnp.minimum(log_q, 60.0))
    # 2q / (1 + sqrt(1 + 4q)) is r without cancellation for small q; sqrt(q) - 1/2 past 1e26.
    r = jnp.where(log_q > 60.0, jnp.exp(0.5 * log_q) - 0.5, 2 * q / (1 + jnp.sqrt(1 + 4 * q)))
    hi_f = hi.astype(r.dtype)
    b = jnp.clip(jnp.ceil(jnp.minimum(r, hi_f)), lo, hi).astype(lo.dtype)
    b = jnp.where(pos, b, lo)
    up = pos & (b < hi) & (_log_gain(log_phi, b) > log_nu)
    b = b + up.astype(b.dtype)
    down = pos & (b > lo) & (_log_gain(log_phi, jnp.maximum(b - 1, 1)) <= log_nu)
    return b - down.astype(b.dtype)


def _integer_positive(phi, target, lo, hi):
    """Exact integer minimiser of ``sum_{phi_k > 0} phi_k / b_k`` with ``sum b = target`` and the
    steps with ``phi_k <= 0`` held at ``lo`` (requires ``target <= n_pos hi + n_nonpos lo``)."""
    pos = phi > 0
    any_pos = jnp.any(pos)
    log_phi = jnp.where(pos, jnp.log(jnp.where(pos, phi, 1.0)), -jnp.inf)
    lo_f, hi_f = lo.astype(phi.dtype), hi.astype(phi.dtype)
    # No gain exceeds nu_top (everything at lo); every gain below hi exceeds nu_bottom.
    log_top = jnp.where(any_pos, jnp.max(log_phi), 0.0) - jnp.log(lo_f) - jnp.log1p(lo_f)
    log_min = jnp.where(any_pos, jnp.min(jnp.where(pos, log_phi, jnp.inf)), 0.0)
    log_bottom = log_min - jnp.log(hi_f) - jnp.log1p(hi_f)

    def halve(state):
        a, b, it = state  # sum(b(a)) >= target side, sum(b(b)) <= target side
        mid = 0.5 * (a + b)
        within = jnp.sum(_threshold_allocation(log_phi, pos, mid, lo, hi)) <= target
        return jnp.where(within, a, mid), jnp.where(within, mid, b), it + 1

    def wide(state):
        # Stop once the ends are (nearly) adjacent floats: typical brackets need ~55 halvings,
        # not the worst case's 100.
        a, b, it = state
        tiny = 4 * jnp.finfo(a.dtype).eps * jnp.maximum(jnp.abs(a), jnp.abs(b))
        return (it < _BISECT_ITERS) & (b - a > tiny)

    _, log_nu, _ = lax.while_loop(wide, halve, (log_bottom, log_top, 0))
    b0 = _threshold_allocation(log_phi, pos, log_nu, lo, hi)

    # Shortcut for many exact ties at the threshold (e.g. constant phi): give the remaining
    # samples at once to the largest next gains, and keep that only if it passes the optimality
    # certificate "no next gain exceeds any last taken gain" (no exchange of one sample between
    # two steps improves a separable convex objective). Otherwise the loop below does it.
    steps = phi.shape[0]
    next_gain = jnp.where(pos & (b0 < hi), _log_gain(log_phi, b0), -jnp.inf)
    order = steps - 1 - jnp.argsort(-next_gain[::-1], stable=True)  # ties: later steps first
    rank = jnp.zeros(steps, b0.dtype).at[order].set(jnp.arange(steps, dtype=b0.dtype))
    b1 = b0 + (rank < target - jnp.sum(b0)).astype(b0.dtype)
    next1 = jnp.max(jnp.where(pos & (b1 < hi), _log_gain(log_phi, b1), -jnp.inf))
    last1 = jnp.min(jnp.where(pos & (b1 > lo), _log_gain(log_phi, jnp.maximum(b1 - 1, 1)), jnp.inf))
    certified = (jnp.sum(b1) == target) & (next1 <= last1)
    b0 = jnp.where(certified, b1, b0)

    # Fix-up: the samples left over (ties of gains at the threshold) go one at a time to the
    # largest next marginal gain; if ever over budget, remove the smallest last gain. Each move
    # keeps "all taken gains >= all untaken gains", which is optimality for a separable convex
    # objective.
    def not_done(b):
        return jnp.sum(b) != target

    def move(b):
        deficit = target - jnp.sum(b)
        add_key = jnp.where(pos & (b < hi), _log_gain(log_phi, b), -jnp.inf)
        rem_key = jnp.where(pos & (b > lo), _log_gain(log_phi, jnp.maximum(b - 1, 1)), jnp.inf)
        last_max = b.shape[0] - 1 - jnp.argmax(add_key[::-1])  # ties: later steps first
        b = b.at[last_max].add((deficit > 0).astype(b.dtype))
        return b.at[jnp.argmin(rem_key)].add(-(deficit < 0).astype(b.dtype))

    return lax.while_loop(not_done, move, b0)


@eqx.filter_jit
def _integer_core(phi, samples, lo, hi):
    steps = phi.shape[0]
    hi = jnp.minimum(hi, samples - (steps - 1) * lo)  # implied bound; keeps everything finite
    n_pos = jnp.sum(phi > 0)
    target = jnp.clip(samples, steps * lo, n_pos * hi + (steps - n_pos) * lo)
    b = _integer_positive(phi, target, lo, hi)
    return b + _fill_nonpositive(phi, samples - target, lo, hi, integer=True)


def integer_optimum(
    phi: Float[ArrayLike, " steps"],
    samples: ScalarLike,
    *,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
) -> Int[Array, " steps"]:
    """The exact integer minimiser of ``sum_k phi_k / b_k`` s.t. ``sum_k b_k = samples``,
    ``min_batch <= b_k <= max_batch`` integers (theory 4, integer batch sizes).

    For ``phi_k > 0`` the objective is separable and convex in each ``b_k``, so taking the
    ``samples - steps * min_batch`` largest marginal gains ``phi_k / (b (b + 1))`` is optimal.
    The threshold ``nu`` of those gains is found by bisection in log space (``b_k(nu)`` counts the
    gains above ``nu``); the few samples left by ties at the threshold are then handed out one at
    a time in a ``lax.while_loop`` to the largest next gain. This is not rounding of the relaxed
    optimum, which can be suboptimal and miss the budget. Steps with ``phi_k <= 0`` keep
    ``min_batch`` unless the budget forces more (module docstring). Exact ties of marginal gains
    are broken towards later steps.

    Args:
        phi: per-step sensitivities, shape ``(steps,)``.
        samples: the budget ``N``, an integer.
        min_batch: integer lower bound, ``>= 1``.
        max_batch: integer upper bound, or ``None`` for none.

    Returns:
        Integer batch sizes, shape ``(steps,)``, ``sum == samples`` exactly.

    Raises:
        ValueError: ``phi`` not 1-D or not finite; non-integer ``samples``/bounds;
            ``min_batch < 1``; ``max_batch < min_batch``; ``samples`` outside
            ``[steps * min_batch, steps * max_batch]``.
    """
    phi = _check_steps_array("phi", phi)
    n, lo, hi = _check_budget(phi.shape[0], samples, min_batch, max_batch, integer=True)
    dtype = jnp.result_type(n.dtype, lo.dtype, hi.dtype)
    n, lo, hi = n.astype(dtype), lo.astype(dtype), hi.astype(dtype)
    return _guard_feasible(_integer_core(phi, n, lo, hi), n, lo, hi)


def integer_allocation(phi, samples, *, min_batch=1, max_batch=None) -> Int[Array, " steps"]:
    """:func:`integer_optimum` for callers inside a compiled core, without the run-time guard of
    a traced budget (see :func:`relaxed_allocation`; combine :func:`budget_result` instead)."""
    phi = _check_steps_array("phi", phi)
    n, lo, hi = _check_budget(phi.shape[0], samples, min_batch, max_batch, integer=True)
    dtype = jnp.result_type(n.dtype, lo.dtype, hi.dtype)
    return _integer_core(phi, n.astype(dtype), lo.astype(dtype), hi.astype(dtype))
