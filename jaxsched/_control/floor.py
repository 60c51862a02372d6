"""The square-root rule with a per-step lower bound (docs/theory.md §4.2, §8.2 item 3).

The stability clip ``b_k >= max(min_batch, 2 b_stab(s_k))`` gives every step its own floor
``lo_k``. Minimising the separable convex objective ``sum_k phi_k / b_k`` under ``sum_k b_k = N``,
``lo_k <= b_k <= hi`` still has the threshold form

    b_k(nu) = clip(sqrt(phi_k / nu), lo_k, hi)                (real batch sizes),

with one ``nu > 0`` set by the budget, and the exact integer optimum is the threshold allocation on
the marginal gains ``phi_k / (b (b + 1))`` started at ``ceil(lo_k)``, topped up by the largest next
gains (greedy marginal allocation is exact for separable convex objectives). Steps with
``phi_k <= 0`` stay at their floor. Everything is traced (one compile per number of steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._types import Array, Float, ScalarLike, StepArray

_ITERS = 200  # bisection in log(nu) over a bracket of width < 2000: far below float64 resolution


def _cap(hi, lo: StepArray, samples) -> StepArray:
    # b_k <= N - sum_{j != k} lo_j is implied; it keeps every bound finite.
    implied = samples - (jnp.sum(lo) - lo)
    return implied if hi is None else jnp.minimum(hi, implied)


def relaxed_with_floor(phi: Float[Array, " steps"], samples: ScalarLike, lo: StepArray, hi=None
                       ) -> StepArray:
    """Real ``b_k = clip(sqrt(phi_k / nu), lo_k, hi)`` with ``sum_k b_k = samples`` (traced).

    Args:
        phi: ``(steps,)`` weights (the effective sensitivities times the problem's ``1/b``
            coefficient).
        samples: the budget, ``sum lo <= samples <= steps * hi``.
        lo: ``(steps,)`` per-step floors ``> 0``; hi: a scalar cap or ``None``.

    Returns:
        ``(steps,)`` real batch sizes (if every ``phi_k <= 0`` the spare budget is spread evenly).
    """
    hi_k = _cap(hi, lo, samples)
    root = jnp.sqrt(jnp.maximum(phi, 0.0))
    pos = root > 0
    spare = samples - jnp.sum(lo)

    def spent(log_s):  # b = clip(e^{log_s} sqrt(phi), lo, hi): nondecreasing in log_s
        return jnp.sum(jnp.clip(jnp.exp(log_s) * root, lo, hi_k))

    r_max = jnp.max(jnp.where(pos, root, 0.0))
    r_min = jnp.min(jnp.where(pos, root, jnp.inf))
    safe_max, safe_min = jnp.where(r_max > 0, r_max, 1.0), jnp.where(r_max > 0, r_min, 1.0)
    bracket = (jnp.log(jnp.min(lo) / safe_max), jnp.log(jnp.max(hi_k) / safe_min))

    def halve(_, ab):
        a, b = ab
        mid = 0.5 * (a + b)
        short = spent(mid) < samples
        return jnp.where(short, mid, a), jnp.where(short, b, mid)

    a, b = lax.fori_loop(0, _ITERS, halve, bracket)
    raw = jnp.exp(0.5 * (a + b)) * root
    out = jnp.clip(raw, lo, hi_k)
    free = pos & (raw > lo) & (raw < hi_k)
    w_free = jnp.sum(jnp.where(free, root, 0.0))
    rest = samples - jnp.sum(jnp.where(free, 0.0, out))
    out = jnp.where(free, root * rest / jnp.where(w_free > 0, w_free, 1.0), out)
    even = lo + spare / phi.shape[0]
    return jnp.where(r_max > 0, jnp.clip(out, lo, hi_k), even)


def _counts(phi, log_nu, lo_i, hi_i):
    """The integer ``b_k(nu)``: the smallest ``b >= lo_k`` whose next gain ``phi/(b(b+1))`` is
    ``<= nu``, capped at ``hi``: ``b = ceil((sqrt(1 + 4 phi / nu) - 1) / 2)``."""
    ratio = jnp.exp(jnp.log(jnp.maximum(phi, 1e-300)) - log_nu)
    m = jnp.ceil(0.5 * (jnp.sqrt(1.0 + 4.0 * ratio) - 1.0) - 1e-12)
    m = jnp.where(phi > 0, m, lo_i)
    return jnp.clip(m, lo_i, hi_i)


def integer_with_floor(phi: Float[Array, " steps"], samples: ScalarLike, lo: StepArray, hi=None
                       ) -> Array:
    """The exact integer minimiser of ``sum_k phi_k / b_k`` with ``sum_k b_k = samples`` (an
    integer) and ``ceil(lo_k) <= b_k <= hi`` (``floor(lo_k)`` if the ceilings exceed the budget;
    traced; see the module docstring).

    Returns:
        ``(steps,)`` integer batch sizes (``int32``/``int64`` as enabled).
    """
    int_dtype = jnp.result_type(int)
    total = jnp.round(samples)
    # Integer floors: ceil(lo_k), or floor(lo_k) where the ceilings do not fit the budget (the
    # stability floor carries a factor 2 of margin, so rounding it down stays stable).
    up = jnp.ceil(lo - 1e-9)
    lo_i = jnp.where(jnp.sum(up) <= total, up, jnp.maximum(jnp.floor(lo + 1e-9), 1.0))
    hi_i = jnp.floor(_cap(hi, lo_i, total))
    pos_phi = jnp.where(phi > 0, phi, 0.0)
    top = jnp.log(jnp.maximum(jnp.max(pos_phi), 1e-300))
    bottom = jnp.log(jnp.maximum(jnp.min(jnp.where(phi > 0, phi, jnp.inf)), 1e-300))
    bottom = jnp.where(jnp.isfinite(bottom), bottom, top)
    bracket = (bottom - 2.0 * jnp.log(total + 1.0) - 2.0, top + 1.0)  # all at hi / all at lo

    def halve(_, ab):
        a, b = ab
        mid = 0.5 * (a + b)
        over = jnp.sum(_counts(phi, mid, lo_i, hi_i)) > total  # too many: raise nu
        return jnp.where(over, mid, a), jnp.where(over, b, mid)

    a, b = lax.fori_loop(0, _ITERS, halve, bracket)
    base = _counts(phi, b, lo_i, hi_i)  # sum <= total
    left = total - jnp.sum(base)
    gain = jnp.where((base < hi_i) & (phi > 0), pos_phi / (base * (base + 1.0)), -jnp.inf)
    # Steps with phi <= 0 take what the budget forces last, evenly (free where phi == 0).
    order = jnp.argsort(-gain)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    extra = (rank < left).astype(base.dtype)
    out = base + jnp.where(base + extra <= hi_i, extra, 0.0)
    return jax.lax.stop_gradient(out).astype(int_dtype)


def floor_binds(beta_unclipped: StepArray, floor: StepArray) -> Array:
    """Number of steps where the unclipped optimum lies below the floor."""
    return jnp.sum(beta_unclipped < floor * (1.0 - 1e-12))
