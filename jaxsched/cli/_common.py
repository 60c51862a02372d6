"""What every ``jaxsched`` subcommand shares: the error type and its one-line format, the parser that
raises instead of exiting, the float64 / float32 context, JAX's persistent compilation cache, the
SIGINT guard, progress bars and atomic output writing.

Nothing here holds module-level mutable state: each run creates its own objects (an
:class:`Interrupts` guard, a progress bar) and every context manager restores what it changed.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from .._misc import atomic_write_files

__all__ = [
    "CACHE_ENV",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "Interrupts",
    "NoProgress",
    "Parser",
    "UsageError",
    "cache_folder",
    "compilation_cache",
    "error_line",
    "fmt",
    "library_message",
    "progress_bar",
    "write_outputs",
    "x64",
]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
CACHE_ENV = "JAXSCHED_NO_CACHE"


class UsageError(ValueError):
    """A bad command line or input: reported as one line, exit code 2. ``prog`` names the
    (sub)command whose parser found it, when known."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """``argparse`` that raises :class:`UsageError` instead of printing a usage block and exiting,
    so that every bad argument ends as one line on stderr."""

    def error(self, message: str):
        raise UsageError(message, prog=self.prog)


def error_line(prog: str, message: str) -> str:
    """The one error format of the command line: ``<prog>: error: <message>`` on one line (any
    line breaks of ``message`` collapsed)."""
    return f"{prog}: error: {' '.join(str(message).split())}"


def fmt(x: float | None, digits: int = 6) -> str:
    """A number in ``%g`` style (``n/a`` for None or a non-finite value), never 100 digits."""
    if x is None:
        return "n/a"
    x = float(x)
    if x != x or x in (float("inf"), float("-inf")):
        return "n/a"
    return f"{x:.{digits}g}"


# Library errors raised under jit arrive wrapped (XLA's "INTERNAL: CpuCallback error calling
# callback: Traceback ...", equinox's explanation of where the error happened): keep only the
# message the library wrote.
_EQX_MESSAGE = re.compile(r"EquinoxRuntimeError: (.+)")
_WRAPPER_LINE = re.compile(
    r"^(Traceback|File |-{5,}|An error occurred during the runtime|Above is the stack|"
    r"Below is the stack|The above exception|\^+$|jax\.pure_callback failed)"
)
_WRAPPER_PREFIX = re.compile(r"^(INTERNAL:\s*)?(CpuCallback error( calling callback)?:?\s*)?")


def library_message(error: BaseException) -> str:
    """The message a library error was raised with, without XLA's or equinox's wrapping (never
    starting with ``INTERNAL: CpuCallback error``)."""
    text = str(error)
    found = _EQX_MESSAGE.search(text)
    if found:
        return found.group(1).strip()
    for line in text.splitlines():
        line = _WRAPPER_PREFIX.sub("", line.strip()).strip()
        if line and not _WRAPPER_LINE.match(line):
            return line
    return type(error).__name__


# ------------------------------------------------------------------------------------------------
# the global JAX settings of one command
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def x64(enabled: bool) -> Iterator[None]:
    """Set ``jax_enable_x64`` for one command (before any array exists) and restore the previous
    global setting afterwards, so an in-process call (tests, notebooks) leaves the caller's setting
    alone."""
    import jax

    previous = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", bool(enabled))
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def cache_folder() -> str:
    """The user cache folder of jaxsched's compiled programs: ``$XDG_CACHE_HOME/jaxsched``
    (``~/.cache/jaxsched`` when unset), ``~/Library/Caches/jaxsched`` on macOS and
    ``%LOCALAPPDATA%\\jaxsched\\cache`` on Windows."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
        return os.path.join(base, "jaxsched", "cache")
    if sys.platform == "darwin":
        return os.path.join(os.path.expanduser("~/Library/Caches"), "jaxsched")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "jaxsched")


def cache_disabled_by_env() -> bool:
    """True when ``JAXSCHED_NO_CACHE`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get(CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no")


_CACHE_OPTIONS = {
    # Cache every compile: the expansion's programs take 0.1-10 s each, JAX's default keeps only
    # those over 1 s; -1 disables the minimum entry size (0 would mean "the backend's default").
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


@contextlib.contextmanager
def compilation_cache(enabled: bool) -> Iterator[str | None]:
    """Use JAX's persistent compilation cache in :func:`cache_folder` for one command; yields the
    folder (None when disabled). A folder the user chose already (``JAX_COMPILATION_CACHE_DIR``) is
    kept. Restores every setting afterwards and resets JAX's cache object on both ends, so the
    setting takes effect even after earlier compiles in this process and does not outlive the
    command. A folder that cannot be created disables the cache (a warning-free fallback: the run
    only gets slower). Disabled, JAX's cache is off for the command even where the environment
    names a folder."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if not enabled:
        # Off means off, also for a folder set through JAX_COMPILATION_CACHE_DIR.
        previous_enabled = jax.config.jax_enable_compilation_cache
        try:
            jax.config.update("jax_enable_compilation_cache", False)
            cc.reset_cache()
            yield None
        finally:
            jax.config.update("jax_enable_compilation_cache", previous_enabled)
            cc.reset_cache()
        return
    names = ["jax_compilation_cache_dir", *_CACHE_OPTIONS]
    previous = {name: getattr(jax.config, name) for name in names}
    folder = previous["jax_compilation_cache_dir"] or cache_folder()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        yield None
        return
    try:
        jax.config.update("jax_compilation_cache_dir", folder)
        for name, value in _CACHE_OPTIONS.items():
            jax.config.update(name, value)
        cc.reset_cache()
        yield folder
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        cc.reset_cache()


# ------------------------------------------------------------------------------------------------
# Ctrl-C
# ------------------------------------------------------------------------------------------------
class Interrupts:
    """A SIGINT guard for one command (a context manager, installed in the main thread only).

    The first SIGINT raises ``KeyboardInterrupt`` where the program is, as Python's default handler
    does, and is also remembered: :meth:`check` raises it again at the next safe point, so an
    interrupt that some library code swallowed (one raised inside a callback or a destructor) still
    stops the command before it writes anything. Inside :meth:`deferred` a SIGINT is only
    remembered (used while finished files are renamed into place).
    """

    def __init__(self):
        self.pending = False
        self._deferring = False
        self._previous = None
        self._previous_hook = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            # A KeyboardInterrupt raised inside a gc callback (jax registers one) or a destructor
            # is "ignored" with a printed traceback; it is remembered in ``pending`` anyway, so
            # drop the print and keep the one-line message.
            self._previous_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._previous_hook
            self._previous = self._previous_hook = None

    def _unraisable(self, info) -> None:
        if not (self.pending and isinstance(info.exc_value, KeyboardInterrupt)):
            self._previous_hook(info)

    def _handle(self, signum, frame) -> None:
        first = not self.pending
        self.pending = True
        if first and not self._deferring:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a SIGINT arrived (and was perhaps swallowed)."""
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section that a SIGINT does not break into; it is raised by the next :meth:`check`."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------
class NoProgress:
    """The progress interface of :func:`progress_bar` doing nothing (``--quiet``)."""

    def set_description(self, _text: str) -> None:
        pass

    def update(self, _n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(phases: int, quiet: bool):
    """A bar counting the ``phases`` of a command on stderr (``NoProgress`` when ``quiet``)."""
    if quiet:
        return NoProgress()
    from tqdm.auto import tqdm

    return tqdm(
        total=phases,
        file=sys.stderr,
        leave=False,
        bar_format="{desc:<32} {bar:20} {n_fmt}/{total_fmt} phases [{elapsed}]",
    )


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def _stale_temporaries(out: str, names) -> list[str]:
    """The hidden ``.NAME.*.tmp`` files a killed run left in ``out`` for the given file names."""
    found = []
    for name in names:
        found += glob.glob(os.path.join(glob.escape(out), f".{glob.escape(name)}.*.tmp"))
    return found


def write_outputs(
    out: str, writers: dict[str, Callable[[str], None]], interrupts: Interrupts | None = None
) -> list[str]:
    """Write the files of ``writers`` (name -> function writing that file to a given path) into
    folder ``out`` all or nothing, through :func:`jaxsched._misc.atomic_write_files`.

    Before writing, hidden temporaries that an earlier killed run left for the same names are
    removed. A SIGINT while the files are written aborts with nothing renamed (``interrupts`` is
    checked after each file); the renames themselves are not broken into. On any failure a folder
    this call created is removed again (when empty), so a failed run leaves no empty ``--out``.

    Returns:
        The paths written.

    Raises:
        OSError: the folder cannot be created or a file cannot be written (old files untouched).
        KeyboardInterrupt: on SIGINT (old files untouched).
    """
    created = not os.path.isdir(out)
    if created:
        os.makedirs(out)
    for path in _stale_temporaries(out, writers):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    check = interrupts.check if interrupts is not None else lambda: None

    def guarded(write):
        def run(path: str) -> None:
            check()
            write(path)
            check()

        return run

    try:
        with interrupts.deferred() if interrupts is not None else contextlib.nullcontext():
            # Deferred: a SIGINT during a file only sets the flag; the check after that file
            # raises it inside the writer, so atomic_write_files removes its temporaries.
            return atomic_write_files(out, {n: guarded(w) for n, w in writers.items()}, create=False)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
