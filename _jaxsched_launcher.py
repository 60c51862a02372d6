"""The ``jaxsched`` console script: a SIGINT handler first, then the command line.

A top-level module on purpose: importing anything inside the ``jaxsched`` package runs
``jaxsched/__init__.py``, which imports jax (about two seconds). A Ctrl-C in that window would
otherwise end in a traceback, or be swallowed by the import machinery of jax's dependencies. Here
the handler is installed before that import: a SIGINT then prints one line and exits with status
130 at once (nothing has been computed or written yet, so there is nothing to clean up). Once
:func:`jaxsched.cli.main` runs, its own guard takes over (it restores this handler when it
returns, so a Ctrl-C while the interpreter shuts down exits the same way). After an interrupted
command the launcher skips the interpreter's teardown (see :func:`main`).
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["main"]

_EXIT_INTERRUPTED = 130  # the shell's convention, 128 + SIGINT; also jaxsched.cli's


def _interrupted(signum, frame) -> None:
    # os.write and os._exit: no buffered stream or half-imported module is touched.
    try:
        os.write(2, b"jaxsched: interrupted; existing outputs were left as they were\n")
    finally:
        os._exit(_EXIT_INTERRUPTED)


def main() -> int:
    """Install the early SIGINT handler, import the command line and run it.

    Returns:
        The command's exit code (130 if interrupted).
    """
    signal.signal(signal.SIGINT, _interrupted)
    from jaxsched.cli import main as cli_main

    code = cli_main()
    if code == _EXIT_INTERRUPTED:
        # The Ctrl-C may have landed while XLA was compiling: tearing the interpreter down then
        # can crash (SIGSEGV or death by SIGINT after the one-line message: 6 of 16 runs with the
        # signal 2-3.75 s after the start). Nothing is left to save (outputs are written only
        # after a finished run), so flush and leave at once with the documented status.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
