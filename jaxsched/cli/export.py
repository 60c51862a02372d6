"""``jaxsched export SCHEDULE.json --format FORMAT``: the optimal schedule in a training framework's
format (Megatron-LM, OLMo-core, MaxText, CSV or a JSON list of stages), fitted to that format's
constraints, with the first-order objective it costs next to the unconstrained optimum's.

Reads the SCHEDULE.json written by ``jaxsched optimize``. Prints the artefact (or writes it to
``--out`` atomically) and a short report. A malformed JSON, a budget the micro-batch x
data-parallel size does not divide, or one no schedule of the format meets: one line naming the
problem, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .._misc import atomic_write
from .._schedule.export import FORMATS, ScheduleExport, export_schedule

_FLAGS = {
    "format": "--format",
    "stages": "--stages",
    "micro_batch": "--micro-batch",
    "data_parallel": "--data-parallel",
    "tokens_per_sample": "--tokens-per-sample",
    "duration_unit": "--duration-unit",
}


class _ArgumentError(ValueError):
    """A bad command line, reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _ArgumentError(message)


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _check_out(out: str) -> None:
    folder = os.path.dirname(os.path.abspath(out)) or "."
    if os.path.isdir(out):
        raise ValueError(f"--out: {out} is a folder, expected a file name")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--out: cannot write into {folder}")


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def report(result: ScheduleExport) -> str:
    """The summary lines printed after an export: constraints, stages, first-order objective and
    (when known) predicted loss, each next to the unconstrained optimum's."""
    b = result.batch_sizes
    changes = int((b[1:] != b[:-1]).sum())
    lines = [
        f"format {result.format}: {result.constraints}; {changes + 1} stage(s), "
        f"{int(b.sum())} samples in {b.size} steps",
        f"first-order objective sum_k phi_k/b_k: export {result.objective:.12g}, "
        f"unconstrained optimum {result.optimum_objective:.12g} ({100 * result.relative_cost:+.3f}%)",
    ]
    if result.predicted_loss is not None:
        gap = result.predicted_loss - result.optimum_predicted_loss
        lines.append(
            f"predicted E F(x_K): export {result.predicted_loss:.12g}, unconstrained optimum "
            f"{_fmt(result.optimum_predicted_loss, '.12g')} ({gap:+.3e})"
        )
    return "\n".join(lines)


def _handler(args: argparse.Namespace) -> int:
    if args.out is not None:
        _check_out(args.out)
    spec = _read(args.schedule)
    try:
        result = export_schedule(
            spec,
            format=args.format,
            stages=args.stages,
            micro_batch=args.micro_batch,
            data_parallel=args.data_parallel,
            tokens_per_sample=args.tokens_per_sample,
            duration_unit=args.duration_unit,
        )
    except ValueError as e:
        name, sep, rest = str(e).partition(":")
        if sep and name == "schedule":
            raise ValueError(f"{args.schedule}:{rest}") from None
        if sep and name in _FLAGS:
            raise ValueError(f"{_FLAGS[name]}:{rest}") from None
        raise
    if args.out is not None:
        try:
            atomic_write(args.out, lambda f: f.write(result.text), mode="w")
        except OSError as e:
            raise ValueError(f"--out: cannot write {args.out} ({e.strerror or e})") from None
        print(f"wrote {args.out}")
    else:
        print(result.text, end="" if result.text.endswith("\n") else "\n")
    print(report(result))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to an ``argparse`` subparsers object; its handler is stored as
    ``func`` (call ``args.func(args)``), raising ``ValueError`` with a one-line message for bad input."""
    p = subparsers.add_parser(
        "export",
        help="the optimal schedule in a training framework's format (megatron, olmo-core, maxtext, ...)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("schedule", metavar="SCHEDULE.json", help="the schedule.json written by jaxsched optimize")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--stages", type=int, default=4, help="most stages (megatron, olmo-core; default 4)")
    p.add_argument("--micro-batch", type=int, default=1, help="micro-batch size per rank (default 1)")
    p.add_argument("--data-parallel", type=int, default=1, help="data-parallel ranks / devices (default 1)")
    p.add_argument(
        "--tokens-per-sample",
        type=int,
        default=None,
        help="tokens per sample: Megatron thresholds in tokens; required for olmo-core",
    )
    p.add_argument(
        "--duration-unit",
        choices=("tokens", "steps"),
        default="tokens",
        help="olmo-core durations (default tokens)",
    )
    p.add_argument("--out", default=None, help="write the artefact to this file instead of stdout")
    p.set_defaults(func=_handler)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jaxsched export`` on its own (``argv`` without the leading ``export``); returns the
    exit code: 0 on success, 2 with one line on stderr for bad input."""
    parser = _Parser(prog="jaxsched")
    add_parser(parser.add_subparsers(dest="command", parser_class=_Parser))
    try:
        args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
        return args.func(args)
    except ValueError as e:
        print(f"jaxsched export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
