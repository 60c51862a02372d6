"""Result codes of every solve entry, and the ``throw`` rule.

``RESULTS`` extends diffrax's enumeration (which extends optimistix's and lineax's), so a diffrax or
optimistix failure code converts to ours unchanged and the sweep reports everything with one set of
codes. A result is a traced value: ``RESULTS[result]`` gives its message, ``result ==
RESULTS.successful`` tests it, and ``result.error_if(x, pred)`` raises under jit.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["RESULTS", "combine", "finish", "from_diffrax", "nonfinite"]


class RESULTS(diffrax.RESULTS):  # pyright: ignore
    """Outcome codes (``RESULTS.successful`` and diffrax's, optimistix's and lineax's failures, plus):"""

    infeasible_budget = (
        "The sample budget cannot be met: it must lie in [steps * min_batch, steps * max_batch] (with "
        "max_batch capped at the number of examples when sampling without replacement)."
    )
    nonfinite_sensitivity = (
        "The sensitivity phi is not finite: the gradient-flow path or the adjoint system diverged "
        "(a learning rate too large for the problem, or NaN/inf in the problem's data)."
    )
    nonfinite_loss = (
        "The exact expected loss is not finite: SGD is mean-square unstable for this learning rate "
        "and schedule (try a smaller lr or a larger min_batch)."
    )
    negative_sensitivity = "The sensitivity phi is negative where the problem guarantees phi >= 0."
    gd_diverges = (
        "Gradient descent diverges at this learning rate (lr * lambda_max >= 2): no schedule helps."
    )
    invalid_value = "An argument has an invalid value (non-positive lr or batch size, NaN, ...)."
    max_iterations_reached = (
        "The schedule optimiser stopped at its iteration cap before meeting its tolerance."
    )


def from_diffrax(result) -> RESULTS:
    """A diffrax (or optimistix) result as one of ours (same integer codes)."""
    return RESULTS.promote(result)


def combine(*results: RESULTS) -> RESULTS:
    """The first unsuccessful result of several (``successful`` when all are)."""
    out = RESULTS.successful
    for r in results:
        out = RESULTS.where(out == RESULTS.successful, r, out)
    return out


def finish(result: RESULTS, throw: bool, value):
    """With ``throw=True`` raise ``result``'s message (an ``EquinoxRuntimeError`` under jit) when it
    is not ``successful``; return ``value`` unchanged otherwise (the ``throw`` rule of every entry)."""
    if throw:
        return result.error_if(value, result != RESULTS.successful)
    return value


def nonfinite(x) -> jnp.ndarray:
    """True when any floating leaf of the pytree ``x`` has a NaN or infinite entry."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(x, eqx.is_inexact_array))
    if not leaves:
        return jnp.asarray(False)
    return ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))
