"""One entry for the schedule-independent parts of the first-order prediction (docs/theory.md §4):
``first_order_parts(problem, *, lr | optimizer, steps, method=...)`` with a method object —
:class:`jaxsched.DenseAdjoint` (any problem), :class:`jaxsched.Eigenbasis` (quadratic problems) or
:class:`jaxsched.MatrixFree` (large finite-data problems) — and one return type,
:class:`FirstOrderParts`.

Because ``J1`` is affine in the noise weights ``w(b_k)`` (``1/b_k`` with replacement), for every
schedule

    E F(x_K) ~ base_loss + drift + sum_k s_k phi_k w(b_k),

with ``s_k`` the intrinsic step sizes (the learning rate for plain SGD) and ``drift = h *
correction`` the schedule-independent O(h) term. For plain SGD at a constant rate ``h`` this is the
public contract ``base + h (correction + sum_k phi_k w(b_k))``.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp

from .._misc import check_steps
from .._problem.base import check_problem
from .._solution import RESULTS, finish
from .._types import Array, Float, Scalar, StepArray, Vector
from . import _common as cm

__all__ = ["AbstractSensitivity", "FirstOrderParts", "first_order_parts", "sensitivity",
           "predicted_loss_from_parts", "noise_objective"]


class FirstOrderParts(eqx.Module):
    """Everything the first-order objective needs, independent of the schedule.

    Attributes:
        phi: ``(steps,)`` per-step sensitivities ``phi_k = int_step phi(t) dt`` (intrinsic time).
        base_loss: ``F(x(T))`` on the gradient-flow path.
        correction: the schedule-independent part of ``J1`` (drift correction; with momentum also
            the lag term), per unit of the mean step size: ``drift = mean(s) * correction``.
        step_sizes: ``(steps,)`` intrinsic step sizes ``s_k`` (``lr_k / (1 - mu)``).
        phi_stderr: ``(steps,)`` standard errors of ``phi`` (zeros when it is exact; estimated by the
            matrix-free method when it subsamples examples).
        result: a :class:`jaxsched.RESULTS` code.
        x_final: ``x(T)`` (for the eigenbasis method, ``x(T) - x_ref`` in the eigenbasis).
    """

    phi: StepArray
    base_loss: Scalar
    correction: Scalar
    step_sizes: StepArray
    phi_stderr: StepArray
    result: RESULTS
    x_final: Vector

    @property
    def drift(self) -> Scalar:
        """The schedule-independent O(h) term ``mean(s) * correction``."""
        return jnp.mean(self.step_sizes) * self.correction

    @property
    def weights(self) -> StepArray:
        """``s_k phi_k``: the coefficient of ``w(b_k)`` in the predicted loss."""
        return self.step_sizes * self.phi

    @property
    def effective_phi(self) -> StepArray:
        """``(s_k / mean(s)) phi_k``: ``phi`` for an lr schedule, so that the first-order objective
        ``sum_k effective_phi_k w(b_k)`` keeps the units of plain SGD (equal to ``phi`` at a
        constant rate)."""
        return self.weights / jnp.mean(self.step_sizes)


class AbstractSensitivity(eqx.Module):
    """A method computing :class:`FirstOrderParts`. Subclasses implement ``parts``."""

    @abc.abstractmethod
    def parts(self, problem, units: cm.StepUnits, steps: int, rtol, atol, solver) -> FirstOrderParts:
        """The parts for ``problem`` under ``units`` (traced; called inside jit)."""

    def check(self, problem, optimizer) -> None:
        """Refuse, eagerly and naming the argument, a problem or optimizer this method cannot do."""

    def compute(self, problem, units: cm.StepUnits, steps: int, rtol, atol, solver, throw: bool):
        """The parts, with the throw rule applied on the host after the call (default: ``parts``
        inside one jitted call, the same compiled program for ``throw=True`` and ``False``; a
        method with host-side work, such as drawing a subsample, overrides this)."""
        parts = _parts_core(self, problem, units, steps, rtol, atol, solver)
        return finish(parts.result, throw, parts)


def _invalid_units(units: cm.StepUnits):
    """True when a (traced) step size is not finite and > 0: a code, not a raise, inside jit."""
    s = units.s
    return ~jnp.all(jnp.isfinite(s) & (s > 0)) | ~jnp.isfinite(units.drift_factor)


def _coded_parts(parts: FirstOrderParts, units: cm.StepUnits) -> FirstOrderParts:
    """``parts`` with its result set to ``invalid_value`` for bad step sizes and to
    ``nonfinite_sensitivity`` for a non-finite ``phi`` or base loss (when it was successful)."""
    bad = ~jnp.all(jnp.isfinite(parts.phi)) | ~jnp.isfinite(parts.base_loss)
    result = RESULTS.where(bad & (parts.result == RESULTS.successful), RESULTS.nonfinite_sensitivity,
                           parts.result)
    result = RESULTS.where(_invalid_units(units), RESULTS.invalid_value, result)
    return eqx.tree_at(lambda p: p.result, parts, result)


def _finish_parts(parts: FirstOrderParts, throw: bool, units: cm.StepUnits | None = None
                  ) -> FirstOrderParts:
    """Code the result of ``parts`` (see :func:`_coded_parts`) and apply the throw rule; outside
    a jitted core only (it raises on the host when the values are concrete)."""
    if units is not None:
        parts = _coded_parts(parts, units)
    else:
        bad = ~jnp.all(jnp.isfinite(parts.phi)) | ~jnp.isfinite(parts.base_loss)
        result = RESULTS.where(bad & (parts.result == RESULTS.successful),
                               RESULTS.nonfinite_sensitivity, parts.result)
        parts = eqx.tree_at(lambda p: p.result, parts, result)
    return finish(parts.result, throw, parts)


@eqx.filter_jit
def _parts_core(method, problem, units, steps, rtol, atol, solver):
    """One compiled program per method, problem structure and ``steps``: the parts with their
    result code (no host callback inside, so the persistent compilation cache keeps it)."""
    return _coded_parts(method.parts(problem, units, steps, rtol, atol, solver), units)


#: Above this dimension a finite-data problem that is not quadratic defaults to the matrix-free
#: method (the dense method holds O(d^2) per checkpoint and costs O(d^3) per evaluation).
DENSE_MAX_DIM = 256


def default_method(problem) -> AbstractSensitivity:
    """The method ``method="auto"`` (or ``None``) picks, from what the problem says of itself:
    the eigenbasis for quadratic problems, the matrix-free method for finite-data problems above
    ``DENSE_MAX_DIM`` parameters, the dense adjoint otherwise."""
    from .adjoint import DenseAdjoint
    from .eigen import Eigenbasis
    from .matrix_free import MatrixFree

    if problem.is_quadratic:
        return Eigenbasis()
    if problem.is_finite_data and problem.dim > DENSE_MAX_DIM:
        return MatrixFree()
    return DenseAdjoint()


def first_order_parts(problem, *, lr=None, steps, optimizer=None, method=None, rtol=None, atol=None,
                      solver=None, throw: bool = True) -> FirstOrderParts:
    """The schedule-independent parts of the first-order prediction (docs/theory.md §4):
    ``phi_k``, ``F(x_T)`` and the drift-correction term, so that for any schedule
    ``E F(x_K) ~ base_loss + drift + sum_k s_k phi_k w(b_k)`` (plain SGD at rate ``h``:
    ``base_loss + h (correction + sum_k phi_k w(b_k))``).

    Args:
        problem: a jaxsched problem.
        lr: learning rate ``h > 0`` of plain SGD; or give ``optimizer`` (a :class:`jaxsched.SGD`).
        steps: number of steps ``K`` (a Python int: it fixes the output shape).
        method: :class:`jaxsched.DenseAdjoint` (default; any problem), :class:`jaxsched.Eigenbasis`
            (quadratic problems) or :class:`jaxsched.MatrixFree` (finite-data problems, large ``d``);
            the strings ``"dense"``, ``"eigen"``, ``"matrix-free"`` and ``"auto"`` are aliases.
        rtol, atol, solver: ODE solver options (see :func:`jaxsched.expansion`).
        throw: raise on a failed solve or a non-finite ``phi`` (default); with ``throw=False`` the
            outcome is in ``result``.

    Returns:
        :class:`FirstOrderParts`, differentiable in the learning rate(s), the momentum and the
        problem's leaves.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, ``steps <= 0``, a non-problem, or a
            method that cannot handle the problem.
    """
    check_problem(problem)
    steps = check_steps(steps)
    dtype = problem.x0.dtype
    opt = cm.resolve_optimizer(optimizer, lr, dtype)
    method = as_method(method, problem)
    method.check(problem, opt)
    units = cm.step_units(opt, steps, dtype)
    rtol, atol = cm.tolerances(dtype, rtol, atol)
    parts = method.compute(problem, units, steps, rtol, atol, cm.default_solver(solver), throw)
    return parts


def as_method(method, problem) -> AbstractSensitivity:
    """A sensitivity method object from ``method=``/``sensitivity=`` (an object, a string alias or
    ``None`` for the problem's default)."""
    if method is None or (isinstance(method, str) and method == "auto"):
        return default_method(problem)
    if isinstance(method, str):
        from .adjoint import DenseAdjoint
        from .eigen import Eigenbasis
        from .matrix_free import MatrixFree

        aliases = {"dense": DenseAdjoint, "eigen": Eigenbasis, "matrix-free": MatrixFree,
                   "matrix_free": MatrixFree}
        if method not in aliases:
            raise ValueError(
                f"method: must be 'auto', 'dense', 'eigen' or 'matrix-free' or a sensitivity object, "
                f"got {method!r}")
        return aliases[method]()
    if not isinstance(method, AbstractSensitivity):
        raise ValueError(
            "method: expected js.DenseAdjoint(), js.Eigenbasis() or js.MatrixFree(...), got "
            f"{type(method).__name__}")
    return method


def sensitivity(problem, *, lr=None, steps, optimizer=None, method=None, rtol=None, atol=None,
                solver=None, throw: bool = True) -> StepArray:
    """Per-step sensitivities ``phi_k = int_{t_k}^{t_{k+1}} tr(Lam(t) Sigma(x(t))) dt``
    (docs/theory.md §4): ``first_order_parts(...).phi``; see :func:`first_order_parts`.

    ``phi_k`` is the functional derivative of ``J1`` with respect to ``u_k = w(b_k)``, computed by
    the adjoint system ``a' = H a``, ``Lam' = H Lam + Lam H + D3f(x)[a] / 2`` backward from
    ``a(T) = grad F(x_T)``, ``Lam(T) = hess F(x_T) / 2`` (dense method).
    """
    return first_order_parts(problem, lr=lr, steps=steps, optimizer=optimizer, method=method,
                             rtol=rtol, atol=atol, solver=solver, throw=throw).phi


def predicted_loss_from_parts(problem, parts: FirstOrderParts, batch_sizes, lr=None) -> Scalar:
    """``base + drift + sum_k s_k phi_k w(b_k)``: the expansion's prediction through the identity
    that ``J1`` is affine in the noise weights (``lr`` is accepted for backward compatibility and
    ignored: the step sizes are in ``parts``)."""
    w = problem.noise_weight(jnp.asarray(batch_sizes, parts.phi.dtype))
    return parts.base_loss + parts.drift + jnp.sum(parts.weights * w)


def noise_objective(problem, phi: Float[Array, " steps"], batch_sizes) -> Scalar:
    """``sum_k phi_k w(b_k)``: the schedule-dependent part of ``J1``."""
    return jnp.sum(phi * problem.noise_weight(jnp.asarray(batch_sizes, phi.dtype)))
