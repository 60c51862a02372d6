"""``jaxsched optimize``: the optimal batch-size schedule for a least-squares problem against
constant, linear-ramp and step-doubling schedules of the same sample budget.

With SGD (``--optimizer sgd``, the default, with optional momentum and lr schedule) the schedule is
the first-order optimum of theory 4 and the table shows predicted (expansion, theory 3) and exact
(recursion, theory 5.2/5.3) final losses. With ``--optimizer adam`` or ``rmsprop`` there is no
closed form and no exact recursion: the schedule is found by gradient descent through the moment
model of theory 9, and the table shows that model's predicted losses (the SGD square-root rule is
one more baseline). Either way ``schedule.json``, ``schedule.csv`` and ``schedule.png`` are written
into ``--out``.

Every argument is checked before any computation; a bad one gives one line ``jaxsched optimize:
error: --flag: what is wrong`` and exit code 2, and nothing is written. A schedule that exact SGD
(or, for Adam/RMSprop, the moment model) finds worse than the constant batch is never presented as
optimal (exit code 3, nothing written). Files are written to temporary names in the output folder
and renamed only when all are complete.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ._common import Interrupts, UsageError, progress_bar, write_outputs
from ._compute import NotBetterError, compute, make_problem
from ._report import csv_text, payload, report, text_writer, write_png
from ._settings import (
    ADAPTIVE_DEFAULTS,
    DEFAULT_ADAPTIVE_LR,
    DEFAULT_LR,
    DEFAULT_MAX_ITER,
    DEFAULT_OUT,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    EPILOG,
    EXIT_NOT_BETTER,
    GAUSSIAN_DEFAULTS,
    LR_SCHEDULES,
    OPTIMIZERS,
    SENSITIVITIES,
    WARMUP_SHARE,
    check_config,
    check_out,
    flagify,
)

__all__ = ["DEFAULT_LR", "DEFAULT_SAMPLES", "DEFAULT_STEPS", "EXIT_NOT_BETTER", "add_parser", "flagify",
           "run"]


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
            "Compute the optimal batch-size schedule for least squares and compare it with "
            "constant, linear-ramp and step-doubling schedules of the same sample budget: for SGD "
            "the first-order optimum (square-root rule), for Adam and RMSprop the optimum of the "
            "moment model (gradient descent through it). "
            f"Defaults: the diabetes data, --optimizer sgd, --lr {DEFAULT_LR} ({DEFAULT_ADAPTIVE_LR} "
            f"with adam or rmsprop), --steps {DEFAULT_STEPS}, --samples {DEFAULT_SAMPLES}."
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
    p.add_argument(
        "--lr",
        type=float,
        help=f"learning rate h (default {DEFAULT_LR}; {DEFAULT_ADAPTIVE_LR} with --optimizer adam or "
        "rmsprop)",
    )
    p.add_argument("--steps", type=_whole_number, help=f"number of steps K (default {DEFAULT_STEPS})")
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
        help="closed_form: square-root rule on phi (default with SGD); gradient: L-BFGS through the "
        "ODE expansion (slow, a cross-check), or with adam/rmsprop through the moment model (their "
        "default and only method); exact: L-BFGS through the exact SGD recursion",
    )
    p.add_argument(
        "--max-iter",
        type=_whole_number,
        help=f"with --method gradient or exact (and adam/rmsprop): L-BFGS iteration cap (default "
        f"{DEFAULT_MAX_ITER}); "
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
    p.add_argument(
        "--sensitivity",
        choices=SENSITIVITIES,
        help="SGD only: how the sensitivities phi_k are computed: auto (default: the eigenbasis for "
        "these quadratic problems), dense (adjoint ODE of the full second moments), eigen (closed "
        "forms in the Hessian's eigenbasis) or matrix-free (per-example gradients pushed forward, "
        "every example: exact; data sets only)",
    )
    o = p.add_argument_group(
        "optimizer",
        "SGD with heavy-ball or Nesterov momentum (optax / PyTorch trace form), or Adam / RMSprop "
        "(optax.adam; PyTorch's RMSprop = optax.rmsprop(eps_in_sqrt=False)), each with an lr "
        "schedule; the optimal schedule and every baseline use the same optimizer",
    )
    o.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="sgd (default; exact losses by the recursion), adam (js.Adam: bias-corrected, eps "
        "outside the root) or rmsprop (js.RMSprop, PyTorch's convention: v_0 = 0, no bias "
        "correction, no momentum, eps added outside the root, i.e. optax.rmsprop(decay=B2, eps=EPS, "
        "eps_in_sqrt=False); optax's default eps_in_sqrt=True is a different optimizer). Adam and "
        "RMSprop have no closed form and no exact recursion: their schedule and every loss come "
        "from the moment model of docs/theory.md section 9",
    )
    o.add_argument("--b1", type=float,
                   help=f"adam: first-moment decay 0 <= B1 < 1 (default {ADAPTIVE_DEFAULTS['b1']['adam']:g})")
    o.add_argument(
        "--b2",
        type=float,
        help="adam: second-moment decay; rmsprop: its decay (PyTorch's alpha); 0 < B2 < 1 (default "
        f"{ADAPTIVE_DEFAULTS['b2']['adam']:g} for adam, {ADAPTIVE_DEFAULTS['b2']['rmsprop']:g} for rmsprop)",
    )
    o.add_argument(
        "--eps",
        type=float,
        help="adam/rmsprop: EPS > 0 added to the square root of v, outside it (default "
        f"{ADAPTIVE_DEFAULTS['eps']['adam']:g})",
    )
    o.add_argument("--momentum", type=float, metavar="MU",
                   help="sgd: momentum 0 <= MU < 1 (default 0: plain SGD)")
    o.add_argument("--nesterov", action="store_true", help="sgd: Nesterov momentum (needs --momentum > 0)")
    o.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="per-step learning rates over the K steps, peak --lr: constant (default); cosine = "
        "optax.cosine_decay_schedule(lr, K); step = lr x (1, 0.3, 0.1) over the first, second and "
        "last third of the steps; warmup-cosine = optax.warmup_cosine_decay_schedule with a linear "
        f"warmup over the first {WARMUP_SHARE * 100:g}%% of the steps (at least one) from lr/W to lr, "
        "then cosine decay to 0 at step K. schedule.json lists the per-step lr (lr_schedule)",
    )
    b = p.add_argument_group("budgets (at most one; default: --steps and --samples both fixed)")
    b.add_argument(
        "--steps-budget",
        type=_whole_number,
        metavar="K",
        help="at most K steps (replaces --steps): choose the number of steps <= K, and its optimal "
        "schedule, with the lowest exact loss at --samples and the given lr and optimizer",
    )
    b.add_argument(
        "--step-time",
        metavar="T0,T1",
        help="a step costs T0 + T1 x batch size seconds: the fewest seconds T0 K + T1 N that reach "
        "the predicted loss of the optimal schedule at --steps and --samples (the steps-samples "
        "front over K/4 .. 4K at constant learning rates <= --lr); reports K, N and the time",
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
    progress = progress_bar(4 + (cfg.stages is not None) + (cfg.budget != "samples"), cfg.quiet)
    try:
        try:
            res = compute(cfg, problem, progress, interrupts)
        except NotBetterError as e:
            progress.close()
            print(f"jaxsched optimize: {e}", file=sys.stderr)
            return EXIT_NOT_BETTER
        cfg = res.config  # a budget chose the run's steps, samples and lr
        progress.set_description("writing files")
        text = json.dumps(payload(cfg, info, res), indent=1, allow_nan=False) + "\n"
        writers = {
            "schedule.json": text_writer(text),
            "schedule.csv": text_writer(csv_text(res)),
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
