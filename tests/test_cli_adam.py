"""``jaxsched optimize --optimizer adam|rmsprop`` (issue 14 item 1): the moment model's optimum
(docs/theory.md §9) against the baselines, run in-process through ``jaxsched.cli.main`` on the
Gaussian problem at dim 3, 20 steps and 160 samples. One module-scoped run per optimizer (Adam's
``--b2 0.99`` variant reuses Adam's compiled program: b2 is an array leaf). Every number is checked
against the library called here (``js.expected_loss`` with ``js.Adam`` / ``js.RMSprop``, optax's lr
schedule, the Gaussian regression's known minimum), never against the CLI's own earlier output.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import optax
import pytest

import jaxsched as js
from jaxsched import cli
from jaxsched.cli import _common

STEPS, SAMPLES = 20, 160
DIM, NOISE = 3, 0.5
SMALL = ["--dataset", "gaussian", "--dim", str(DIM), "--noise", str(NOISE), "--steps", str(STEPS),
         "--samples", str(SAMPLES), "--max-iter", "10"]
NAMES = ("optimal", "constant", "linear_ramp", "step_doubling", "sgd_sqrt_rule")
RMS_MIN_BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def _no_user_cache():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_common.CACHE_ENV, "1")
        yield


@pytest.fixture(scope="module")
def problem():
    return js.datasets.gaussian_problem(dim=DIM, spectrum="geometric", condition=100.0, noise=NOISE)


def _run(tmp_path_factory, *args: str) -> tuple[dict, str, str, object]:
    out = tmp_path_factory.mktemp("run")
    std, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(std), contextlib.redirect_stderr(err):
        code = cli.main(["optimize", "--out", str(out), *args])
    assert code == 0, err.getvalue()
    return json.loads((out / "schedule.json").read_text()), std.getvalue(), err.getvalue(), out


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    # Not --quiet: the printed table and the progress bar are checked too.
    return _run(tmp_path_factory, *SMALL, "--optimizer", "adam")


@pytest.fixture(scope="module")
def adam_b2(tmp_path_factory, adam):
    return _run(tmp_path_factory, *SMALL, "--optimizer", "adam", "--b2", "0.99", "--quiet")[0]


@pytest.fixture(scope="module")
def rmsprop(tmp_path_factory):
    # An lr schedule and a batch floor in the one RMSprop run (one compile serves every check).
    return _run(tmp_path_factory, *SMALL, "--optimizer", "rmsprop", "--eps", "1e-6", "--lr", "0.02",
                "--lr-schedule", "cosine", "--min-batch", str(RMS_MIN_BATCH), "--quiet")[0]


def _batches(data: dict, name: str) -> np.ndarray:
    return np.asarray(data["schedules"][name]["batch_sizes"], dtype=np.float64)


def _check_predictions(data: dict, problem, optimizer) -> None:
    for name in NAMES:
        expect = float(js.expected_loss(problem, _batches(data, name), optimizer=optimizer))
        # The discrete moment model is a fixed lax.scan of 20 steps (no ODE, no solver tolerance):
        # the CLI's program (inside L-BFGS and a vmap) and this one differ in float64 operation
        # order only, ~1e-15 relative per step.
        assert data["schedules"][name]["predicted_loss"] == pytest.approx(expect, rel=1e-10), name


def _check_budget(data: dict, min_batch: int) -> None:
    assert set(NAMES) == set(data["schedules"])
    for name, entry in data["schedules"].items():
        b = entry["batch_sizes"]
        assert len(b) == STEPS and all(isinstance(v, int) for v in b), name
        assert sum(b) == SAMPLES, name  # the budget, exactly
        assert min(b) >= min_batch, name
        assert entry["exact_loss"] is None, name  # no exact recursion for Adam / RMSprop


# ------------------------------------------------------------------------------------------------
# Adam
# ------------------------------------------------------------------------------------------------
def test_adam_predictions_are_the_moment_model(adam, problem):
    data = adam[0]
    assert data["optimizer"] == {"name": "adam", "lr": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                 "lr_schedule": "constant"}
    _check_predictions(data, problem, js.Adam(0.01, b1=0.9, b2=0.999, eps=1e-8))


def test_adam_budget_and_gain(adam):
    data = adam[0]
    _check_budget(data, 1)
    s = data["schedules"]
    assert s["optimal"]["predicted_loss"] <= s["constant"]["predicted_loss"]
    # Gaussian regression y = a.x* + e: min f = E e^2 / 2 = noise / 2; the CLI's Newton step at
    # condition 100 leaves only float64 round-off.
    floor = data["moment_model"]["loss_floor"]
    assert floor == pytest.approx(NOISE / 2, rel=1e-12)
    for entry in s.values():
        # a difference of two JSON floats: round-off of numbers ~0.3 only
        assert entry["predicted_excess_loss"] == pytest.approx(entry["predicted_loss"] - floor,
                                                               rel=1e-12)


def test_adam_files_say_which_model_and_why_fields_are_null(adam):
    data, _, _, out = adam
    mm = data["moment_model"]
    assert (mm["model"], mm["level"], mm["covariance"]) == ("discrete", "L1", "full")
    assert data["method"] == "gradient" and data["max_iter"] == 10
    assert data["phi"] is None and data["gradient_descent_loss"] is None
    assert data["sensitivity"] is None and data["stability_clipped_steps"] is None
    assert {"exact_loss", "phi", "gradient_descent_loss"} <= set(data["not_available"])
    with open(out / "schedule.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    for name in NAMES:
        assert [int(r[name]) for r in rows] == data["schedules"][name]["batch_sizes"]
    assert (out / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adam_table_and_progress(adam):
    data, printed, err, _ = adam
    assert "predicted E f(x_K)" in printed and "exact E f(x_K)" not in printed
    assert "moment model" in printed and "level L1" in printed
    assert "Adam (b1 0.9, b2 0.999, eps 1e-08)" in printed
    assert "lr 0.01 (default)" in printed  # the adaptive default, inside the model's tested range
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()
            and line.split()[0] in NAMES}
    assert set(rows) == set(NAMES)
    for name in NAMES:  # the table prints the JSON's numbers, %g with 6 digits
        assert float(rows[name][1]) == pytest.approx(data["schedules"][name]["predicted_loss"],
                                                     rel=1e-5)
    assert "phases" in err  # the progress bar
    assert "Traceback" not in err


def test_adam_b2_flag_changes_the_optimizer(adam, adam_b2, problem):
    assert adam_b2["optimizer"]["b2"] == 0.99 and adam_b2["optimizer"]["b1"] == 0.9
    _check_predictions(adam_b2, problem, js.Adam(0.01, b1=0.9, b2=0.99, eps=1e-8))
    # a different optimizer, so a different prediction for the same constant schedule
    assert adam_b2["schedules"]["constant"]["predicted_loss"] != adam[0]["schedules"]["constant"][
        "predicted_loss"]


# ------------------------------------------------------------------------------------------------
# RMSprop
# ------------------------------------------------------------------------------------------------
def test_rmsprop_maps_b2_to_decay_and_keeps_eps_outside_the_root(rmsprop, problem):
    data = rmsprop
    assert data["optimizer"] == {"name": "rmsprop", "lr": 0.02, "decay": 0.99, "eps": 1e-6,
                                 "eps_in_sqrt": False, "lr_schedule": "cosine"}
    lr = np.asarray([optax.cosine_decay_schedule(0.02, STEPS)(k) for k in range(STEPS)])
    # optax evaluated here in float64 vs the CLI's vmapped evaluation: round-off only.
    np.testing.assert_allclose(data["lr_schedule"], lr, rtol=1e-13, atol=0)
    _check_predictions(data, problem, js.RMSprop(lr, decay=0.99, eps=1e-6))


def test_rmsprop_budget_bounds_and_gain(rmsprop):
    _check_budget(rmsprop, RMS_MIN_BATCH)
    s = rmsprop["schedules"]
    assert s["optimal"]["predicted_loss"] <= s["constant"]["predicted_loss"]


# ------------------------------------------------------------------------------------------------
# refusals: exit 2, one line naming the flag, nothing written
# ------------------------------------------------------------------------------------------------
REFUSED = {
    "b1_one": (["--optimizer", "adam", "--b1", "1"], "--b1"),
    "b1_negative": (["--optimizer", "adam", "--b1", "-0.1"], "--b1"),
    "b1_rmsprop": (["--optimizer", "rmsprop", "--b1", "0.9"], "--b1"),
    "b2_one": (["--optimizer", "adam", "--b2", "1.0"], "--b2"),
    "b2_zero_rmsprop": (["--optimizer", "rmsprop", "--b2", "0"], "--b2"),
    "b2_nan": (["--optimizer", "adam", "--b2", "nan"], "--b2"),
    "eps_zero": (["--optimizer", "adam", "--eps", "0"], "--eps"),
    "eps_negative": (["--optimizer", "rmsprop", "--eps", "-1e-8"], "--eps"),
    "eps_inf": (["--optimizer", "adam", "--eps", "inf"], "--eps"),
    "momentum": (["--optimizer", "adam", "--momentum", "0.9"], "--momentum"),
    "nesterov": (["--optimizer", "rmsprop", "--nesterov"], "--nesterov"),
    "closed_form": (["--optimizer", "adam", "--method", "closed_form"], "--method"),
    "exact": (["--optimizer", "rmsprop", "--method", "exact"], "--method"),
    "sensitivity": (["--optimizer", "adam", "--sensitivity", "eigen"], "--sensitivity"),
    "stages": (["--optimizer", "adam", "--stages", "3"], "--stages"),
    "step_time": (["--optimizer", "adam", "--step-time", "1,0.01"], "--step-time"),
    "b2_with_sgd": (["--b2", "0.99"], "--b2"),
    "eps_with_sgd": (["--optimizer", "sgd", "--eps", "1e-8"], "--eps"),
    "unknown_optimizer": (["--optimizer", "lion"], "--optimizer"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused(capsys, tmp_path, case):
    args, flag = REFUSED[case]
    out = tmp_path / "out"
    code = cli.main(["optimize", "--out", str(out), *SMALL, *args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no usage block, no traceback
    assert lines[0].startswith("jaxsched optimize: error: ") and flag in lines[0]
    assert not out.exists()  # refused before anything is created


def test_steps_budget_refused(capsys, tmp_path):
    # --steps-budget replaces --steps, so this case drops it from the command line.
    out = tmp_path / "out"
    code = cli.main(["optimize", "--out", str(out), "--optimizer", "adam", "--steps-budget", "40"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("jaxsched optimize: error: --steps-budget")
    assert not out.exists()
