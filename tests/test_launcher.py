"""The console script's launcher: Ctrl-C at any moment (while jax is still being imported, while
programs compile) exits with status 130 and one line on stderr, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


def _mapped(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return needle in f.read()
    except OSError:  # the process has exited
        return True


def _interrupt_after(delay: float | str, tmp_path) -> subprocess.CompletedProcess:
    """Run the console script and send it SIGINT ``delay`` seconds after the start, or with
    ``delay="jax-import"`` as soon as jaxlib's shared library is mapped into the process (jax is
    then still importing; the launcher installed its handler before that import began)."""
    env = dict(os.environ, JAXSCHED_NO_CACHE="1")
    # -m runs the module as the console script does (its __main__ block calls main()).
    cmd = [sys.executable, "-m", "_jaxsched_launcher", "optimize", "--out", str(tmp_path / "out"),
           "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if delay == "jax-import":
        deadline = time.monotonic() + 60
        while not _mapped(proc.pid, "jaxlib") and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# "jax-import": the interpreter is importing jax (about 2 s even on a fast machine); a fixed early
# delay is not used because on a loaded machine the signal could then land while the interpreter
# itself starts, before any line of the launcher runs (no program can handle that one: Python dies
# by the signal, status -2). 3 s: the command runs (parsing, building the problem, compiling). The
# default job takes longer than 3 s with the cache off, so the signal lands before the end;
# whenever it lands, the rule is the same.
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("delay", ["jax-import", 3.0])
def test_sigint_exits_130_with_one_line(delay, tmp_path):
    res = _interrupt_after(delay, tmp_path)
    assert res.returncode == 130, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "interrupted" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
