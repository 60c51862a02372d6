"""The ``jaxsched`` command line.

``jaxsched optimize`` computes the first-order optimal batch-size schedule (theory 4) for a least-squares
problem, compares it with constant, linear-ramp and step-doubling schedules of the same sample budget,
prints a table of predicted (expansion, theory 3) and exact (recursion, theory 5.2/5.3) final losses and
writes ``schedule.json``, ``schedule.csv`` and ``schedule.png`` into ``--out``.

Conventions: every argument is checked before any computation; a bad one gives a single line
``jaxsched optimize: error: --flag: what is wrong`` on stderr and exit code 2, and nothing is written.
Files are written to temporary names in the output folder and renamed only when all of them are
complete. Other subcommands plug in through a module ``jaxsched._sweep_cli`` with
``add_parser(subparsers)`` that registers a subparser with ``set_defaults(func=handler)``; the handler
takes the parsed namespace and returns an exit code (``None`` means 0); a ``ValueError`` it raises is
reported like a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["main"]

DEFAULT_LR = 0.05
DEFAULT_STEPS = 400
DEFAULT_SAMPLES = 3200
DEFAULT_OUT = "jaxsched-out"
DATASETS = ("diabetes", "gaussian")
GAUSSIAN_DEFAULTS = {"dim": 10, "spectrum": "geometric", "condition": 100.0, "noise": 0.5}
# Baseline family parameters (the library's defaults, restated so the output can show them).
RAMP_RATIO = 8.0
DOUBLING_STAGES = 4
BASELINES = ("constant", "linear_ramp", "step_doubling")
FILES = ("schedule.json", "schedule.csv", "schedule.png")

# Library error messages start with the argument name; the command line speaks in flags.
_FLAGS = {
    "lr": "--lr",
    "steps": "--steps",
    "samples": "--samples",
    "min_batch": "--min-batch",
    "max_batch": "--max-batch",
    "method": "--method",
    "stages": "--stages",
    "multiple_of": "--multiple-of",
    "dim": "--dim",
    "spectrum": "--spectrum",
    "condition": "--condition",
    "noise": "--noise",
}


class UsageError(ValueError):
    """A bad command line: reported as one line, exit code 2. ``prog`` names the (sub)command
    whose parser found it, when known."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """``argparse`` that raises instead of printing a usage block and exiting, so that every bad
    argument ends as one line on stderr."""

    def error(self, message: str):
        raise UsageError(message, prog=self.prog)


def _flagify(message: str) -> str:
    name, sep, rest = message.partition(":")
    return f"{_FLAGS[name]}:{rest}" if sep and name in _FLAGS else message


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxsched",
        description="Optimal batch-size schedules for SGD from the O(h) expansion of its diffusion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_optimize(sub)
    from . import sweep as _sweep_cmd

    _sweep_cmd.add_parser(sub)
    return parser


def _add_optimize(sub) -> None:
    p = sub.add_parser(
        "optimize",
        help="optimal schedule vs baselines on one problem; writes schedule.json/.csv/.png",
        description=(
            "Compute the first-order optimal batch-size schedule for least squares and compare it "
            "with constant, linear-ramp and step-doubling schedules of the same sample budget. "
            f"Defaults: the diabetes data, --lr {DEFAULT_LR}, --steps {DEFAULT_STEPS}, "
            f"--samples {DEFAULT_SAMPLES}."
        ),
    )
    p.add_argument(
        "--dataset",
        default="diabetes",
        help="'diabetes' (scikit-learn's bundled data, default), 'gaussian' (synthetic) or a "
        "PATH.csv whose last column is the target (features and target get standardised)",
    )
    g = p.add_argument_group("gaussian dataset")
    g.add_argument("--dim", type=int, help=f"dimension (default {GAUSSIAN_DEFAULTS['dim']})")
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
    p.add_argument("--steps", type=int, help=f"number of SGD steps K (default {DEFAULT_STEPS})")
    p.add_argument(
        "--samples",
        type=int,
        help=f"sample budget N = sum of batch sizes (default {DEFAULT_SAMPLES})",
    )
    p.add_argument("--min-batch", type=int, default=1, help="smallest batch size (default 1)")
    p.add_argument("--max-batch", type=int, help="largest batch size (default: unbounded)")
    p.add_argument(
        "--method",
        choices=("closed_form", "gradient", "exact"),
        default="closed_form",
        help="closed_form: square-root rule on phi (default); gradient: L-BFGS through the ODE "
        "expansion (slow, a cross-check); exact: L-BFGS through the exact SGD recursion",
    )
    p.add_argument(
        "--stages",
        type=int,
        help="also fit the best schedule with at most this many constant stages",
    )
    p.add_argument(
        "--multiple-of",
        type=int,
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
    p.set_defaults(func=_run_optimize)


# ------------------------------------------------------------------------------------------------
# validation (no computation happens before all of it passed)
# ------------------------------------------------------------------------------------------------
@dataclass
class _Config:
    dataset: str
    lr: float
    steps: int
    samples: int
    min_batch: int
    max_batch: int | None
    method: str
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


def _check_config(args: argparse.Namespace) -> _Config:
    defaulted = set()

    def pick(name, default):
        value = getattr(args, name)
        if value is None:
            defaulted.add(name)
            return default
        return value

    cfg = _Config(
        dataset=args.dataset,
        lr=pick("lr", DEFAULT_LR),
        steps=pick("steps", DEFAULT_STEPS),
        samples=pick("samples", DEFAULT_SAMPLES),
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        method=args.method,
        stages=args.stages,
        multiple_of=pick("multiple_of", 1),
        out=args.out,
        x64=args.x64,
        quiet=args.quiet,
        defaulted=defaulted,
    )
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise UsageError(f"--lr: must be a finite number > 0, got {cfg.lr}")
    _check_int("--steps", cfg.steps, 1)
    _check_int("--samples", cfg.samples, 1)
    _check_int("--min-batch", cfg.min_batch, 1)
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


def _check_stages(cfg: _Config, args: argparse.Namespace) -> None:
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


def _check_dataset_options(cfg: _Config, args: argparse.Namespace) -> None:
    given = [k for k in GAUSSIAN_DEFAULTS if getattr(args, k) is not None]
    if cfg.dataset == "gaussian":
        cfg.gaussian = {k: getattr(args, k) for k in given}
        for k, v in GAUSSIAN_DEFAULTS.items():
            cfg.gaussian.setdefault(k, v)
    elif given:
        raise UsageError(f"{_FLAGS[given[0]]}: only applies with --dataset gaussian")
    if cfg.dataset not in DATASETS and not (
        cfg.dataset.lower().endswith(".csv") or os.path.isfile(cfg.dataset)
    ):
        raise UsageError(
            f"--dataset: expected 'diabetes', 'gaussian' or a path to a .csv file, got {cfg.dataset!r}"
        )


def _check_out(out: str) -> None:
    """``--out`` must be (or be creatable as) a writable folder. Probes by writing a temporary
    file when the folder exists (permission bits say nothing for root); otherwise checks that the
    nearest existing parent is a writable folder. Creates nothing that stays."""
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
def _make_problem(cfg: _Config):
    """(problem, description dict, largest Hessian eigenvalue). Needs x64 already set."""
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
            raise UsageError(_flagify(str(e))) from None
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
    if hasattr(problem, "num_examples"):
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
@dataclass
class _Results:
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
    seconds: float = 0.0


def _compute(cfg: _Config, problem, progress) -> _Results:
    import jax.numpy as jnp
    import numpy as np

    import jaxsched as js

    t0 = time.perf_counter()
    bounds = {"min_batch": cfg.min_batch, "max_batch": cfg.max_batch}
    # max_batch = samples is implied by the budget (b_k <= N), so it is the unbounded problem;
    # passing a number either way keeps the compiled code the same with and without a bound.
    hi = cfg.samples if cfg.max_batch is None else cfg.max_batch

    progress.set_description(f"optimal schedule ({cfg.method})")
    opt = js.optimal_schedule(
        problem,
        lr=cfg.lr,
        steps=cfg.steps,
        samples=cfg.samples,
        min_batch=cfg.min_batch,
        max_batch=hi,
        method=cfg.method,
        # L-BFGS iterations get their own bar (the iterative methods are the long work).
        **({} if cfg.method == "closed_form" else {"progress": not cfg.quiet}),
    )
    schedules = {"optimal": np.asarray(opt.batch_sizes, dtype=np.int64)}
    phi = np.asarray(opt.phi, dtype=np.float64)
    progress.update()

    progress.set_description("baselines")
    schedules["constant"] = js.constant_schedule(cfg.steps, cfg.samples, **bounds)
    schedules["linear_ramp"] = js.linear_ramp(cfg.steps, cfg.samples, ratio=RAMP_RATIO, **bounds)
    schedules["step_doubling"] = js.step_doubling(
        cfg.steps, cfg.samples, stages=min(DOUBLING_STAGES, cfg.steps), **bounds
    )
    schedules = {k: np.asarray(v, dtype=np.int64) for k, v in schedules.items()}
    progress.update()

    compression = None
    if cfg.stages is not None:
        progress.set_description("stage compression")
        b, objective, unconstrained = js.compress_stages(
            phi,
            cfg.samples,
            stages=cfg.stages,
            multiple_of=cfg.multiple_of,
            min_batch=cfg.min_batch,
            max_batch=cfg.max_batch,
        )
        schedules["compressed"] = np.asarray(b, dtype=np.int64)
        compression = {
            "stages": cfg.stages,
            "multiple_of": cfg.multiple_of,
            "objective": float(objective),
            "unconstrained_objective": float(unconstrained),
            "stage_list": _stage_list(schedules["compressed"]),
        }
        progress.update()

    # Predicted loss of any schedule from one set of parts (J1 is affine in the noise weights):
    # E F(x_K) ~ F(x_T) + h (correction + sum_k phi_k w(b_k)).
    progress.set_description("predicted and exact losses")
    base = float(opt.base_loss) + cfg.lr * float(opt.correction)
    noise = {
        k: float(np.sum(phi * np.asarray(problem.noise_weight(jnp.asarray(b, opt.phi.dtype)))))
        for k, b in schedules.items()
    }
    predicted = {k: base + cfg.lr * v for k, v in noise.items()}
    exact = dict.fromkeys(schedules)
    trajectories = dict.fromkeys(schedules)
    gd_exact = gd_trajectory = None
    if problem.is_quadratic:
        for k, b in schedules.items():
            trajectories[k] = np.asarray(js.exact_loss_trajectory(problem, b, lr=cfg.lr))
            exact[k] = float(trajectories[k][-1])
        inf = np.full(cfg.steps, np.inf)
        gd_trajectory = np.asarray(js.exact_loss_trajectory(problem, inf, lr=cfg.lr))
        gd_exact = float(gd_trajectory[-1])
    progress.update()
    return _Results(
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
        seconds=time.perf_counter() - t0,
    )


def _stage_list(b) -> list[dict]:
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


def _payload(cfg: _Config, info: dict, res: _Results) -> dict:
    return {
        "problem": info,
        "lr": cfg.lr,
        "steps": cfg.steps,
        "samples": cfg.samples,
        "min_batch": cfg.min_batch,
        "max_batch": cfg.max_batch,
        "x64": cfg.x64,
        "method": cfg.method,
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


def _csv_text(res: _Results) -> str:
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


def _write_png(path: str, cfg: _Config, info: dict, res: _Results) -> None:
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


def _write_atomically(out: str, writers: dict[str, Callable[[str], None]]) -> list[str]:
    """Write every file to a temporary name in ``out``, then rename them all; on any failure
    remove the temporaries and leave existing files untouched."""
    os.makedirs(out, exist_ok=True)
    umask = os.umask(0)  # mkstemp creates 0600 files; give the results the usual permissions
    os.umask(umask)
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            temps[name] = tmp
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)
        for name, tmp in temps.items():
            os.replace(tmp, os.path.join(out, name))
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    return [os.path.join(out, name) for name in writers]


def _write_text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return write


def _fmt(x: float | None, spec: str = ".6f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _fmt_gain(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _report(cfg: _Config, info: dict, res: _Results, written: list[str]) -> str:
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
    lines = [
        f"problem  {info['name']}: {info['description']} ({size})",
        settings,
        baselines,
        "",
    ]
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
                _fmt(res.predicted[name]),
                _fmt(res.exact[name]),
                _fmt(excess, ".3e"),
                "-" if is_opt else _fmt_gain(_gain(excess, opt_excess)),
                "-" if is_opt else _fmt_gain(_gain(res.noise[name], res.noise["optimal"])),
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    gd = (
        f"gradient descent (exact gradients, same lr and steps): f(x_K) = {_fmt(res.gd_exact)} "
        f"exact, {_fmt(res.gd_predicted)} predicted"
    )
    gain = (
        "gain = the schedule's excess / the optimal schedule's excess (> 1: the optimal one "
        "wins); predicted gain = ratio of sum_k phi_k / b_k"
    )
    lines += [
        "",
        gd,
        "exact excess = E f(x_K) minus gradient descent's f(x_K): the loss due to gradient noise",
        gain,
    ]
    if res.compression is not None:
        c = res.compression
        stages = ", ".join(f"{s['batch_size']} x {s['steps']}" for s in c["stage_list"])
        summary = (
            f"stage compression (at most {c['stages']} stages, batch sizes multiples of "
            f"{c['multiple_of']}): sum_k phi_k / b_k = {c['objective']:.6g} vs "
            f"{c['unconstrained_objective']:.6g} unconstrained "
            f"({_fmt_gain(_gain(c['objective'], c['unconstrained_objective']))})"
        )
        lines += ["", summary, f"  stages (batch size x steps): {stages}"]
    lines += ["", f"computed in {res.seconds:.1f} s; wrote {', '.join(written)}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------------
class _NoProgress:
    def set_description(self, _):
        pass

    def update(self, _=1):
        pass

    def close(self):
        pass


def _progress(cfg: _Config):
    if cfg.quiet:
        return _NoProgress()
    from tqdm.auto import tqdm

    phases = 4 + (cfg.stages is not None)
    return tqdm(
        total=phases,
        file=sys.stderr,
        leave=False,
        bar_format="{desc:<32} {bar:20} {n_fmt}/{total_fmt} phases [{elapsed}]",
    )


@contextlib.contextmanager
def _x64(enabled: bool):
    """Set jax_enable_x64 for the run (before any array exists) and restore it afterwards, so an
    in-process call (tests, notebooks) leaves the caller's setting alone."""
    import jax

    previous = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _run_optimize(args: argparse.Namespace) -> int:
    cfg = _check_config(args)
    with _x64(cfg.x64):
        problem, info = _make_problem(cfg)
        _check_out(cfg.out)
        progress = _progress(cfg)
        try:
            res = _compute(cfg, problem, progress)
            progress.set_description("writing files")
            payload = _payload(cfg, info, res)
            writers = {
                "schedule.json": _write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n"),
                "schedule.csv": _write_text(_csv_text(res)),
                "schedule.png": lambda path: _write_png(path, cfg, info, res),
            }
            try:
                written = _write_atomically(cfg.out, writers)
            except OSError as e:  # disk full, folder removed meanwhile: nothing was renamed
                raise UsageError(f"--out: cannot write into {cfg.out} ({e})") from None
            progress.update()
        finally:
            progress.close()
    if not cfg.quiet:
        print(_report(cfg, info, res, written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxsched`` command line; returns the exit code (0 success, 2 bad arguments)."""
    parser = _build_parser()
    prog = "jaxsched"
    try:
        args, extra = parser.parse_known_args(argv)
        prog = f"jaxsched {args.command}"
        if extra:  # reported by the subcommand, like every other argument error
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        code = args.func(args)
    except ValueError as e:  # UsageError, or a library ValueError naming its argument
        prog = getattr(e, "prog", None) or prog
        message = " ".join(_flagify(str(e)).split())  # one line, whatever the message
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
