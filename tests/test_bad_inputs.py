"""Conformance list of bad inputs (issue 13): the command line (``optimize`` and ``sweep``, called
in-process through ``main``), the sweep config file and the Python API called eagerly.

Every case asserts the error type (CLI: exit code 2 and one line ``jaxsched <command>: error: ...``
on stderr, no traceback; API: ``ValueError``), that the message names the argument, flag or config
key, and that no file was written or changed (a snapshot of the working folder before and after).
Every case is refused before anything is computed, so the table costs no compile.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsched as js
from jaxsched import cli

# ------------------------------------------------------------------------------------------------
# shared inputs
# ------------------------------------------------------------------------------------------------
SMALL = ["--steps", "20", "--samples", "160"]
LR = 0.05


def _gaussian():
    return js.GaussianLinearRegression(jnp.diag(jnp.asarray([1.0, 0.3])), jnp.ones(2), jnp.zeros(2), 0.5)


def _data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 2))
    return js.LinearRegressionData(X, X @ np.ones(2) + 0.1 * rng.normal(size=12), np.zeros(2))


def _general():
    return js.Problem(lambda x: jnp.sum(jnp.cosh(x)), lambda x: jnp.eye(2), jnp.ones(2))


B10 = np.full(10, 4.0)

# ------------------------------------------------------------------------------------------------
# the table: id -> (kind, input, fragment the message must contain)
#   kind "optimize" / "sweep": arguments after the command ("{tmp}" is the case's folder);
#   kind "config": the content of a sweep config file (dict -> JSON) run by ``jaxsched sweep``;
#   kind "api": a function of no arguments that must raise ValueError.
# ------------------------------------------------------------------------------------------------
OPTIMIZE = {
    "opt-lr-zero": (["--lr", "0"], "--lr"),
    "opt-lr-negative": (["--lr", "-0.05"], "--lr"),
    "opt-lr-nan": (["--lr", "nan"], "--lr"),
    "opt-lr-inf": (["--lr", "inf"], "--lr"),
    "opt-lr-text": (["--lr", "fast"], "--lr"),
    "opt-lr-diverges": (["--lr", "2.5"], "--lr"),
    "opt-steps-zero": (["--steps", "0", "--samples", "10"], "--steps"),
    "opt-steps-fraction": (["--steps", "10.5", "--samples", "100"], "--steps"),
    "opt-steps-text": (["--steps", "many"], "--steps"),
    "opt-samples-fraction": (["--samples", "100.5"], "--samples"),
    "opt-samples-negative": (["--steps", "10", "--samples", "-5"], "--samples"),
    "opt-samples-infeasible-low": (["--steps", "20", "--samples", "19"], "--samples"),
    "opt-samples-infeasible-high": (SMALL + ["--max-batch", "3"], "--samples"),
    "opt-min-batch-zero": (SMALL + ["--min-batch", "0"], "--min-batch"),
    "opt-min-batch-fraction": (SMALL + ["--min-batch", "1.5"], "--min-batch"),
    "opt-max-below-min": (SMALL + ["--min-batch", "6", "--max-batch", "5"], "--max-batch"),
    "opt-method-unknown": (SMALL + ["--method", "newton"], "--method"),
    "opt-max-iter-zero": (SMALL + ["--method", "exact", "--max-iter", "0"], "--max-iter"),
    "opt-max-iter-closed-form": (SMALL + ["--max-iter", "10"], "--max-iter"),
    "opt-stages-zero": (SMALL + ["--stages", "0"], "--stages"),
    "opt-multiple-of-alone": (SMALL + ["--multiple-of", "2"], "--multiple-of"),
    "opt-multiple-of-zero": (SMALL + ["--stages", "2", "--multiple-of", "0"], "--multiple-of"),
    "opt-samples-not-multiple": (SMALL + ["--stages", "2", "--multiple-of", "3"], "--samples"),
    "opt-dataset-unknown": (SMALL + ["--dataset", "mnist"], "--dataset"),
    "opt-dataset-missing-file": (SMALL + ["--dataset", "{tmp}/absent.csv"], "--dataset"),
    "opt-dataset-bad-csv": (SMALL + ["--dataset", "{tmp}/bad.csv"], "--dataset"),
    "opt-dim-without-gaussian": (SMALL + ["--dim", "3"], "--dim"),
    "opt-gaussian-dim-zero": (SMALL + ["--dataset", "gaussian", "--dim", "0"], "--dim"),
    "opt-gaussian-condition": (SMALL + ["--dataset", "gaussian", "--condition", "0.5"], "--condition"),
    "opt-gaussian-noise": (SMALL + ["--dataset", "gaussian", "--noise", "-1"], "--noise"),
    "opt-gaussian-spectrum": (SMALL + ["--dataset", "gaussian", "--spectrum", "zigzag"], "--spectrum"),
    "opt-out-is-file": (SMALL + ["--out", "{tmp}/a_file"], "--out"),
    "opt-out-under-file": (SMALL + ["--out", "{tmp}/a_file/sub"], "--out"),
    "opt-unknown-flag": (SMALL + ["--batch", "8"], "--batch"),
}

SWEEP_ARGS = {
    "sweep-missing-config": (["{tmp}/absent.toml"], "absent.toml"),
    "sweep-wrong-extension": (["{tmp}/a_file"], "a_file"),
    "sweep-invalid-json": (["{tmp}/broken.json"], "broken.json"),
    "sweep-unknown-flag": (["{tmp}/absent.json", "--bogus"], "--bogus"),
    "sweep-chunk-size-text": (["{tmp}/absent.json", "--chunk-size", "big"], "--chunk-size"),
}

_GRID = {"lr": [0.02, 0.05], "samples": [400]}
_SWEEP = {"steps": 50}
CONFIG = {
    "cfg-unknown-section": ({"problem": {"kind": "diabetes"}, "grid": _GRID, "extra": {}}, "extra"),
    "cfg-grid-and-list": (
        {"problem": {"kind": "diabetes"}, "grid": _GRID, "list": _GRID, "sweep": _SWEEP},
        "[grid]",
    ),
    "cfg-no-grid": ({"problem": {"kind": "diabetes"}, "sweep": _SWEEP}, "grid"),
    "cfg-empty-grid": ({"problem": {"kind": "diabetes"}, "grid": {}, "sweep": _SWEEP}, "grid"),
    "cfg-kind-unknown": ({"problem": {"kind": "mnist"}, "grid": _GRID, "sweep": _SWEEP}, "problem.kind"),
    "cfg-axis-unknown": (
        {"problem": {"kind": "diabetes"}, "grid": {**_GRID, "noise_var": [0.1]}, "sweep": _SWEEP},
        "noise_var",
    ),
    "cfg-axis-text": ({"problem": {"kind": "diabetes"}, "grid": {"lr": ["a"]}, "sweep": _SWEEP}, "grid.lr"),
    "cfg-range-incomplete": (
        {"problem": {"kind": "diabetes"}, "grid": {"lr": {"start": 0.01}}, "sweep": _SWEEP},
        "grid.lr",
    ),
    "cfg-range-scale": (
        {
            "problem": {"kind": "diabetes"},
            "grid": {"lr": {"start": 0.01, "stop": 0.1, "num": 3, "scale": "cubic"}},
            "sweep": _SWEEP,
        },
        "grid.lr",
    ),
    "cfg-sweep-unknown-key": (
        {"problem": {"kind": "diabetes"}, "grid": _GRID, "sweep": {**_SWEEP, "stpes": 3}},
        "stpes",
    ),
    "cfg-gaussian-no-spectrum": ({"problem": {"kind": "gaussian"}, "grid": _GRID, "sweep": _SWEEP}, "problem"),
    "cfg-gaussian-eigenvalues": (
        {"problem": {"kind": "gaussian", "eigenvalues": [1.0, -0.5]}, "grid": _GRID, "sweep": _SWEEP},
        "problem.eigenvalues",
    ),
    "cfg-gaussian-dim-zero": (
        {"problem": {"kind": "gaussian", "dim": 0, "decay": 1.0}, "grid": _GRID, "sweep": _SWEEP},
        "problem.dim",
    ),
    "cfg-npz-no-file": ({"problem": {"kind": "npz"}, "grid": _GRID, "sweep": _SWEEP}, "problem.file"),
    "cfg-subset-size": (
        {
            "problem": {"kind": "diabetes", "subset_size": 1},
            "grid": {**_GRID, "subset_seed": [0, 1]},
            "sweep": _SWEEP,
        },
        "problem.subset_size",
    ),
}


API = {
    "api-optimal-lr-zero": (
        lambda: js.optimal_schedule(_gaussian(), lr=0.0, steps=10, samples=40), "lr"),
    "api-optimal-lr-nan": (
        lambda: js.optimal_schedule(_gaussian(), lr=float("nan"), steps=10, samples=40), "lr"),
    "api-optimal-steps-zero": (
        lambda: js.optimal_schedule(_gaussian(), lr=LR, steps=0, samples=40), "steps"),
    "api-optimal-steps-float": (
        lambda: js.optimal_schedule(_gaussian(), lr=LR, steps=10.5, samples=40), "steps"),
    "api-optimal-samples-low": (
        lambda: js.optimal_schedule(_gaussian(), lr=LR, steps=10, samples=5), "samples"),
    "api-optimal-samples-high": (
        lambda: js.optimal_schedule(_gaussian(), lr=LR, steps=10, samples=500, max_batch=4), "samples"),
    "api-optimal-min-above-max": (
        lambda: js.optimal_schedule(_gaussian(), lr=LR, steps=10, samples=40, min_batch=5, max_batch=4),
        "min_batch"),
    "api-optimal-method": (
        lambda: js.optimal_schedule(_gaussian(), lr=LR, steps=10, samples=40, method="newton"), "method"),
    "api-optimal-exact-general": (
        lambda: js.optimal_schedule(_general(), lr=LR, steps=10, samples=40, method="exact"), "method"),
    "api-expected-loss-negative-b": (
        lambda: js.expected_loss(_gaussian(), -B10, lr=LR), "batch_sizes"),
    "api-expected-loss-2d-b": (
        lambda: js.expected_loss(_gaussian(), np.ones((2, 5)), lr=LR), "batch_sizes"),
    "api-expected-loss-empty-b": (
        lambda: js.expected_loss(_gaussian(), np.ones(0), lr=LR), "batch_sizes"),
    "api-expected-loss-lr": (
        lambda: js.expected_loss(_gaussian(), B10, lr=-1.0), "lr"),
    "api-exact-general-problem": (
        lambda: js.exact_expected_loss(_general(), B10, lr=LR), "problem"),
    "api-exact-zero-batch": (
        lambda: js.exact_expected_loss(_gaussian(), np.zeros(10), lr=LR), "batch_sizes"),
    "api-exact-nan-batch": (
        lambda: js.exact_expected_loss(_data(), np.full(10, np.nan), lr=LR), "batch_sizes"),
    "api-exact-lr-zero": (
        lambda: js.exact_expected_loss(_gaussian(), B10, lr=0.0), "lr"),
    "api-sensitivity-lr": (
        lambda: js.sensitivity(_gaussian(), lr=0.0, steps=10), "lr"),
    "api-sensitivity-steps": (
        lambda: js.sensitivity(_gaussian(), lr=LR, steps=-1), "steps"),
    "api-gaussian-cov-not-square": (
        lambda: js.GaussianLinearRegression(jnp.ones((2, 3)), jnp.ones(2), jnp.zeros(2), 0.5), "cov"),
    "api-gaussian-cov-nan": (
        lambda: js.GaussianLinearRegression(jnp.full((2, 2), jnp.nan), jnp.ones(2), jnp.zeros(2)), "cov"),
    "api-data-features-1d": (
        lambda: js.LinearRegressionData(np.ones(5), np.ones(5), np.zeros(1)), "features"),
    "api-data-one-example": (
        lambda: js.LinearRegressionData(np.ones((1, 2)), np.ones(1), np.zeros(2)), "features"),
    "api-dataset-dim": (lambda: js.datasets.gaussian_problem(0), "dim"),
    "api-dataset-spectrum": (lambda: js.datasets.gaussian_problem(3, spectrum="zigzag"), "spectrum"),
    "api-dataset-noise": (lambda: js.datasets.gaussian_problem(3, noise=-1.0), "noise"),
    "api-constant-infeasible": (lambda: js.constant_schedule(10, 5), "samples"),
    "api-ramp-ratio": (lambda: js.linear_ramp(10, 100, ratio=-2.0), "ratio"),
    "api-compress-stages-zero": (
        lambda: js.compress_stages(np.ones(10), 100, stages=0), "stages"),
    "api-compress-multiple-zero": (
        lambda: js.compress_stages(np.ones(10), 100, stages=2, multiple_of=0), "multiple_of"),
}


def _cases():
    for name, (args, frag) in OPTIMIZE.items():
        yield pytest.param("optimize", args, frag, id=name)
    for name, (args, frag) in SWEEP_ARGS.items():
        yield pytest.param("sweep", args, frag, id=name)
    for name, (config, frag) in CONFIG.items():
        yield pytest.param("config", config, frag, id=name)
    for name, (fn, frag) in API.items():
        yield pytest.param("api", fn, frag, id=name)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _prepare(tmp: Path) -> None:
    (tmp / "a_file").write_text("not a folder")
    (tmp / "bad.csv").write_text("1,2,3\n4,5\n")
    (tmp / "broken.json").write_text("{not json")


def _cli(command: str, args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([command, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch):
    monkeypatch.setenv("JAXSCHED_NO_CACHE", "1")


def test_at_least_60_cases():
    assert len(OPTIMIZE) + len(SWEEP_ARGS) + len(CONFIG) + len(API) >= 60


@pytest.mark.parametrize(("kind", "value", "fragment"), list(_cases()))
def test_bad_input_is_refused(kind, value, fragment, tmp_path, capsys, monkeypatch):
    _prepare(tmp_path)
    monkeypatch.chdir(tmp_path)  # anything written by accident lands in the snapshot
    before = _snapshot(tmp_path)
    if kind == "api":
        with pytest.raises(ValueError) as info:
            value()
        assert fragment in str(info.value), str(info.value)
    else:
        if kind == "config":
            path = tmp_path / "config.json"
            path.write_text(json.dumps({**value, "sweep": {**value.get("sweep", {}), "output": "res"}}))
            before = _snapshot(tmp_path)
            command, args = "sweep", [str(path)]
        else:
            command = kind
            args = [a.replace("{tmp}", str(tmp_path)) for a in value]
            if command == "optimize" and "--out" not in args:
                args += ["--out", str(tmp_path / "out")]
        with contextlib.redirect_stdout(io.StringIO()) if kind == "config" else contextlib.nullcontext():
            code, out, err = _cli(command, args, capsys)
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1, err  # one line: no usage block, no traceback
        assert lines[0].startswith(f"jaxsched {command}: error: "), lines[0]
        assert fragment in lines[0], lines[0]
        assert "Traceback" not in err and "INTERNAL" not in err
    assert _snapshot(tmp_path) == before  # nothing written or changed
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# bad values under jit / vmap (issue 13 item 5): an error at run time, never a number
# ------------------------------------------------------------------------------------------------
def _traced_cases():
    import equinox as eqx
    import jax

    g = _gaussian()
    b = jnp.full(20, 4.0)
    jit = eqx.filter_jit
    return {
        "optimal_schedule lr < 0": (jit(lambda h: js.optimal_schedule(g, lr=h, steps=20, samples=80)
                                        .predicted_loss), -0.05),
        "optimal_schedule lr NaN": (jit(lambda h: js.optimal_schedule(g, lr=h, steps=20, samples=80)
                                        .batch_sizes), jnp.nan),
        "expected_loss batch < 0": (jit(lambda x: js.expected_loss(g, x, lr=LR)), -b),
        "sensitivity lr < 0": (jit(lambda h: js.sensitivity(g, lr=h, steps=20)), -0.05),
        "exact_expected_loss batch < 0": (jit(lambda x: js.exact_expected_loss(g, x, lr=LR)), -b),
        # 2000 steps at lr 3 (|1 - 3 lam_max| = 2): the second moments overflow to inf
        "exact_expected_loss diverges": (jit(lambda h: js.exact_expected_loss(g, jnp.ones(2000), lr=h)),
                                         3.0),
        "simulate_sgd lr < 0": (jit(lambda h: js.simulate_sgd(g, b, lr=h, num_paths=4,
                                                            key=jax.random.key(0)).mean), -0.05),
        "GaussianLinearRegression cov not PD": (
            jit(lambda c: js.GaussianLinearRegression(c, jnp.ones(2), jnp.zeros(2), 0.5).cov),
            jnp.asarray([[1.0, 2.0], [2.0, 1.0]])),
        "GaussianLinearRegression noise_var < 0": (
            jit(lambda s: js.GaussianLinearRegression(jnp.eye(2), jnp.ones(2), jnp.zeros(2), s).noise_var),
            -1.0),
        "vmap optimal_schedule lr < 0": (
            jax.vmap(lambda h: js.optimal_schedule(g, lr=h, steps=20, samples=80).predicted_loss),
            jnp.asarray([0.05, -0.05])),
    }


@pytest.mark.parametrize("name", sorted(_traced_cases()))
def test_bad_traced_value_raises(name):
    import equinox as eqx

    fn, arg = _traced_cases()[name]
    with pytest.raises((eqx.EquinoxRuntimeError, ValueError, FloatingPointError)):
        out = fn(arg)
        # an error raised lazily must surface when the value is used
        np.asarray(out)


def test_exact_loss_diverging_eagerly_raises_and_throw_false_returns_it():
    g = _gaussian()
    with pytest.raises(FloatingPointError, match="stab"):
        js.exact_expected_loss(g, jnp.ones(2000), lr=3.0)
    assert not np.isfinite(float(js.exact_expected_loss(g, jnp.ones(2000), lr=3.0, throw=False)))


def test_float32_x0_with_float64_functions_is_refused_naming_x0():
    # issue 13 item 11: this used to fail deep inside diffrax with a dtype mismatch
    with pytest.raises(ValueError, match="x0"):
        js.Problem(lambda x: jnp.sum(jnp.asarray([1.0, 2.0]) * x**2), lambda x: jnp.eye(2),
                   np.zeros(2, np.float32))


def test_nan_loss_or_covariance_at_x0_is_named():
    # issue 13 item 11: these used to surface as "maximum number of solver steps"
    with pytest.raises(ValueError, match="loss"):
        js.Problem(lambda x: jnp.sum(x**2) * jnp.nan, lambda x: jnp.eye(2), np.zeros(2))
    with pytest.raises(ValueError, match="noise_cov"):
        js.Problem(lambda x: jnp.sum(x**2), lambda x: jnp.eye(2) * jnp.nan, np.zeros(2))
