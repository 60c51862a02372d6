"""The computation of ``jaxsched optimize``: the problem, the optimal schedule, the baselines, the
optional stage compression, and predicted (theory 3) and exact (theory 5.2/5.3) losses; for Adam and
RMSprop the optimum of the moment model (theory 9) and its predicted losses only."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from ._common import Interrupts, UsageError, fmt, library_message
from ._settings import (
    ADAPTIVE_BASELINES,
    DOUBLING_STAGES,
    RAMP_RATIO,
    STEP_FACTORS,
    WARMUP_SHARE,
    Config,
    flagify,
)


# ------------------------------------------------------------------------------------------------
# the problem
# ------------------------------------------------------------------------------------------------
def make_problem(cfg: Config):
    """``(problem, description dict)``; needs x64 set already.

    Raises:
        UsageError: naming the flag, for a bad data set or an lr at which gradient descent diverges.
    """
    import numpy as np

    from .. import datasets

    if cfg.dataset == "diabetes":
        problem = datasets.diabetes_problem()
        info = {
            "name": "diabetes",
            "description": "least squares on scikit-learn's diabetes data, features and target "
            "standardised, x0 = 0, sampling with replacement",
        }
    elif cfg.dataset == "gaussian":
        try:
            problem = datasets.gaussian_problem(**cfg.gaussian)
        except ValueError as e:
            raise UsageError(flagify(str(e))) from None
        info = {
            "name": "gaussian",
            "description": "least squares with Gaussian features a ~ N(0, diag(lam)), "
            "y = a . x_star + e, x_star = ones / sqrt(dim), x0 = 0, online samples",
            **cfg.gaussian,
        }
    else:
        try:
            problem = datasets.csv_problem(cfg.dataset)
        except ValueError as e:
            raise UsageError(f"--dataset: {e}") from None
        info = {
            "name": "csv",
            "path": cfg.dataset,
            "description": "least squares on a CSV file (last column the target), features and "
            "target standardised, x0 = 0, sampling with replacement",
        }
    info["dim"] = int(problem.dim)
    if info["name"] != "gaussian":
        info["num_examples"] = int(problem.num_examples)
    if cfg.adaptive:
        # Adam / RMSprop normalise the step, so gradient descent's lr limit does not apply; a
        # diverging run shows as a non-finite predicted loss (refused naming --lr).
        return problem, info
    hess = np.asarray(problem.hessian(problem.x0), dtype=np.float64)
    lam_max = float(np.linalg.eigvalsh(0.5 * (hess + hess.T))[-1])
    # Full-batch stability on a quadratic (Jury's test of the 2 x 2 recursion per eigenvalue):
    # lr lam < 2 (SGD), 2 (1 + mu) (heavy ball), 2 (1 + mu) / (1 + 2 mu) (Nesterov); every lr
    # schedule peaks at --lr.
    mu = cfg.momentum
    limit = 2.0 * (1.0 + mu) / (1.0 + 2.0 * mu) if cfg.nesterov else 2.0 * (1.0 + mu)
    if cfg.lr * lam_max >= limit:
        which = "Nesterov" if cfg.nesterov else ("heavy-ball" if mu else "gradient descent")
        raise UsageError(
            f"--lr: {cfg.lr:g} is too large for this problem: full-batch {which} diverges when "
            f"lr x largest Hessian eigenvalue >= {limit:.3g} (here {cfg.lr * lam_max:.3g})"
        )
    return problem, info


# ------------------------------------------------------------------------------------------------
# the optimizer and the sensitivity method
# ------------------------------------------------------------------------------------------------
def lr_values(cfg: Config, steps: int, lr: float | None = None):
    """The ``(steps,)`` float64 learning rates of ``--lr-schedule`` with peak ``lr`` (default
    ``--lr``)."""
    import numpy as np
    import optax

    import jaxsched as js

    lr = cfg.lr if lr is None else lr
    if cfg.lr_schedule == "constant":
        return np.full(steps, lr)
    if cfg.lr_schedule == "step":
        return lr * np.asarray(STEP_FACTORS)[(3 * np.arange(steps)) // steps]
    if cfg.lr_schedule == "cosine":
        fn = optax.cosine_decay_schedule(lr, steps)
    else:
        warm = max(1, round(WARMUP_SHARE * steps))
        fn = optax.warmup_cosine_decay_schedule(
            init_value=lr / warm, peak_value=lr, warmup_steps=warm,
            decay_steps=max(steps, warm + 1), end_value=0.0,
        )
    return np.asarray(js.lr_schedule(fn, steps), dtype=np.float64)


def make_optimizer(cfg: Config, steps: int, lr_array=None):
    """The optimizer of the run, with ``--lr`` (a scalar, or the per-step values of
    ``--lr-schedule`` or ``lr_array``): ``js.SGD`` with ``--momentum`` and ``--nesterov``,
    ``js.Adam(lr, b1=--b1, b2=--b2, eps=--eps)`` or ``js.RMSprop(lr, decay=--b2, eps=--eps)``."""
    import jax.numpy as jnp

    import jaxsched as js

    if lr_array is None:
        lr_array = cfg.lr if cfg.lr_schedule == "constant" else jnp.asarray(lr_values(cfg, steps))
    if cfg.optimizer == "adam":
        return js.Adam(lr_array, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.optimizer == "rmsprop":
        return js.RMSprop(lr_array, decay=cfg.b2, eps=cfg.eps)
    return js.SGD(lr_array, momentum=cfg.momentum, nesterov=cfg.nesterov)


def sensitivity_method(cfg: Config):
    """``--sensitivity`` as the library's object (``"auto"`` stays the library's own choice)."""
    import jaxsched as js

    return {
        "auto": "auto",
        "dense": js.DenseAdjoint(),
        "eigen": js.Eigenbasis(),
        "matrix-free": js.MatrixFree(),  # every example: the exact mode
    }[cfg.sensitivity]


def mean_step(optimizer, steps: int) -> float:
    """``mean_k s_k``, the intrinsic step sizes ``lr_k / (1 - mu)`` (theory 7, 8): the factor of the
    drift and noise terms in the predicted loss."""
    import numpy as np

    return float(np.mean(np.asarray(optimizer.step_sizes(steps), dtype=np.float64))) * float(
        optimizer.time_scale
    )


# ------------------------------------------------------------------------------------------------
# computation
# ------------------------------------------------------------------------------------------------
class NotBetterError(Exception):
    """The first-order schedule loses to the constant batch under exact SGD (exit code 3)."""


@dataclass
class Results:
    """Everything the report and the files show (NumPy / Python values)."""

    schedules: dict  # name -> np int array (steps,)
    predicted: dict  # name -> float
    exact: dict  # name -> float | None
    trajectories: dict  # name -> np array (steps + 1,) or None
    phi: Any
    gd_predicted: float
    gd_exact: float | None
    gd_trajectory: Any
    noise: dict  # name -> sum_k phi_k w(b_k)
    compression: dict | None
    iterations: int
    seconds: float = 0.0
    config: Config | None = None  # the run's settings (a budget chooses steps, samples, lr)
    lr_schedule: list = field(default_factory=list)  # per-step learning rates
    warnings: list = field(default_factory=list)
    budget: dict | None = None
    clipped_steps: int | None = 0  # None: no stability clip (Adam / RMSprop)
    #: Adam / RMSprop: the moment model that made every prediction (model, level, covariance,
    #: blocks, L-BFGS outcome); None for SGD.
    moment_model: dict | None = None
    #: Adam / RMSprop: min f, subtracted before the gains are formed (None for SGD).
    loss_floor: float | None = None


def _library_call(cfg: Config, fn, *args, **kwargs):
    """Call the library; its ValueError names an argument (mapped to the flag), its run-time error
    (raised under jit) gets its wrapping removed and says at which lr it happened."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise UsageError(flagify(library_message(e))) from None
    except RuntimeError as e:
        message = library_message(e)
        if "maximum number of solver steps" in message:
            message = (
                "the expansion's ODE solve did not finish (its path or sensitivity diverges); use "
                "a smaller --lr"
            )
        raise UsageError(f"--lr: at lr {cfg.lr:g}: {message}") from None


def optimal(cfg: Config, problem, optimizer, *, steps=None, samples=None, method=None):
    """``(js.optimal_schedule(...), warning messages)`` for the run's settings (``steps``, ``samples``
    and ``method`` override ``cfg``'s); the library's range warnings are collected, not printed."""
    import jaxsched as js

    steps = cfg.steps if steps is None else steps
    samples = cfg.samples if samples is None else samples
    method = cfg.method if method is None else method
    # max_batch = samples is implied by the budget (b_k <= N), so it is the unbounded problem;
    # passing a number either way keeps the compiled code the same with and without a bound.
    hi = samples if cfg.max_batch is None else cfg.max_batch
    iterative = {} if method == "closed_form" else {"max_iter": cfg.max_iter, "progress": not cfg.quiet}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        opt = _library_call(
            cfg,
            js.optimal_schedule,
            problem,
            optimizer=optimizer,
            steps=steps,
            samples=samples,
            min_batch=cfg.min_batch,
            max_batch=hi,
            method=method,
            sensitivity=sensitivity_method(cfg),
            **iterative,
        )
    return opt, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _baselines(cfg: Config) -> dict:
    import jaxsched as js

    bounds = {"min_batch": cfg.min_batch, "max_batch": cfg.max_batch}
    return {
        "constant": js.constant_schedule(cfg.steps, cfg.samples, **bounds),
        "linear_ramp": js.linear_ramp(cfg.steps, cfg.samples, ratio=RAMP_RATIO, **bounds),
        "step_doubling": js.step_doubling(
            cfg.steps, cfg.samples, stages=min(DOUBLING_STAGES, cfg.steps), **bounds
        ),
    }


def _compression(cfg: Config, phi) -> tuple[Any, dict]:
    import jaxsched as js

    b, objective, unconstrained = js.compress_stages(
        phi,
        cfg.samples,
        stages=cfg.stages,
        multiple_of=cfg.multiple_of,
        min_batch=cfg.min_batch,
        max_batch=cfg.max_batch,
    )
    return b, {
        "stages": cfg.stages,
        "multiple_of": cfg.multiple_of,
        "objective": float(objective),
        "unconstrained_objective": float(unconstrained),
        "stage_list": stage_list(b),
    }


def _noise_terms(problem, opt, schedules: dict) -> dict:
    """``sum_k phi_k w(b_k)`` of every schedule (the schedule-dependent part of J1, theory 4)."""
    import jax.numpy as jnp
    import numpy as np

    return {
        k: float(jnp.sum(opt.phi * problem.noise_weight(jnp.asarray(b, opt.phi.dtype))))
        for k, b in schedules.items()
    } | {"optimal": float(np.asarray(opt.objective))}


def _exact_losses(cfg: Config, problem, schedules: dict, optimizer):
    import numpy as np

    import jaxsched as js

    def trajectory(b):
        return np.asarray(_library_call(cfg, js.exact_loss_trajectory, problem, b, optimizer=optimizer))

    trajectories = {k: trajectory(b) for k, b in schedules.items()}
    return trajectories, trajectory(np.full(cfg.steps, np.inf))


_OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "rmsprop": "RMSprop"}


def _check_finite(cfg: Config, what: str, values: dict) -> None:
    bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise UsageError(
            f"--lr: at lr {cfg.lr:g} the {what} of the {bad[0].replace('_', ' ')} schedule is not "
            f"finite ({_OPTIMIZER_NAMES[cfg.optimizer]} diverges: the loss overflows); use a smaller "
            "--lr or a larger --min-batch"
        )


def _check_constant_converges(cfg: Config, constant: float, initial: float) -> None:
    # Exact SGD with the constant batch ending above the initial loss: the lr is too large for the
    # budget whatever the schedule (issue 13.4: at lr 0.49 on diabetes the loss reaches 1e91).
    if constant > initial:
        raise UsageError(
            f"--lr: at lr {cfg.lr:g} exact SGD diverges even with the constant batch (E f(x_K) = "
            f"{fmt(constant, 4)} > f(x_0) = {fmt(initial, 4)}); use a smaller --lr, or more "
            "--samples per step"
        )


def _check_better(cfg: Config, exact: dict) -> None:
    """The rule of issue 13.3: never present as optimal a schedule that exact SGD finds worse than
    the constant batch of the same samples."""
    opt, const = exact["optimal"], exact["constant"]
    if opt is not None and opt > const:
        raise NotBetterError(
            f"the first-order schedule is worse than the constant batch under exact SGD (exact "
            f"E f(x_K) {fmt(opt, 4)} vs {fmt(const, 4)}): at lr {cfg.lr:g} SGD is unstable for "
            f"the small batches it chooses; use a smaller --lr or a larger --min-batch "
            f"(now {cfg.min_batch}); nothing written"
        )


def compute(cfg: Config, problem, progress, interrupts: Interrupts) -> Results:
    """The optimal schedule, the baselines, the optional compression, predicted and exact losses;
    with ``--steps-budget`` or ``--step-time`` first the run's steps, samples and lr
    (:mod:`jaxsched.cli._budgets`).

    Raises:
        UsageError: a library refusal (naming the flag) or a non-finite loss (naming ``--lr``).
        NotBetterError: the rule of :func:`_check_better`.
    """
    from . import _budgets

    t0 = time.perf_counter()
    budget = None
    if cfg.budget != "samples":
        progress.set_description(f"{cfg.budget.replace('_', ' ')} budget")
        cfg, budget = _budgets.choose(cfg, problem, interrupts)
        progress.update()
        interrupts.check()
    run = _compute_adaptive if cfg.adaptive else _compute_run
    res = run(cfg, problem, progress, interrupts)
    res.budget = budget
    res.seconds = time.perf_counter() - t0
    return res


def _compute_run(cfg: Config, problem, progress, interrupts: Interrupts) -> Results:
    import numpy as np

    optimizer = make_optimizer(cfg, cfg.steps)
    progress.set_description(f"optimal schedule ({cfg.method})")
    opt, messages = optimal(cfg, problem, optimizer)
    phi = np.asarray(opt.phi, dtype=np.float64)
    schedules = {"optimal": np.asarray(opt.batch_sizes, dtype=np.int64)}
    progress.update()
    interrupts.check()

    progress.set_description("baselines")
    schedules |= {k: np.asarray(v, dtype=np.int64) for k, v in _baselines(cfg).items()}
    progress.update()
    interrupts.check()

    compression = None
    if cfg.stages is not None:
        progress.set_description("stage compression")
        b, compression = _compression(cfg, phi)
        schedules["compressed"] = np.asarray(b, dtype=np.int64)
        progress.update()
        interrupts.check()

    progress.set_description("predicted and exact losses")
    # J1 is affine in the noise weights: every schedule's prediction is
    # F(x_T) + h (correction + sum_k phi_k w(b_k)); the optimal one is the library's own.
    noise = _noise_terms(problem, opt, schedules)
    s_mean = mean_step(optimizer, cfg.steps)
    base = float(opt.base_loss) + s_mean * float(opt.correction)
    predicted = {k: base + s_mean * v for k, v in noise.items()}
    predicted["optimal"] = float(opt.predicted_loss)
    _check_finite(cfg, "predicted loss", predicted | {"gradient descent": base})
    exact = dict.fromkeys(schedules)
    trajectories = dict.fromkeys(schedules)
    gd_exact = gd_trajectory = None
    if problem.is_quadratic:
        trajectories, gd_trajectory = _exact_losses(cfg, problem, schedules, optimizer)
        exact = {k: float(v[-1]) for k, v in trajectories.items()}
        gd_exact = float(gd_trajectory[-1])
        _check_finite(cfg, "exact loss", exact)
        _check_constant_converges(cfg, exact["constant"], float(gd_trajectory[0]))
        _check_better(cfg, exact)
    progress.update()
    interrupts.check()
    return Results(
        schedules=schedules,
        predicted=predicted,
        exact=exact,
        trajectories=trajectories,
        phi=phi,
        gd_predicted=base,
        gd_exact=gd_exact,
        gd_trajectory=gd_trajectory,
        noise=noise,
        compression=compression,
        iterations=int(opt.iterations),
        config=cfg,
        lr_schedule=[float(v) for v in np.asarray(optimizer.step_sizes(cfg.steps), dtype=np.float64)],
        warnings=messages,
        clipped_steps=int(opt.clipped_steps),
    )


# ------------------------------------------------------------------------------------------------
# Adam / RMSprop (theory 9): the moment model only
# ------------------------------------------------------------------------------------------------
def loss_floor(problem) -> float:
    """``min_x F(x)`` of a quadratic problem: ``F`` at ``x0 - H^+ grad F(x0)`` (least squares, so
    one Newton step from anywhere is exact; the pseudo-inverse handles a singular Hessian)."""
    import jax.numpy as jnp
    import numpy as np

    x0 = problem.x0
    hess = np.asarray(problem.terminal_hessian(x0), dtype=np.float64)
    grad = np.asarray(problem.terminal_gradient(x0), dtype=np.float64)
    step = np.linalg.lstsq(0.5 * (hess + hess.T), grad, rcond=None)[0]
    return float(problem.terminal_value(x0 - jnp.asarray(step, x0.dtype)))


def sgd_sqrt_rule(cfg: Config, problem, optimizer):
    """The square-root rule of plain SGD at the run's per-step learning rates (theory 4), as integers
    with the exact budget: the schedule the adaptive optimiser compares with (theory 9.1)."""
    import jaxsched as js

    phi = _library_call(cfg, js.sensitivity, problem,
                        optimizer=js.SGD(optimizer.step_sizes(cfg.steps)), steps=cfg.steps)
    return _library_call(cfg, js.integer_optimum, phi, cfg.samples, min_batch=cfg.min_batch,
                         max_batch=cfg.max_batch)


def _check_adaptive_better(cfg: Config, predicted: dict) -> None:
    """The rule of :func:`_check_better` with the moment model as the judge (no exact recursion)."""
    opt, const = predicted["optimal"], predicted["constant"]
    if opt > const:
        raise NotBetterError(
            f"the {cfg.optimizer} schedule found through the moment model is worse than the "
            f"constant batch by the model's own prediction (E f(x_K) {fmt(opt, 6)} vs "
            f"{fmt(const, 6)}); raise --max-iter or --min-batch; nothing written"
        )


def _compute_adaptive(cfg: Config, problem, progress, interrupts: Interrupts) -> Results:
    """Adam / RMSprop: the optimum of the moment model (``js.adaptive_optimal_schedule``, L-BFGS
    through the discrete recursion of theory 9.2) and the model's predicted loss of every baseline,
    evaluated by the library in the same call. There are no sensitivities phi_k, no exact losses and
    no gradient-descent trajectory: those fields stay None."""
    import numpy as np

    import jaxsched as js

    optimizer = make_optimizer(cfg, cfg.steps)
    # the library's range warnings go into the report (and schedule.json), not onto stderr
    kinds = (RuntimeWarning, js.UntestedRangeWarning)
    with warnings.catch_warnings(record=True) as messages:
        warnings.simplefilter("always")
        progress.set_description("SGD square-root rule")
        schedules = {k: np.asarray(v, dtype=np.int64) for k, v in _baselines(cfg).items()}
        schedules["sgd_sqrt_rule"] = np.asarray(sgd_sqrt_rule(cfg, problem, optimizer), dtype=np.int64)
        progress.update()
        interrupts.check()

        progress.set_description(f"optimal schedule ({cfg.optimizer})")
        opt = _library_call(
            cfg, js.adaptive_optimal_schedule, problem, optimizer=optimizer, steps=cfg.steps,
            samples=cfg.samples, min_batch=cfg.min_batch, max_batch=cfg.max_batch,
            method="gradient", max_iter=cfg.max_iter, progress=not cfg.quiet,
            baselines={k: schedules[k] for k in ADAPTIVE_BASELINES},
        )
        progress.update()
        interrupts.check()
    notes = [str(w.message) for w in messages if issubclass(w.category, kinds)]

    progress.set_description("predicted losses")
    # The library lists its own constant and square-root schedules first, then the ones passed,
    # in their order: the latter are the integer schedules written to the files.
    losses = np.asarray(opt.baseline_losses, dtype=np.float64)[-len(ADAPTIVE_BASELINES):]
    predicted = {"optimal": float(opt.predicted_loss)} | {
        k: float(v) for k, v in zip(ADAPTIVE_BASELINES, losses, strict=True)
    }
    schedules = {"optimal": np.asarray(opt.batch_sizes, dtype=np.int64)} | schedules
    predicted = {k: predicted[k] for k in schedules}
    _check_finite(cfg, "predicted loss", predicted)
    floor = loss_floor(problem)
    _check_adaptive_better(cfg, predicted)
    progress.update()
    interrupts.check()
    return Results(
        schedules=schedules,
        predicted=predicted,
        exact=dict.fromkeys(schedules),
        trajectories=dict.fromkeys(schedules),
        phi=None,
        gd_predicted=None,
        gd_exact=None,
        gd_trajectory=None,
        noise={},
        compression=None,
        iterations=int(opt.iterations),
        config=cfg,
        lr_schedule=[float(v) for v in np.asarray(optimizer.step_sizes(cfg.steps), dtype=np.float64)],
        warnings=notes,
        clipped_steps=None,
        moment_model={
            "model": opt.model,
            "level": opt.level,
            "covariance": opt.covariance,
            "blocks": int(opt.blocks),
            "method": opt.method,
            "relaxed_loss": float(opt.relaxed_loss),
            "stopped_at_iteration_cap": bool(opt.result == js.RESULTS.max_iterations_reached),
        },
        loss_floor=floor,
    )


def stage_list(b) -> list[dict]:
    """Runs of equal batch sizes: ``[{"batch_size", "first_step", "steps"}, ...]``."""
    out, start = [], 0
    for k in range(1, len(b) + 1):
        if k == len(b) or b[k] != b[start]:
            out.append({"batch_size": int(b[start]), "first_step": start, "steps": k - start})
            start = k
    return out

