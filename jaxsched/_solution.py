"""Result codes of every solve entry, and the ``throw`` rule.

``RESULTS`` extends diffrax's enumeration (which extends optimistix's and lineax's), so a diffrax or
optimistix failure code converts to ours unchanged and the sweep reports everything with one set of
codes. A result is a traced value: ``RESULTS[result]`` gives its message, ``result ==
RESULTS.successful`` tests it, and ``result.error_if(x, pred)`` raises under jit.

The throw rule (:func:`finish`) runs on the host: the compiled cores of the library return a code
and never raise from inside (no host callback, so JAX's persistent compilation cache can store
them); the entry function raises :class:`SolveError` after the call when the code is concrete. Only
when the entry is itself traced by the caller's ``jit``/``vmap`` (the code is then a tracer) does it
fall back to ``eqx.error_if``, inside the caller's program.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._misc import _is_concrete

__all__ = ["RESULTS", "SolveError", "combine", "finish", "first_failure", "from_diffrax", "nonfinite"]


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


class SolveError(RuntimeError):
    """A solve entry failed with ``throw=True``; the message is the :class:`RESULTS` member's
    (``result`` holds the member's integer code)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def message(code: int) -> str:
    """The message of the :class:`RESULTS` member with integer ``code``."""
    return RESULTS._index_to_message[int(code)]


def first_failure(results: RESULTS) -> RESULTS:
    """The first unsuccessful code of a batch of codes (a ``RESULTS`` item with an array value, as
    ``lax.map``/``vmap`` return it) as one scalar code (``successful`` when all are)."""
    values = jnp.reshape(results._value, (-1,))
    first = values[jnp.argmax(values != RESULTS.successful._value)]
    return eqx.tree_at(lambda r: r._value, results, first)


def finish(result: RESULTS, throw: bool, value, *, allowed: tuple = ()):
    """The ``throw`` rule of every solve entry, applied after its compiled core returned.

    Args:
        result: the core's :class:`RESULTS` code (a scalar, or a batch of codes).
        throw: whether to raise on a code other than ``successful`` (and ``allowed``).
        value: what the entry returns (passed through unchanged).
        allowed: further members that do not raise (e.g. ``RESULTS.max_iterations_reached``).

    Returns:
        ``value``.

    Raises:
        SolveError: on the host, when ``throw`` and the (concrete) code is a failure; under the
            caller's own ``jit``/``vmap`` the same message is raised by ``eqx.error_if`` when the
            caller's program runs (an ``EquinoxRuntimeError``).

    Cost: one device-to-host transfer of the code (it waits for the core to finish).
    """
    if not throw:
        return value
    ok = [RESULTS.successful, *allowed]
    if _is_concrete(result._value):
        codes = np.asarray(result._value).reshape(-1)
        bad = codes[~np.isin(codes, [int(np.asarray(r._value)) for r in ok])]
        if bad.size:
            raise SolveError(message(bad[0]), int(bad[0]))
        return value
    pred = jnp.asarray(True)
    for r in ok:
        pred = pred & (result != r)
    return result.error_if(value, pred)


def nonfinite(x) -> jnp.ndarray:
    """True when any floating leaf of the pytree ``x`` has a NaN or infinite entry."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(x, eqx.is_inexact_array))
    if not leaves:
        return jnp.asarray(False)
    return ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))
