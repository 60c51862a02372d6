"""experiments/device_check.py runs end to end on the CPU in its --cpu-smoke mode (float32, tiny
sizes), writes its JSON, and compares against a reference file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "device_check.py")
JOBS = ("sweep", "monte_carlo", "matrix_free", "optimal_schedule")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "cpu.json"
    # A subprocess: the script sets float32 and the CPU platform for its whole process.
    proc = subprocess.run([sys.executable, SCRIPT, "--cpu-smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout, out


def test_smoke_runs_every_job_in_float32(smoke):
    results, stdout, _ = smoke
    assert results["platform"] == "cpu"
    assert set(results["jobs"]) == set(JOBS)
    for job in JOBS:
        assert results["jobs"][job]["steady_s"] > 0 and job in stdout
    v = results["jobs"]
    assert v["sweep"]["values"]["ok_fraction"] == 1.0
    b = np.asarray(v["optimal_schedule"]["values"]["batch_sizes"])
    assert b.sum() == 16 * b.shape[0] and b.min() >= 1  # the smoke budget: 16 per step
    # Matrix-free memory is O(d * chunk), below one d x d float32 matrix even at d = 682.
    assert v["matrix_free"]["values"]["memory_bytes"] < v["matrix_free"]["values"]["dxd_bytes"]


def test_monte_carlo_gain_interval_covers_the_exact_gain(smoke):
    # Independent references: the exact recursion (theory 5.3) against SGD Monte Carlo; 2000 paths
    # per schedule give a standard error of about 2% of the gain, 4 SE bound a false alarm at 6e-5.
    mc = smoke[0]["jobs"]["monte_carlo"]["values"]
    assert abs(mc["mc_gain"] - mc["exact_gain"]) < 4 * mc["mc_gain_se"]
    assert mc["predicted_gain"] > 1 and mc["exact_gain"] > 1


def test_agreement_with_a_reference(smoke):
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    dc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dc)
    values = smoke[0]["jobs"]["sweep"]["values"]
    assert "predicted_loss 0.0e+00" in dc.agreement(values, values)
    shifted = dict(values, predicted_loss=[x * (1 + 1e-3) for x in values["predicted_loss"]])
    assert "predicted_loss 1.0e-03" in dc.agreement(shifted, values)
