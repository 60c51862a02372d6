"""The console script's launcher: Ctrl-C at any moment (while jax is still being imported, while
programs compile) exits with status 130 and one line on stderr, never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


def _interrupt_after(delay: float, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAXSCHED_NO_CACHE="1")
    # -m runs the module as the console script does (its __main__ block calls main()).
    cmd = [sys.executable, "-m", "_jaxsched_launcher", "optimize", "--out", str(tmp_path / "out"),
           "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# 0.05 s: the interpreter is still importing jax (about 2 s even on a fast machine); 3 s: the
# command runs (parsing, building the problem, compiling). The default job takes longer than 3 s
# with the cache off, so the signal always lands before the end; whenever it lands, the rule is
# the same, so the test does not depend on the timing being exact.
@pytest.mark.parametrize("delay", [0.05, 3.0])
def test_sigint_exits_130_with_one_line(delay, tmp_path):
    res = _interrupt_after(delay, tmp_path)
    assert res.returncode == 130, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "interrupted" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
