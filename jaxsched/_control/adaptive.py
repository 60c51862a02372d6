"""The optimal batch schedule for Adam and RMSprop by gradient descent through the moment model
(docs/theory.md §9.4).

There is no closed form (§9.1): the batch size moves the preconditioner, so the expected loss is not
affine in ``1/b``. The schedule is parametrised by blocks of equal length ``L`` whose mean batch
sizes come from :func:`jaxsched.free_form_batch_sizes` (a softmax, or a sigmoid with a solved shift
when ``max_batch`` is given), so ``sum_k b_k = samples`` and ``min_batch <= b_k <= max_batch`` hold
by construction; L-BFGS (optimistix) minimises the model's predicted loss on autodiff gradients
through the ``lax.scan`` of §9.2 (or diffrax for §9.3). Integers: the model's loss linearised in
``u_k = 1/b_k`` at the real optimum ``beta`` has weights ``phi_k = dL/du_k``, and at an interior
optimum ``beta_k = sqrt(phi_k / nu)``, so the exact integer optimum of that linearisation
(:func:`jaxsched.integer_optimum`) is the integer schedule nearest to ``beta`` in the model's own
metric, with the exact budget.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._expansion import _common as cm
from .._expansion.adaptive import (
    COVARIANCES,
    MODELS,
    _check_choice,
    _check_no_lr,
    _check_optimizer,
    _model_core,
    warn_untested_range,
)
from .._expansion.sensitivity import sensitivity
from .._misc import check_steps
from .._optimizer import SGD
from .._problem.base import check_problem
from .._solution import RESULTS
from .._types import Array, Int, IntStepArray, Scalar, StepArray
from . import allocation as alloc, free_form as ff
from .optimal import _budget, _lbfgs
from .progress import NoProgress, ProgressMeter, TqdmProgress

__all__ = ["AdaptiveSchedule", "adaptive_optimal_schedule"]


class AdaptiveSchedule(eqx.Module):
    """The optimal schedule for Adam / RMSprop and what the model predicts it is worth.

    Attributes:
        batch_sizes: ``(steps,)`` integer batch sizes, ``sum == samples``, within the bounds.
        beta: ``(steps,)`` the real-valued optimum of the model before rounding.
        predicted_loss: the model's ``E F(x_K)`` for ``batch_sizes``.
        relaxed_loss: the model's ``E F(x_K)`` for ``beta``.
        baseline_names: names of the schedules compared against (``"constant"``,
            ``"sgd_sqrt_rule"`` — the square-root rule of plain SGD at the same learning rate,
            docs/theory.md §4 — and those passed as ``baselines=``).
        baseline_losses: the model's ``E F(x_K)`` for each of them, in that order.
        loss_floor: the value subtracted before forming ratios (see :attr:`gains`).
        iterations: L-BFGS iterations.
        blocks: number of blocks of the parametrisation.
        result: a :class:`jaxsched.RESULTS` code.
        model: ``"discrete"`` or ``"continuous"``; level: ``"L1"``; covariance: ``"full"`` or
            ``"diagonal"``; method: ``"adaptive_gradient"``.
    """

    batch_sizes: IntStepArray
    beta: StepArray
    predicted_loss: Scalar
    relaxed_loss: Scalar
    baseline_losses: Array
    loss_floor: Scalar
    iterations: Int[Array, ""]
    result: RESULTS
    baseline_names: tuple[str, ...] = eqx.field(static=True, default=())
    blocks: int = eqx.field(static=True, default=1)
    model: str = eqx.field(static=True, default="discrete")
    level: str = eqx.field(static=True, default="L1")
    covariance: str = eqx.field(static=True, default="full")
    method: str = eqx.field(static=True, default="adaptive_gradient")

    @property
    def gains(self) -> dict[str, float]:
        """``(baseline - floor) / (optimum - floor)`` per baseline: the predicted factor by which
        the optimum lowers the excess loss (> 1 means the optimum is better)."""
        opt = float(self.predicted_loss - self.loss_floor)
        return {name: float(v - self.loss_floor) / opt
                for name, v in zip(self.baseline_names, np.asarray(self.baseline_losses),
                                   strict=True)}

    @property
    def ratios(self) -> dict[str, float]:
        """``(optimum - floor) / (baseline - floor)``: the optimum's excess loss relative to each
        baseline's (the form of the table in docs/theory.md §9.4)."""
        return {name: 1.0 / g for name, g in self.gains.items()}

    def summary(self) -> str:
        """One line per baseline: the model, its level and the predicted ratio."""
        head = (f"optimal schedule by gradient descent through the {self.model} moment model "
                f"(level {self.level}, {self.covariance} covariance), {int(self.iterations)} "
                f"L-BFGS iterations; predicted loss {float(self.predicted_loss):.6g}")
        rows = [f"  vs {n}: predicted excess-loss ratio {r:.3f}" for n, r in self.ratios.items()]
        return "\n".join([head, *rows])


def _block_count(steps: int, blocks: int) -> int:
    """The largest divisor of ``steps`` not above ``blocks`` (blocks of equal length)."""
    return max(q for q in range(1, min(blocks, steps) + 1) if steps % q == 0)


def _expand(theta, length, samples, lo, hi):
    """Per-step batch sizes: block means from the free-form map, each repeated ``length`` times."""
    means = ff._free_core(theta, samples / length, lo, hi)
    return jnp.repeat(means, length)


def _block_optimum(loss, steps: int, length: int, s, lo, hi, dtype, max_iter: int, gtol, meter):
    """The traced optimisation shared by :func:`adaptive_optimal_schedule` and the sweep: L-BFGS
    over the block parameters from the constant schedule, on ``loss(b) -> AdaptiveExpansion``.

    Returns ``(beta, phi_seen, iterations, result)``: the real optimum, the model's loss linearised
    in ``u_k = 1 / b_k`` at it (``phi_seen = dL/du``, the weights of the integer step) and L-BFGS's
    iteration count and result code. ``hi = None`` selects the softmax parametrisation."""
    theta0 = jnp.zeros(steps // length, dtype)  # the constant schedule
    b_const = _expand(theta0, length, s, lo, hi)
    # Objective: the change from the constant schedule in units of its noise term, an O(1)
    # number whatever the loss floor (a full-batch floor is no reference: full-batch RMSprop can
    # end above the noisy constant schedule).
    start = jax.lax.stop_gradient(loss(b_const))
    scale = jnp.where(start.noise_term > 0, start.noise_term, jnp.abs(start.predicted_loss) + 1.0)

    def objective(theta):
        return (loss(_expand(theta, length, s, lo, hi)).predicted_loss - start.predicted_loss) / scale

    theta, iterations, result = _lbfgs(objective, theta0, max_iter, gtol, meter)
    beta = _expand(theta, length, s, lo, hi)
    phi_seen = jax.grad(lambda u: loss(1.0 / u).predicted_loss)(1.0 / beta)
    return beta, phi_seen, iterations, result


@eqx.filter_jit
def _adaptive_core(problem, opt, budget, baselines, phi_sgd, length, model, covariance, rtol, atol,
                   solver, max_iter, gtol, meter):
    steps = phi_sgd.shape[0]
    dtype = phi_sgd.dtype
    s, lo, hi = budget.samples, budget.lo, budget.hi

    def loss(b, throw=False):
        return _model_core(problem, b, opt, model, covariance, rtol, atol, solver, throw)

    beta, phi_seen, iterations, result = _block_optimum(loss, steps, length, s, lo, hi, dtype,
                                                        max_iter, gtol, meter)
    b = alloc.integer_optimum(jnp.maximum(phi_seen, 0.0), s, min_batch=lo, max_batch=hi)
    b_sqrt = alloc.integer_optimum(phi_sgd, s, min_batch=lo, max_batch=hi)
    named = jnp.stack([jnp.full(steps, s / steps, dtype), b_sqrt.astype(dtype)]
                      + [x.astype(dtype) for x in baselines])
    base_losses = jax.vmap(lambda bb: loss(bb).predicted_loss)(named)
    final = loss(b.astype(dtype))
    return b, beta, final.predicted_loss, loss(beta).predicted_loss, base_losses, iterations, \
        RESULTS.where(final.result == RESULTS.successful, result, final.result)


def adaptive_optimal_schedule(
    problem,
    *,
    optimizer,
    steps: int,
    samples,
    min_batch=1,
    max_batch=None,
    lr=None,
    method="gradient",
    blocks: int = 50,
    model: str = "discrete",
    covariance: str = "full",
    baselines: dict | None = None,
    loss_floor=0.0,
    rtol=None,
    atol=None,
    solver=None,
    max_iter: int = 100,
    gtol: float = 1e-8,
    progress=False,
    throw: bool = True,
) -> AdaptiveSchedule:
    """The batch schedule minimising the moment model's expected final loss of Adam / RMSprop for
    a sample budget (docs/theory.md §9.4).

    Args:
        problem: a jaxsched problem.
        optimizer: :class:`jaxsched.Adam` or :class:`jaxsched.RMSprop`.
        steps: number of steps ``K`` (Python int).
        samples: budget ``N`` with ``K min_batch <= N <= K max_batch``.
        min_batch, max_batch: bounds on every batch size.
        lr: must be ``None`` (the optimizer holds its learning rate).
        method: ``"gradient"`` (default). ``"closed_form"`` (the default of
            :func:`jaxsched.optimal_schedule`) and ``"exact"`` are accepted as aliases, so that
            ``optimal_schedule(..., optimizer=js.Adam(...))`` forwards here: Adam has no closed
            form (§9.1), and the discrete recursion used by default is the exact-in-``b1, b2``
            reference. A control object is refused.
        blocks: blocks of the parametrisation (default 50; the largest divisor of ``steps`` not
            above it is used, so blocks have equal length).
        model: ``"discrete"`` (default: the recursion of §9.2, exact in ``b1``, ``b2``, ``eps`` and
            the bias correction, and on a CPU about 100x cheaper to differentiate than the ODE) or
            ``"continuous"`` (the diffrax form of §9.3).
        covariance: ``"full"`` (default) or ``"diagonal"`` (experimental).
        baselines: optional ``{name: (steps,) batch sizes}`` to compare with, besides the constant
            schedule and the SGD square-root rule (e.g. ``js.linear_ramp``, ``js.step_doubling``).
        loss_floor: subtracted from every loss before the ratios of :attr:`AdaptiveSchedule.gains`
            (e.g. ``noise_var / 2`` for linear regression, so ratios are of excess losses).
        rtol, atol, solver: options of the continuous form.
        max_iter, gtol: L-BFGS iteration cap and tolerance (on the normalised objective).
        progress: ``True`` for a tqdm bar, or a progress meter object.
        throw: raise when the optimisation or a solve fails (hitting ``max_iter`` is reported in
            ``result``, not raised).

    Returns:
        An :class:`AdaptiveSchedule`.

    Raises:
        ValueError: naming the argument, for a non-adaptive ``optimizer``, ``steps <= 0``, an
            infeasible budget, bad ``blocks``, ``model``, ``covariance``, ``baselines`` or
            ``progress``.

    Warns:
        UntestedRangeWarning: outside the tested range of §9.
    """
    check_problem(problem)
    _check_optimizer(optimizer)
    _check_no_lr(lr)
    if not isinstance(method, str) or method not in ("gradient", "closed_form", "exact"):
        raise ValueError(f"method: Adam/RMSprop schedules are found by gradient descent through the "
                         f"moment model; method must be 'gradient', got {method!r}")
    steps = check_steps(steps)
    model = _check_choice("model", model, MODELS)
    covariance = _check_choice("covariance", covariance, COVARIANCES)
    if isinstance(blocks, bool) or not isinstance(blocks, (int, np.integer)) or blocks < 1:
        raise ValueError(f"blocks: must be an int >= 1, got {blocks!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter: must be an int >= 1, got {max_iter!r}")
    dtype = problem.x0.dtype
    opt = optimizer.astype(dtype)
    rates = opt.step_sizes(steps)
    budget = _budget(problem, steps, samples, min_batch, max_batch, dtype)
    baselines = {} if baselines is None else dict(baselines)
    arrays = []
    for name, b in baselines.items():
        arr = jnp.asarray(b, dtype)
        if arr.shape != (steps,):
            raise ValueError(f"baselines: {name!r} must have shape ({steps},), got {arr.shape}")
        arrays.append(arr)
    warn_untested_range(problem, opt, covariance)
    phi_sgd = sensitivity(problem, optimizer=SGD(rates), steps=steps, throw=throw)
    rtol, atol = cm.tolerances(dtype, rtol, atol)
    solver = cm.default_solver(solver)
    meter = TqdmProgress() if progress is True else (NoProgress() if progress is False else progress)
    if not isinstance(meter, ProgressMeter):
        raise ValueError(f"progress: must be a bool or a progress meter, got {type(progress).__name__}")
    length = steps // _block_count(steps, int(blocks))
    with meter.session(total=int(max_iter), desc=f"optimal_schedule[{opt.__class__.__name__}]") as live:
        b, beta, pred, relaxed, base_losses, it, result = jax.block_until_ready(_adaptive_core(
            problem, opt, budget, tuple(arrays), phi_sgd.astype(dtype), length, model, covariance,
            rtol, atol, solver, int(max_iter), jnp.asarray(gtol, dtype), live))
    out = AdaptiveSchedule(
        batch_sizes=b, beta=beta, predicted_loss=pred, relaxed_loss=relaxed,
        baseline_losses=base_losses, loss_floor=jnp.asarray(loss_floor, dtype), iterations=it,
        result=result, baseline_names=("constant", "sgd_sqrt_rule", *baselines.keys()),
        blocks=steps // length, model=model, covariance=covariance)
    if throw:
        out = out.result.error_if(out, (out.result != RESULTS.successful)
                                  & (out.result != RESULTS.max_iterations_reached))
    return out
