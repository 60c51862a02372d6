"""``jaxsched optimize``: the first-order optimal batch-size schedule (theory 4) for a least-squares
problem against constant, linear-ramp and step-doubling schedules of the same sample budget.

Prints a table of predicted (expansion, theory 3) and exact (recursion, theory 5.2/5.3) final
losses and writes ``schedule.json``, ``schedule.csv`` and ``schedule.png`` into ``--out``.

Every argument is checked before any computation; a bad one gives one line ``jaxsched optimize:
error: --flag: what is wrong`` and exit code 2, and nothing is written. A schedule that exact SGD
finds worse than the constant batch is never presented as optimal (exit code 3, nothing written).
Files are written to temporary names in the output folder and renamed only when all are complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._common import (
    EXIT_USAGE,
    Interrupts,
    UsageError,
    fmt,
    library_message,
    progress_bar,
    write_outputs,
)

__all__ = ["EXIT_NOT_BETTER", "add_parser", "run"]

DEFAULT_LR = 0.05
DEFAULT_STEPS = 400
DEFAULT_SAMPLES = 3200
DEFAULT_OUT = "jaxsched-out"
DEFAULT_MAX_ITER = 200
DATASETS = ("diabetes", "gaussian")
GAUSSIAN_DEFAULTS = {"dim": 10, "spectrum": "geometric", "condition": 100.0, "noise": 0.5}
# Baseline family parameters (the library's defaults, restated so the output can show them).
RAMP_RATIO = 8.0
DOUBLING_STAGES = 4
BASELINES = ("constant", "linear_ramp", "step_doubling")
FILES = ("schedule.json", "schedule.csv", "schedule.png")
EXIT_NOT_BETTER = 3

EPILOG = f"""\
exit codes: 0 success; {EXIT_USAGE} bad input, including a learning rate at which the losses
overflow (one line on stderr, nothing written); {EXIT_NOT_BETTER} the first-order schedule is not
better than the constant batch under exact SGD (SGD is unstable at this lr for the small batches it
chooses: nothing written, use a smaller --lr or a larger --min-batch); 130 interrupted (old outputs
left as they were).

compiled programs are cached across runs in the user cache folder ($XDG_CACHE_HOME/jaxsched,
default ~/.cache/jaxsched); --no-cache or the environment variable JAXSCHED_NO_CACHE=1 turns the
cache off."""

# Library error messages start with the argument name; the command line speaks in flags.
FLAGS = {
    "lr": "--lr",
    "steps": "--steps",
    "samples": "--samples",
    "min_batch": "--min-batch",
    "max_batch": "--max-batch",
    "method": "--method",
    "stages": "--stages",
    "multiple_of": "--multiple-of",
    "max_iter": "--max-iter",
    "dim": "--dim",
    "spectrum": "--spectrum",
    "condition": "--condition",
    "noise": "--noise",
}


def flagify(message: str) -> str:
    """``"name: text"`` with a library argument name -> ``"--flag: text"``."""
    name, sep, rest = message.partition(":")
    return f"{FLAGS[name]}:{rest}" if sep and name in FLAGS else message


def _whole_number(text: str) -> int:
    """An argparse type: an integer written as ``3200`` or ``3.2e3``; ``100.5`` is refused, never
    truncated."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}")
    return int(value)


_whole_number.__name__ = "whole number"


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``optimize`` subcommand (handler :func:`run`) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "optimize",
        help="optimal schedule vs baselines on one problem; writes schedule.json/.csv/.png",
        description=(
            "Compute the first-order optimal batch-size schedule for least squares and compare it "
            "with constant, linear-ramp and step-doubling schedules of the same sample budget. "
            f"Defaults: the diabetes data, --lr {DEFAULT_LR}, --steps {DEFAULT_STEPS}, "
            f"--samples {DEFAULT_SAMPLES}."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="diabetes",
        help="'diabetes' (scikit-learn's bundled data, default), 'gaussian' (synthetic) or a "
        "PATH.csv whose last column is the target (features and target get standardised)",
    )
    g = p.add_argument_group("gaussian dataset")
    g.add_argument("--dim", type=_whole_number, help=f"dimension (default {GAUSSIAN_DEFAULTS['dim']})")
    g.add_argument(
        "--spectrum",
        choices=("geometric", "power", "flat"),
        help="shape of the feature covariance's eigenvalues, from 1 down to 1/condition "
        f"(default {GAUSSIAN_DEFAULTS['spectrum']})",
    )
    g.add_argument(
        "--condition",
        type=float,
        help=f"largest / smallest eigenvalue (default {GAUSSIAN_DEFAULTS['condition']:g})",
    )
    g.add_argument("--noise", type=float, help=f"label noise variance (default {GAUSSIAN_DEFAULTS['noise']})")
    p.add_argument("--lr", type=float, help=f"learning rate h (default {DEFAULT_LR})")
    p.add_argument("--steps", type=_whole_number, help=f"number of SGD steps K (default {DEFAULT_STEPS})")
    p.add_argument(
        "--samples",
        type=_whole_number,
        help=f"sample budget N = sum of batch sizes (default {DEFAULT_SAMPLES})",
    )
    p.add_argument("--min-batch", type=_whole_number, default=1, help="smallest batch size (default 1)")
    p.add_argument("--max-batch", type=_whole_number, help="largest batch size (default: unbounded)")
    p.add_argument(
        "--method",
        choices=("closed_form", "gradient", "exact"),
        default="closed_form",
        help="closed_form: square-root rule on phi (default); gradient: L-BFGS through the ODE "
        "expansion (slow, a cross-check); exact: L-BFGS through the exact SGD recursion",
    )
    p.add_argument(
        "--max-iter",
        type=_whole_number,
        help=f"with --method gradient or exact: L-BFGS iteration cap (default {DEFAULT_MAX_ITER}); "
        "the report says when the optimiser stopped at it",
    )
    p.add_argument(
        "--stages",
        type=_whole_number,
        help="also fit the best schedule with at most this many constant stages",
    )
    p.add_argument(
        "--multiple-of",
        type=_whole_number,
        help="with --stages: every stage's batch size is a multiple of this (default 1)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument(
        "--x64",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute in float64 (default; --no-x64 for float32)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------------------
# validation (no computation happens before all of it passed)
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """The checked settings of one run (defaults filled in; ``defaulted`` names those)."""

    dataset: str
    lr: float
    steps: int
    samples: int
    min_batch: int
    max_batch: int | None
    method: str
    max_iter: int
    stages: int | None
    multiple_of: int
    out: str
    x64: bool
    quiet: bool
    defaulted: set = field(default_factory=set)
    gaussian: dict = field(default_factory=dict)


def _check_int(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UsageError(f"{flag}: must be >= {minimum}, got {value}")


def check_config(args: argparse.Namespace) -> Config:
    """The :class:`Config` of parsed arguments.

    Raises:
        UsageError: naming the flag, for any value out of range or any infeasible combination.
    """
    defaulted = set()

    def pick(name, default):
        value = getattr(args, name)
        if value is None:
            defaulted.add(name)
            return default
        return value

    cfg = Config(
        dataset=args.dataset,
        lr=pick("lr", DEFAULT_LR),
        steps=pick("steps", DEFAULT_STEPS),
        samples=pick("samples", DEFAULT_SAMPLES),
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        method=args.method,
        max_iter=pick("max_iter", DEFAULT_MAX_ITER),
        stages=args.stages,
        multiple_of=pick("multiple_of", 1),
        out=args.out,
        x64=args.x64,
        quiet=args.quiet,
        defaulted=defaulted,
    )
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise UsageError(f"--lr: must be a finite number > 0, got {cfg.lr:g}")
    _check_int("--steps", cfg.steps, 1)
    _check_int("--samples", cfg.samples, 1)
    _check_int("--min-batch", cfg.min_batch, 1)
    _check_int("--max-iter", cfg.max_iter, 1)
    if args.max_iter is not None and cfg.method == "closed_form":
        raise UsageError("--max-iter: only applies with --method gradient or exact")
    if cfg.max_batch is not None and cfg.max_batch < cfg.min_batch:
        raise UsageError(f"--max-batch: must be >= --min-batch = {cfg.min_batch}, got {cfg.max_batch}")
    low = cfg.steps * cfg.min_batch
    if cfg.samples < low:
        raise UsageError(
            f"--samples: budget {cfg.samples} is infeasible, below --steps x --min-batch = {low}"
        )
    if cfg.max_batch is not None and cfg.samples > cfg.steps * cfg.max_batch:
        raise UsageError(
            f"--samples: budget {cfg.samples} is infeasible, above --steps x --max-batch = "
            f"{cfg.steps * cfg.max_batch}"
        )
    _check_stages(cfg, args)
    _check_dataset_options(cfg, args)
    return cfg


def _check_stages(cfg: Config, args: argparse.Namespace) -> None:
    if cfg.stages is None:
        if args.multiple_of is not None:
            raise UsageError("--multiple-of: only applies together with --stages")
        return
    _check_int("--stages", cfg.stages, 1)
    m = cfg.multiple_of
    _check_int("--multiple-of", m, 1)
    if cfg.samples % m:
        raise UsageError(f"--samples: must be a multiple of --multiple-of = {m}, got {cfg.samples}")
    # Feasibility of an exact budget with stage sizes m c, c_lo <= c <= c_hi (batch bounds): any
    # M = N/m in [K c_lo, K c_hi] is reached by two stages at levels floor(M/K) and floor(M/K) + 1,
    # so only one stage (or one step) needs K | M.
    hi = cfg.samples if cfg.max_batch is None else cfg.max_batch
    c_lo, c_hi = -(-cfg.min_batch // m), hi // m
    if c_lo > c_hi:
        raise UsageError(
            f"--multiple-of: no multiple of {m} lies in [--min-batch, --max-batch] = [{cfg.min_batch}, {hi}]"
        )
    M, K = cfg.samples // m, cfg.steps
    if not K * c_lo <= M <= K * c_hi:
        raise UsageError(
            f"--samples: with batch sizes multiples of {m} in [{m * c_lo}, {m * c_hi}] the "
            f"budget must lie in [{K * m * c_lo}, {K * m * c_hi}], got {cfg.samples}"
        )
    if min(cfg.stages, K) == 1 and M % K:
        raise UsageError(
            f"--stages: one constant stage of multiples of {m} cannot spend exactly "
            f"{cfg.samples} samples in {K} steps"
        )


def _check_dataset_options(cfg: Config, args: argparse.Namespace) -> None:
    given = [k for k in GAUSSIAN_DEFAULTS if getattr(args, k) is not None]
    if cfg.dataset == "gaussian":
        cfg.gaussian = {k: getattr(args, k) for k in given}
        for k, v in GAUSSIAN_DEFAULTS.items():
            cfg.gaussian.setdefault(k, v)
    elif given:
        raise UsageError(f"{FLAGS[given[0]]}: only applies with --dataset gaussian")
    if cfg.dataset not in DATASETS and not (
        cfg.dataset.lower().endswith(".csv") or os.path.isfile(cfg.dataset)
    ):
        raise UsageError(
            f"--dataset: expected 'diabetes', 'gaussian' or a path to a .csv file, got {cfg.dataset!r}"
        )


def check_out(out: str) -> None:
    """``--out`` must be (or be creatable as) a writable folder. Probes by writing a temporary
    file when the folder exists (permission bits say nothing for root); otherwise checks that the
    nearest existing parent is a writable folder. Creates nothing that stays.

    Raises:
        UsageError: naming ``--out``.
    """
    path = os.path.abspath(out)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"--out: {out} exists and is not a folder")
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise UsageError(f"--out: cannot write into {out} ({e.strerror or e})") from None
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out: cannot create {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out: cannot create {out}: {parent} is not writable")


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
    hess = np.asarray(problem.hessian(problem.x0), dtype=np.float64)
    lam_max = float(np.linalg.eigvalsh(0.5 * (hess + hess.T))[-1])
    if cfg.lr * lam_max >= 2.0:
        raise UsageError(
            f"--lr: {cfg.lr:g} is too large for this problem: gradient descent diverges when "
            f"lr x largest Hessian eigenvalue >= 2 (here {cfg.lr * lam_max:.3g})"
        )
    return problem, info


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


def _optimal(cfg: Config, problem):
    import jaxsched as js

    # max_batch = samples is implied by the budget (b_k <= N), so it is the unbounded problem;
    # passing a number either way keeps the compiled code the same with and without a bound.
    hi = cfg.samples if cfg.max_batch is None else cfg.max_batch
    iterative = {} if cfg.method == "closed_form" else {"max_iter": cfg.max_iter, "progress": not cfg.quiet}
    return _library_call(
        cfg,
        js.optimal_schedule,
        problem,
        lr=cfg.lr,
        steps=cfg.steps,
        samples=cfg.samples,
        min_batch=cfg.min_batch,
        max_batch=hi,
        method=cfg.method,
        **iterative,
    )


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


def _exact_losses(cfg: Config, problem, schedules: dict):
    import numpy as np

    import jaxsched as js

    trajectories = {
        k: np.asarray(_library_call(cfg, js.exact_loss_trajectory, problem, b, lr=cfg.lr))
        for k, b in schedules.items()
    }
    gd = np.asarray(
        _library_call(cfg, js.exact_loss_trajectory, problem, np.full(cfg.steps, np.inf), lr=cfg.lr)
    )
    return trajectories, gd


def _check_finite(cfg: Config, what: str, values: dict) -> None:
    bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
    if bad:
        raise UsageError(
            f"--lr: at lr {cfg.lr:g} the {what} of the {bad[0].replace('_', ' ')} schedule is not "
            f"finite (SGD diverges: the loss overflows); use a smaller --lr or a larger --min-batch"
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
    """The optimal schedule, the baselines, the optional compression, predicted and exact losses.

    Raises:
        UsageError: a library refusal (naming the flag) or a non-finite loss (naming ``--lr``).
        NotBetterError: the rule of :func:`_check_better`.
    """
    import numpy as np

    t0 = time.perf_counter()
    progress.set_description(f"optimal schedule ({cfg.method})")
    opt = _optimal(cfg, problem)
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
    base = float(opt.base_loss) + cfg.lr * float(opt.correction)
    predicted = {k: base + cfg.lr * v for k, v in noise.items()}
    predicted["optimal"] = float(opt.predicted_loss)
    _check_finite(cfg, "predicted loss", predicted | {"gradient descent": base})
    exact = dict.fromkeys(schedules)
    trajectories = dict.fromkeys(schedules)
    gd_exact = gd_trajectory = None
    if problem.is_quadratic:
        trajectories, gd_trajectory = _exact_losses(cfg, problem, schedules)
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
        seconds=time.perf_counter() - t0,
    )


def stage_list(b) -> list[dict]:
    """Runs of equal batch sizes: ``[{"batch_size", "first_step", "steps"}, ...]``."""
    out, start = [], 0
    for k in range(1, len(b) + 1):
        if k == len(b) or b[k] != b[start]:
            out.append({"batch_size": int(b[start]), "first_step": start, "steps": k - start})
            start = k
    return out


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _gain(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def _stopped_at_cap(cfg: Config, res: Results) -> bool:
    return cfg.method != "closed_form" and res.iterations >= cfg.max_iter


def payload(cfg: Config, info: dict, res: Results) -> dict:
    """The content of ``schedule.json``."""
    return {
        "problem": info,
        "lr": cfg.lr,
        "steps": cfg.steps,
        "samples": cfg.samples,
        "min_batch": cfg.min_batch,
        "max_batch": cfg.max_batch,
        "x64": cfg.x64,
        "method": cfg.method,
        "iterations": res.iterations,
        "max_iter": None if cfg.method == "closed_form" else cfg.max_iter,
        "stopped_at_iteration_cap": _stopped_at_cap(cfg, res),
        "schedules": {
            name: {
                "batch_sizes": [int(v) for v in b],
                "predicted_loss": _finite_or_none(res.predicted[name]),
                "exact_loss": _finite_or_none(res.exact[name]),
            }
            for name, b in res.schedules.items()
        },
        "gradient_descent_loss": {
            "predicted": _finite_or_none(res.gd_predicted),
            "exact": _finite_or_none(res.gd_exact),
        },
        "baseline_parameters": {
            "linear_ramp": {"ratio": RAMP_RATIO},
            "step_doubling": {"stages": min(DOUBLING_STAGES, cfg.steps)},
        },
        "stage_compression": res.compression,
        "phi": [float(v) for v in res.phi],
    }


def csv_text(res: Results) -> str:
    """The content of ``schedule.csv``: one row per step, one column per schedule."""
    names = list(res.schedules)
    lines = [",".join(["step", *names])]
    steps = len(res.schedules["optimal"])
    for k in range(steps):
        lines.append(",".join([str(k), *(str(int(res.schedules[n][k])) for n in names)]))
    return "\n".join(lines) + "\n"


_STYLE = {
    "optimal": {"color": "C3", "lw": 2.2, "zorder": 5},
    "constant": {"color": "C0", "lw": 1.4},
    "linear_ramp": {"color": "C2", "lw": 1.4},
    "step_doubling": {"color": "C1", "lw": 1.4},
    "compressed": {"color": "C4", "lw": 1.6, "ls": "--", "zorder": 6},
}


def write_png(path: str, cfg: Config, info: dict, res: Results) -> None:
    """The figure ``schedule.png``: schedules, exact losses and their excess (quadratic problems)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    quadratic = res.gd_trajectory is not None
    fig = Figure(figsize=(13.5 if quadratic else 6, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if quadratic else 1, squeeze=False)[0]
    steps = np.arange(cfg.steps)
    for name, b in res.schedules.items():
        axes[0].step(steps, b, where="post", label=name.replace("_", " "), **_STYLE.get(name, {}))
    axes[0].set(xlabel="step k", ylabel="batch size $b_k$", title="batch-size schedules")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    if quadratic:
        k = np.arange(cfg.steps + 1)
        axes[1].plot(k, res.gd_trajectory, color="k", lw=1, ls=":", label="gradient descent")
        for name, tr in res.trajectories.items():
            excess = tr - res.gd_trajectory
            style = _STYLE.get(name, {})
            axes[1].plot(k, tr, label=name.replace("_", " "), **style)
            axes[2].plot(k[1:], np.maximum(excess[1:], 1e-300), **style)
        axes[1].set(xlabel="step k", ylabel="$E\\,f(x_k)$ (exact)", title="expected loss")
        axes[1].legend(fontsize=8)
        axes[2].set(
            xlabel="step k",
            ylabel="$E\\,f(x_k) - f(x_k^{GD})$",
            title="excess over gradient descent (noise)",
        )
        axes[2].set_yscale("log")
    fig.suptitle(f"{info['name']}: lr = {cfg.lr:g}, {cfg.steps} steps, {cfg.samples} samples", fontsize=11)
    fig.savefig(path, format="png", dpi=110)


def _text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return write


def _fmt_gain(x: float | None) -> str:
    return "-" if x is None else f"{fmt(x, 3)}x"


def _table(res: Results) -> list[str]:
    head = (
        "schedule",
        "predicted E f(x_K)",
        "exact E f(x_K)",
        "exact excess",
        "gain (exact)",
        "gain (predicted)",
    )
    rows = []
    opt_excess = None if res.gd_exact is None else res.exact["optimal"] - res.gd_exact
    for name in res.schedules:
        excess = None if res.gd_exact is None else res.exact[name] - res.gd_exact
        is_opt = name == "optimal"
        rows.append(
            (
                name,
                fmt(res.predicted[name]),
                fmt(res.exact[name]),
                fmt(excess, 4),
                "-" if is_opt else _fmt_gain(_gain(excess, opt_excess)),
                "-" if is_opt else _fmt_gain(_gain(res.noise[name], res.noise["optimal"])),
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    def line(r):
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    return [line(r) for r in [head, *rows]]


def report(cfg: Config, info: dict, res: Results, written: list[str]) -> str:
    """The text printed after a successful run (every number in ``%g`` style)."""

    def dflt(name):
        return " (default)" if name in cfg.defaulted else ""

    bound = "unbounded" if cfg.max_batch is None else str(cfg.max_batch)
    if "num_examples" in info:
        size = f"{info['num_examples']} examples x {info['dim']} features"
    else:
        size = (
            f"dim {info['dim']}, {info['spectrum']} spectrum, condition {info['condition']:g}, "
            f"noise variance {info['noise']:g}"
        )
    settings = (
        f"settings lr {cfg.lr:g}{dflt('lr')}, steps {cfg.steps}{dflt('steps')}, "
        f"samples {cfg.samples}{dflt('samples')}, batch sizes in [{cfg.min_batch}, {bound}], "
        f"method {cfg.method}, {'float64' if cfg.x64 else 'float32'}"
    )
    baselines = (
        f"baselines constant; linear ramp (last/first = {RAMP_RATIO:g}); step doubling "
        f"({min(DOUBLING_STAGES, cfg.steps)} stages); same samples and bounds"
    )
    lines = [f"problem  {info['name']}: {info['description']} ({size})", settings, baselines, ""]
    lines += _table(res)
    lines += [
        "",
        f"gradient descent (exact gradients, same lr and steps): f(x_K) = {fmt(res.gd_exact)} "
        f"exact, {fmt(res.gd_predicted)} predicted",
        "exact excess = E f(x_K) minus gradient descent's f(x_K): the loss due to gradient noise",
        "gain = the schedule's excess / the optimal schedule's excess (> 1: the optimal one "
        "wins); predicted gain = ratio of sum_k phi_k / b_k",
    ]
    if cfg.method != "closed_form":
        if _stopped_at_cap(cfg, res):
            lines.append(
                f"note: L-BFGS stopped at its iteration cap ({res.iterations} of --max-iter "
                f"{cfg.max_iter}) before meeting its tolerance: the schedule may not be fully "
                "optimised (raise --max-iter)"
            )
        else:
            lines.append(f"L-BFGS converged in {res.iterations} iterations (cap {cfg.max_iter})")
    if res.compression is not None:
        c = res.compression
        stages = ", ".join(f"{s['batch_size']} x {s['steps']}" for s in c["stage_list"])
        lines += [
            "",
            f"stage compression (at most {c['stages']} stages, batch sizes multiples of "
            f"{c['multiple_of']}): sum_k phi_k / b_k = {fmt(c['objective'])} vs "
            f"{fmt(c['unconstrained_objective'])} unconstrained "
            f"({_fmt_gain(_gain(c['objective'], c['unconstrained_objective']))})",
            f"  stages (batch size x steps): {stages}",
        ]
    lines += ["", f"computed in {res.seconds:.1f} s; wrote {', '.join(written)}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """The ``optimize`` handler: check, compute, write, report; returns the exit code.

    Raises:
        UsageError: a bad argument or input (exit 2; nothing written).
        KeyboardInterrupt: on SIGINT (old outputs intact).
    """
    cfg = check_config(args)
    problem, info = make_problem(cfg)
    check_out(cfg.out)
    interrupts.check()
    progress = progress_bar(4 + (cfg.stages is not None), cfg.quiet)
    try:
        try:
            res = compute(cfg, problem, progress, interrupts)
        except NotBetterError as e:
            progress.close()
            print(f"jaxsched optimize: {e}", file=sys.stderr)
            return EXIT_NOT_BETTER
        progress.set_description("writing files")
        text = json.dumps(payload(cfg, info, res), indent=1, allow_nan=False) + "\n"
        writers = {
            "schedule.json": _text_writer(text),
            "schedule.csv": _text_writer(csv_text(res)),
            "schedule.png": lambda path: write_png(path, cfg, info, res),
        }
        try:
            written = write_outputs(cfg.out, writers, interrupts)
        except OSError as e:  # disk full, folder removed meanwhile: nothing was renamed
            raise UsageError(f"--out: cannot write into {cfg.out} ({e.strerror or e})") from None
        progress.update()
    finally:
        progress.close()
    if interrupts.pending:  # arrived while the finished files were renamed into place
        raise KeyboardInterrupt(" after the new outputs were written")
    if not cfg.quiet:
        print(report(cfg, info, res, written))
    return 0
