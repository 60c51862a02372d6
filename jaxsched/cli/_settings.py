"""The settings of ``jaxsched optimize``: defaults, the flag names of library arguments, and the
checks that turn parsed arguments into a :class:`Config` (no computation happens before all of them
passed; a failure is a :class:`UsageError` naming the flag)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass, field

from ._common import EXIT_USAGE, UsageError

DEFAULT_LR = 0.05
#: --lr's default with --optimizer adam or rmsprop: inside the range the moment model was checked in
#: (docs/theory.md §9: lr <= 0.04; its tables use 0.01).
DEFAULT_ADAPTIVE_LR = 0.01
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
SENSITIVITIES = ("auto", "dense", "eigen", "matrix-free")
LR_SCHEDULES = ("constant", "cosine", "step", "warmup-cosine")
#: The step lr schedule's factors over the first, second and last third of the steps.
STEP_FACTORS = (1.0, 0.3, 0.1)
#: warmup-cosine: the share of the steps spent in the linear warmup.
WARMUP_SHARE = 0.05
OPTIMIZERS = ("sgd", "adam", "rmsprop")
ADAPTIVE = ("adam", "rmsprop")
#: Defaults of --b1, --b2 and --eps (optax's and PyTorch's: Adam b2 0.999, RMSprop alpha 0.99).
ADAPTIVE_DEFAULTS = {"b1": {"adam": 0.9}, "b2": {"adam": 0.999, "rmsprop": 0.99},
                     "eps": {"adam": 1e-8, "rmsprop": 1e-8}}
#: The schedules an Adam/RMSprop run compares with: the SGD baselines and the square-root rule of
#: plain SGD at the same learning rates (docs/theory.md §9.1 shows why it is no optimum for Adam).
ADAPTIVE_BASELINES = (*BASELINES, "sgd_sqrt_rule")

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
    "momentum": "--momentum",
    "nesterov": "--nesterov",
    "sensitivity": "--sensitivity",
    "optimizer": "--optimizer",
    "b1": "--b1",
    "b2": "--b2",
    "decay": "--b2",  # RMSprop's decay is --b2
    "eps": "--eps",
}


def flagify(message: str) -> str:
    """``"name: text"`` with a library argument name -> ``"--flag: text"``."""
    name, sep, rest = message.partition(":")
    return f"{FLAGS[name]}:{rest}" if sep and name in FLAGS else message



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
    sensitivity: str = "auto"
    momentum: float = 0.0
    nesterov: bool = False
    lr_schedule: str = "constant"
    steps_budget: int | None = None
    step_time: tuple[float, float] | None = None
    optimizer: str = "sgd"
    b1: float | None = None  # Adam only (RMSprop has no first moment)
    b2: float | None = None  # Adam's second-moment decay, RMSprop's decay
    eps: float | None = None

    @property
    def adaptive(self) -> bool:
        """True for ``--optimizer adam`` or ``rmsprop`` (the moment model of docs/theory.md §9)."""
        return self.optimizer in ADAPTIVE

    @property
    def budget(self) -> str:
        """``"samples"`` (steps and samples given), ``"steps"`` (--steps-budget) or ``"step_time"``."""
        if self.steps_budget is not None:
            return "steps"
        return "samples" if self.step_time is None else "step_time"


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

    adaptive = args.optimizer in ADAPTIVE
    cfg = Config(
        dataset=args.dataset,
        lr=pick("lr", DEFAULT_ADAPTIVE_LR if adaptive else DEFAULT_LR),
        steps=pick("steps", DEFAULT_STEPS),
        samples=pick("samples", DEFAULT_SAMPLES),
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        method=pick("method", "gradient" if adaptive else "closed_form"),
        max_iter=pick("max_iter", DEFAULT_MAX_ITER),
        stages=args.stages,
        multiple_of=pick("multiple_of", 1),
        out=args.out,
        x64=args.x64,
        quiet=args.quiet,
        defaulted=defaulted,
        sensitivity=pick("sensitivity", "auto"),
        momentum=pick("momentum", 0.0),
        nesterov=args.nesterov,
        lr_schedule=args.lr_schedule,
        steps_budget=args.steps_budget,
        optimizer=args.optimizer,
    )
    if not math.isfinite(cfg.lr) or cfg.lr <= 0:
        raise UsageError(f"--lr: must be a finite number > 0, got {cfg.lr:g}")
    _check_int("--steps", cfg.steps, 1)
    _check_int("--samples", cfg.samples, 1)
    _check_int("--min-batch", cfg.min_batch, 1)
    _check_int("--max-iter", cfg.max_iter, 1)
    if cfg.adaptive:
        _check_adaptive(cfg, args)
    else:
        _check_sgd_only_flags(args)
        _check_optimizer(cfg)
    if args.max_iter is not None and cfg.method == "closed_form":
        raise UsageError("--max-iter: only applies with --method gradient or exact")
    if cfg.max_batch is not None and cfg.max_batch < cfg.min_batch:
        raise UsageError(f"--max-batch: must be >= --min-batch = {cfg.min_batch}, got {cfg.max_batch}")
    _check_budget_flags(cfg, args)
    if cfg.steps_budget is not None:
        _check_steps_budget(cfg)
        _check_dataset_options(cfg, args)
        return cfg
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


def _check_sgd_only_flags(args: argparse.Namespace) -> None:
    for name in ("b1", "b2", "eps"):
        if getattr(args, name) is not None:
            raise UsageError(f"{FLAGS[name]}: only applies with --optimizer adam or rmsprop")


def _check_adaptive(cfg: Config, args: argparse.Namespace) -> None:
    """The flags of ``--optimizer adam|rmsprop``: ranges of --b1, --b2, --eps (defaults filled in)
    and the SGD-only flags refused, each naming its flag."""
    which = cfg.optimizer
    name = "Adam" if which == "adam" else "RMSprop"
    if which == "rmsprop" and args.b1 is not None:
        raise UsageError("--b1: RMSprop has no first moment (b1 = 0); use --optimizer adam for --b1")
    if which == "adam":
        cfg.b1 = ADAPTIVE_DEFAULTS["b1"][which] if args.b1 is None else args.b1
        if not (math.isfinite(cfg.b1) and 0.0 <= cfg.b1 < 1.0):
            raise UsageError(f"--b1: must satisfy 0 <= B1 < 1, got {cfg.b1:g}")
    cfg.b2 = ADAPTIVE_DEFAULTS["b2"][which] if args.b2 is None else args.b2
    if not (math.isfinite(cfg.b2) and 0.0 < cfg.b2 < 1.0):
        # b2 = 0 would make v the current squared gradient (sign descent); the library refuses it
        raise UsageError(f"--b2: must satisfy 0 < B2 < 1, got {cfg.b2:g}")
    cfg.eps = ADAPTIVE_DEFAULTS["eps"][which] if args.eps is None else args.eps
    if not (math.isfinite(cfg.eps) and cfg.eps > 0.0):
        raise UsageError(f"--eps: must be a finite number > 0, got {cfg.eps:g}")
    for defaults in ("b1", "b2", "eps"):
        if getattr(args, defaults) is None:
            cfg.defaulted.add(defaults)
    if args.momentum is not None:
        raise UsageError(
            f"--momentum: {name} has its own moments (--b1, --b2); --momentum is SGD's heavy ball"
        )
    if args.nesterov:
        raise UsageError(f"--nesterov: only applies with --optimizer sgd (not {which})")
    if args.method is not None and args.method != "gradient":
        raise UsageError(
            f"--method: {name} has no closed form and no exact recursion (docs/theory.md §9); its "
            "schedule is found by gradient descent through the moment model: --method gradient "
            "(the default with --optimizer adam or rmsprop)"
        )
    if args.sensitivity is not None:
        raise UsageError(
            f"--sensitivity: {name} has no sensitivities phi_k (its expected loss is not affine in "
            "1/b); the moment model is differentiated instead"
        )
    if args.stages is not None:
        raise UsageError(
            f"--stages: stage compression fits the SGD objective sum_k phi_k / b_k; not available "
            f"with --optimizer {which}"
        )
    for flag, value in (("--steps-budget", args.steps_budget), ("--step-time", args.step_time)):
        if value is not None:
            raise UsageError(f"{flag}: searches SGD's closed forms; not available with --optimizer {which}")


def _check_optimizer(cfg: Config) -> None:
    mu = cfg.momentum
    if not (math.isfinite(mu) and 0.0 <= mu < 1.0):
        raise UsageError(f"--momentum: must satisfy 0 <= MU < 1, got {mu:g}")
    if cfg.nesterov and mu == 0.0:
        raise UsageError("--nesterov: needs --momentum > 0 (Nesterov without momentum is plain SGD)")


def _parse_step_time(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        t0, t1 = (float(v) for v in parts)
    except ValueError:
        raise UsageError(
            f"--step-time: expected two numbers t0,t1 (seconds per step and per sample), got {text!r}"
        ) from None
    if not (math.isfinite(t0) and math.isfinite(t1) and t0 >= 0 and t1 >= 0 and t0 + t1 > 0):
        raise UsageError(f"--step-time: t0 and t1 must be finite, >= 0 and not both 0, got {text!r}")
    return t0, t1


def _check_budget_flags(cfg: Config, args: argparse.Namespace) -> None:
    if args.steps_budget is not None and args.step_time is not None:
        raise UsageError("--step-time: give one budget, --steps-budget or --step-time, not both")
    if args.step_time is not None:
        cfg.step_time = _parse_step_time(args.step_time)
        if cfg.lr_schedule != "constant":
            raise UsageError(
                "--step-time: the steps-samples front searches constant learning rates; use it "
                "with --lr-schedule constant"
            )
    budget = "--steps-budget" if args.steps_budget is not None else "--step-time"
    if cfg.budget != "samples":
        if cfg.stages is not None:
            raise UsageError(f"--stages: not available together with {budget}")
        if cfg.method != "closed_form":
            raise UsageError(f"--method: {budget} needs --method closed_form")
    if args.steps_budget is not None and args.steps is not None:
        raise UsageError("--steps-budget: chooses the number of steps (<= K) itself; drop --steps")


def _check_steps_budget(cfg: Config) -> None:
    K, n = cfg.steps_budget, cfg.samples
    _check_int("--steps-budget", K, 1)
    hi = n if cfg.max_batch is None else cfg.max_batch
    fewest = -(-n // hi)
    if fewest > min(K, n // cfg.min_batch):
        raise UsageError(
            f"--steps-budget: no step count <= {K} spends --samples {n} with batch sizes in "
            f"[{cfg.min_batch}, {hi}] (needs at least {fewest} steps)"
        )
    cfg.steps = K  # the largest candidate; the search may choose fewer


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
    if cfg.sensitivity == "matrix-free" and cfg.dataset == "gaussian":
        raise UsageError(
            "--sensitivity: matrix-free needs a data set (per-example gradients); the gaussian "
            "problem is online: use auto, dense or eigen"
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

