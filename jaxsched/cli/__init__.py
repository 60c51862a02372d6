"""The ``jaxsched`` command line: ``main()`` and the static registration of its subcommands.

``optimize`` lives in :mod:`jaxsched.cli.optimize`, ``sweep`` in :mod:`jaxsched.cli.sweep`, ``export`` in
:mod:`jaxsched.cli.export`; each
module's ``add_parser(subparsers)`` registers its subparser with ``set_defaults(func=handler)``. A
handler takes the parsed namespace (and, when it accepts a second argument, the run's SIGINT guard)
and returns an exit code (``None`` means 0). For every command ``main`` sets ``jax_enable_x64``
(the command's ``--x64/--no-x64``, float64 for a command without it) and JAX's persistent
compilation cache (off with ``--no-cache`` or ``JAXSCHED_NO_CACHE=1``) and restores both afterwards;
a ``ValueError`` a handler raises is reported as one line ``jaxsched <command>: error: <message>``
with exit code 2, a SIGINT as one line with exit code 130.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence

from . import export as _export, optimize as _optimize, sweep as _sweep
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Interrupts,
    Parser,
    UsageError,
    cache_disabled_by_env,
    compilation_cache,
    error_line,
    x64,
)

__all__ = ["main"]

_NO_CACHE_HELP = (
    "do not use the persistent compilation cache (compiled programs are otherwise kept across runs "
    "in the user cache folder, $XDG_CACHE_HOME/jaxsched or ~/.cache/jaxsched; the environment "
    "variable JAXSCHED_NO_CACHE=1 turns it off too)"
)


def _build_parser() -> Parser:
    parser = Parser(
        prog="jaxsched",
        description="Optimal batch-size schedules for SGD from the O(h) expansion of its diffusion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in (_optimize, _sweep, _export):
        command = module.add_parser(sub)
        command.add_argument("--no-cache", action="store_true", help=_NO_CACHE_HELP)
    return parser


def _call(handler, args, interrupts: Interrupts):
    # Handlers that take the SIGINT guard get it (optimize); others get only the namespace.
    if len(inspect.signature(handler).parameters) >= 2:
        return handler(args, interrupts)
    return handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxsched`` command line.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 2 bad arguments or input, 130 interrupted; a command may document
        others (``optimize``: 3 when no schedule beats the constant batch).
    """
    prog = "jaxsched"
    with Interrupts() as interrupts:
        try:
            parser = _build_parser()
            args, extra = parser.parse_known_args(argv)
            prog = f"jaxsched {args.command}"
            if extra:  # reported by the subcommand, like every other argument error
                raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
            cache = not (args.no_cache or cache_disabled_by_env())
            with x64(getattr(args, "x64", True)), compilation_cache(cache):
                code = _call(args.func, args, interrupts)
        except ValueError as e:  # UsageError, or a library ValueError naming its argument
            prog = getattr(e, "prog", None) or prog
            print(error_line(prog, _optimize.flagify(str(e)) if prog.endswith("optimize") else e),
                  file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt as e:
            when = str(e) or "; existing outputs were left as they were"
            print(f"{prog}: interrupted{when}", file=sys.stderr)
            return EXIT_INTERRUPTED
    return 0 if code is None else int(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
