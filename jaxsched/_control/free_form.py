"""A differentiable free-form parametrisation of schedules with an exact real budget (used by the
gradient-based control methods)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from .._types import Array, ArrayLike, Float, ScalarLike
from .allocation import (
    _check_budget,
    _check_steps_array,
    _scale_clip,
)


# --------------------------------------------------------------------------------------------
# differentiable free-form parametrisation
# --------------------------------------------------------------------------------------------
def _real_budget(steps, samples, min_batch, max_batch, dtype):
    # min_batch = 0 is allowed here: softmax / sigmoid never reach the bound exactly.
    n, lo, hi = _check_budget(steps, samples, min_batch, max_batch, integer=False, zero_min_ok=True)
    return n.astype(dtype), lo.astype(dtype), (None if max_batch is None else hi.astype(dtype))


@eqx.filter_jit
def _free_core(theta, samples, lo, hi):
    steps = theta.shape[0]
    spare = samples - steps * lo
    if hi is None:
        return lo + spare * jax.nn.softmax(theta)
    width = hi - lo
    m = spare / jnp.where(width > 0, width, 1.0)  # sum_k sigmoid(theta_k - c) must equal m
    interior = (m > 0) & (m < steps) & (width > 0)
    m_safe = jnp.where(interior, m, 0.5 * steps)  # keeps the unused branch finite for grads
    p = m_safe / steps
    logit_p = jnp.log(p) - jnp.log1p(-p)
    th = lax.stop_gradient(theta)
    m_sg = lax.stop_gradient(m_safe)

    # sum sigmoid(theta - c) is decreasing in c and equals m somewhere in [min - logit, max - logit].
    def halve(_, ab):
        a, b = ab
        mid = 0.5 * (a + b)
        high = jnp.sum(jax.nn.sigmoid(th - mid)) > m_sg
        return jnp.where(high, mid, a), jnp.where(high, b, mid)

    a, b = lax.fori_loop(0, 100, halve, (jnp.min(th) - logit_p, jnp.max(th) - logit_p))
    c0 = lax.stop_gradient(0.5 * (a + b))
    # One Newton step outside stop_gradient: at the root its derivative is the implicit-function
    # derivative dc/dtheta_k = sigma'_k / sum_j sigma'_j, so gradients are exact.
    s = jax.nn.sigmoid(theta - c0)
    c = c0 + (jnp.sum(s) - m_safe) / jnp.sum(s * (1.0 - s))
    b = lo + width * jax.nn.sigmoid(theta - c)
    return jnp.where(interior, b, jnp.where(m <= 0, lo, hi) * jnp.ones_like(b))


def free_form_batch_sizes(
    theta: Float[ArrayLike, " steps"],
    samples: ScalarLike,
    *,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
) -> Float[Array, " steps"]:
    """Real batch sizes from unconstrained parameters ``theta``, meeting the budget and the
    bounds by construction, for gradient descent on a schedule.

    - ``max_batch=None``: ``b = lo + (samples - steps lo) softmax(theta)``.
    - with ``max_batch``: ``b_k = lo + (hi - lo) sigmoid(theta_k - c)`` with the shift ``c``
      solving ``sum_k b_k = samples``; ``c`` is found by bisection under ``stop_gradient`` plus
      one Newton step outside it, so the value is exact to rounding and the gradient equals the
      implicit-function gradient.

    ``theta`` is invariant to adding a constant. Differentiable in ``theta``, ``samples`` and the
    bounds.

    Args:
        theta: parameters, shape ``(steps,)``.
        samples: real budget.
        min_batch: lower bound ``>= 0``.
        max_batch: upper bound or ``None``.

    Returns:
        Real batch sizes, shape ``(steps,)``.

    Raises:
        ValueError: ``theta`` not 1-D or not finite, or an infeasible budget.
    """
    theta = _check_steps_array("theta", theta)
    n, lo, hi = _real_budget(theta.shape[0], samples, min_batch, max_batch, theta.dtype)
    return _free_core(theta, n, lo, hi)


@eqx.filter_jit
def _free_init_core(beta, samples, lo, hi, eps):
    steps = beta.shape[0]
    spare = samples - steps * lo
    cap = jnp.minimum(samples - (steps - 1) * lo, samples if hi is None else hi)
    # Project onto the feasible set first (identity for a feasible beta).
    tiny = jnp.finfo(beta.dtype).tiny  # _scale_clip brackets in log space: needs lo > 0
    target = _scale_clip(jnp.maximum(beta, 0.0), samples, jnp.maximum(lo, tiny), cap)
    if hi is None:
        share = (target - lo) / jnp.where(spare > 0, spare, 1.0)
        return jnp.log(jnp.maximum(share, eps / steps))
    p = jnp.clip((target - lo) / jnp.where(hi > lo, hi - lo, 1.0), eps, 1.0 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def free_form_init(
    beta: Float[ArrayLike, " steps"],
    samples: ScalarLike,
    *,
    min_batch: ScalarLike = 1,
    max_batch: ScalarLike | None = None,
    eps: float = 1e-9,
) -> Float[Array, " steps"]:
    """Parameters ``theta`` with ``free_form_batch_sizes(theta, ...) ~= beta``.

    ``beta`` is first rescaled/clipped into the feasible set (a no-op for a feasible ``beta``).
    Entries at a bound can only be approached: their softmax share or sigmoid is clamped to
    ``eps``, so the reproduction error is about ``eps * (samples - steps * min_batch)``.

    Raises:
        ValueError: ``beta`` not 1-D or not finite, or an infeasible budget.
    """
    beta = _check_steps_array("beta", beta)
    n, lo, hi = _real_budget(beta.shape[0], samples, min_batch, max_batch, beta.dtype)
    return _free_init_core(beta, n, lo, hi, jnp.asarray(eps, beta.dtype))


