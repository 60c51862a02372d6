"""Tests of ``js.sweep(..., optimizer=js.Adam(...))``: each configuration's swept optimum equals
``js.adaptive_optimal_schedule`` called on its own, the losses equal ``js.expected_loss`` of the
moment model (docs/theory.md §9), budgets are exact, failures are per configuration, a finished
folder is resumed without recomputing and an SGD folder is never taken for an Adam one.

Cost: one compile of the vmapped adaptive core (steps = 20, chunks of 3) shared by every sweep of
the module (the optimizer's fields always travel as columns, so the structure does not depend on
which columns a sweep has), one of the reference ``adaptive_optimal_schedule`` and one small SGD
sweep."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_gaussian

import jaxsched as js
from jaxsched._sweep import adaptive as _adaptive, driver as _driver

STEPS = 20
CHUNK = 3
PROBLEM = random_gaussian(3, 0, noise_var=1.0)
# Config 2 stops at L-BFGS's cap in adaptive_optimal_schedule too (checked below against its
# result, not assumed); config 4 is infeasible (10 < 20 * 1); config 5 has b2 outside (0, 1).
CONFIGS = {"lr": [0.01, 0.02, 0.01, 0.03, 0.02, 0.02],
           "samples": [160, 160, 100, 60, 10, 80],
           "b2": [0.999, 0.99, 0.999, 0.999, 0.999, 1.5]}
INFEASIBLE, BAD_B2 = 4, 5


def count_traces(mp: pytest.MonkeyPatch) -> list:
    """One entry per trace of the per-configuration function of the adaptive core."""
    calls = []
    original = _adaptive._one_adaptive

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mp.setattr(_adaptive, "_one_adaptive", counting)
    return calls


def count_chunks(mp: pytest.MonkeyPatch) -> list:
    """The configuration indices of every chunk computation."""
    calls = []
    original = _driver._run_chunk

    def counting(shared, builder, cols, params, members, *args):
        calls.append(tuple(int(i) for i in members))
        return original(shared, builder, cols, params, members, *args)

    mp.setattr(_driver, "_run_chunk", counting)
    return calls


@pytest.fixture(scope="module")
def adam_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adam")
    with pytest.MonkeyPatch.context() as mp:
        traces = count_traces(mp)
        result = js.sweep(PROBLEM, js.configurations(**CONFIGS), steps=STEPS,
                          optimizer=js.Adam(1e-3), chunk_size=CHUNK, results_dir=folder,
                          progress=False)
    return result, len(traces), folder


@pytest.fixture(scope="module")
def references():
    """``adaptive_optimal_schedule`` one configuration at a time (the independent reference)."""
    out = {}
    for i, (lr, n, b2) in enumerate(zip(*CONFIGS.values(), strict=True)):
        if i not in (INFEASIBLE, BAD_B2):
            out[i] = js.adaptive_optimal_schedule(PROBLEM, optimizer=js.Adam(lr, b2=b2),
                                                  steps=STEPS, samples=n)
    return out


def test_each_configuration_equals_adaptive_optimal_schedule(adam_sweep, references):
    result, n_traces, _ = adam_sweep
    assert n_traces == 1  # two chunks of one size: one compile
    for i, ref in references.items():
        capped = ref.result == js.RESULTS.max_iterations_reached
        assert result.status[i] == (js.SweepStatus.MAX_ITERATIONS if capped else js.SweepStatus.OK)
        # Integers exactly: both round the model linearised at their real optimum with the same
        # exact integer step; the two optima agree to ~1e-7 (below), far from any tie of marginal
        # gains in this problem, so the rounding is the same.
        np.testing.assert_array_equal(result.batch_sizes[i], ref.batch_sizes)
        # Real optimum: both runs stop by L-BFGS's Cauchy test at gtol = 1e-8 on the normalised
        # objective; vmapped and single runs round differently and may stop a few iterations
        # apart in the flat valley, where the parameters are fixed only to about sqrt(gtol) = 1e-4.
        np.testing.assert_allclose(result.beta[i], ref.beta, rtol=1e-4)
        # Same integer schedule through the same recursion: only float64 rounding differs.
        np.testing.assert_allclose(result.predicted_loss[i], ref.predicted_loss, rtol=1e-12)
        np.testing.assert_allclose(result.gain[i], ref.gains["constant"], rtol=1e-12)
        # The relaxed loss is stationary at the optimum: beta's 1e-4 moves it to second order.
        np.testing.assert_allclose(result.relaxed_loss[i], ref.relaxed_loss, rtol=1e-7)


def test_losses_equal_expected_loss_of_the_moment_model(adam_sweep):
    result, _, _ = adam_sweep
    for i in np.flatnonzero(result.ok):
        opt = js.Adam(CONFIGS["lr"][i], b2=CONFIGS["b2"][i])
        n = CONFIGS["samples"][i]
        b = result.batch_sizes[i]
        constant = jnp.full(STEPS, n / STEPS)
        # One recursion evaluated twice, vmapped or not: float64 rounding only.
        np.testing.assert_allclose(result.predicted_loss[i],
                                   js.expected_loss(PROBLEM, b, optimizer=opt), rtol=1e-12)
        np.testing.assert_allclose(result.constant_loss[i],
                                   js.expected_loss(PROBLEM, constant, optimizer=opt), rtol=1e-12)
        exp = js.adaptive_expansion(PROBLEM, b, optimizer=opt)
        np.testing.assert_allclose(result.noise_term[i], exp.noise_term, rtol=1e-12)
        np.testing.assert_allclose(result.base_loss[i], exp.base_loss, rtol=1e-12)
        # loss_floor defaults to 0: the gain is the ratio of the losses themselves.
        np.testing.assert_allclose(result.gain[i], result.constant_loss[i] / result.predicted_loss[i],
                                   rtol=1e-14)


def test_budget_is_exact_and_sgd_only_fields_are_absent(adam_sweep):
    result, _, _ = adam_sweep
    kept = np.isin(result.status, [js.SweepStatus.OK, js.SweepStatus.MAX_ITERATIONS])
    assert kept.sum() == 4
    for i in np.flatnonzero(kept):
        b = result.batch_sizes[i]
        assert b.sum() == CONFIGS["samples"][i] and b.min() >= 1
    for name in ("phi", "correction", "objective", "relaxed_objective", "constant_objective",
                 "exact_loss", "exact_gain"):
        assert name not in result.outputs
    assert "phi" not in result.rows()[0]


def test_failures_are_reported_per_configuration(adam_sweep):
    result, _, _ = adam_sweep
    assert result.status[INFEASIBLE] == js.SweepStatus.INFEASIBLE_BUDGET
    assert result.result[INFEASIBLE] == int(js.RESULTS.infeasible_budget._value)
    assert "samples 10 < steps * min_batch = 20" in result.reason[INFEASIBLE]
    assert result.status[BAD_B2] == js.SweepStatus.INVALID_OPTIMIZER
    assert result.result[BAD_B2] == int(js.RESULTS.invalid_value._value)
    assert "(b2: must satisfy 0 < b2 < 1, got 1.5)" in result.reason[BAD_B2]
    for i in (INFEASIBLE, BAD_B2):
        assert not result.batch_sizes[i].any() and result.predicted_loss[i] == 0
    capped = result.status == js.SweepStatus.MAX_ITERATIONS
    assert np.all(result.result[capped] == int(js.RESULTS.max_iterations_reached._value))


def test_nonfinite_model_is_a_status_not_a_nan():
    # x0 = 1e200: the loss overflows to inf; the problem is a leaf, so the compiled core is reused.
    huge = js.GaussianLinearRegression(PROBLEM.cov, PROBLEM.x_star, jnp.full(3, 1e200), 1.0)
    result = js.sweep(huge, js.configurations(**CONFIGS), steps=STEPS, optimizer=js.Adam(1e-3),
                      chunk_size=CHUNK, progress=False)
    computed = [i for i in range(len(result)) if i not in (INFEASIBLE, BAD_B2)]
    assert np.all(result.status[computed] == js.SweepStatus.NONFINITE_MODEL)
    assert np.all(np.isfinite(result.predicted_loss)) and not result.batch_sizes.any()


def test_finished_folder_is_resumed_without_recomputing(adam_sweep, monkeypatch):
    result, _, folder = adam_sweep
    chunks = count_chunks(monkeypatch)
    again = js.sweep(PROBLEM, js.configurations(**CONFIGS), steps=STEPS, optimizer=js.Adam(1e-3),
                     chunk_size=CHUNK, results_dir=folder, progress=False)
    assert chunks == []
    for k, v in result.outputs.items():
        np.testing.assert_array_equal(again.outputs[k], v)  # read back from the chunk files
    np.testing.assert_array_equal(again.status, result.status)
    assert js.load_sweep(folder).status.tolist() == result.status.tolist()
    # An unfinished folder is read from its chunks: the rejected b2 keeps its status there too.
    (folder / "results.npz").rename(folder / "results.npz.bak")
    try:
        partial = js.load_sweep(folder)
    finally:
        (folder / "results.npz.bak").rename(folder / "results.npz")
    assert partial.status.tolist() == result.status.tolist()
    np.testing.assert_array_equal(partial.batch_sizes, result.batch_sizes)
    # The optimizer's lr is replaced by the column, so it is not part of the fingerprint ...
    js.sweep(PROBLEM, js.configurations(**CONFIGS), steps=STEPS, optimizer=js.Adam(0.5),
             chunk_size=CHUNK, results_dir=folder, progress=False)
    assert chunks == []
    # ... but its other fields are.
    with pytest.raises(ValueError, match="optimizer"):
        js.sweep(PROBLEM, js.configurations(**CONFIGS), steps=STEPS,
                 optimizer=js.Adam(1e-3, b1=0.8), chunk_size=CHUNK, results_dir=folder,
                 progress=False)


def test_sgd_folder_is_refused_then_recomputed_as_adam(adam_sweep, tmp_path, monkeypatch):
    result, _, _ = adam_sweep
    cfg = js.configurations(lr=CONFIGS["lr"][:3], samples=CONFIGS["samples"][:3])
    sgd = js.sweep(PROBLEM, cfg, steps=STEPS, chunk_size=CHUNK, results_dir=tmp_path,
                   exact=False, progress=False)  # exact losses: another compile, not needed here
    assert "phi" in sgd.outputs
    # the message lists the first changes by name: the optimizer's leaves, absent from SGD's
    with pytest.raises(ValueError, match="optimizer structure"):
        js.sweep(PROBLEM, cfg, steps=STEPS, optimizer=js.Adam(1e-3), chunk_size=CHUNK,
                 results_dir=tmp_path, progress=False)
    chunks = count_chunks(monkeypatch)
    adam = js.sweep(PROBLEM, cfg, steps=STEPS, optimizer=js.Adam(1e-3), chunk_size=CHUNK,
                    results_dir=tmp_path, overwrite=True, progress=False)
    assert chunks == [(0, 1, 2)]
    assert "phi" not in adam.outputs
    # configs 0 and 2 have b2 = 0.999 (Adam's default) in the module's sweep: the same optimum
    for i in (0, 2):
        np.testing.assert_array_equal(adam.batch_sizes[i], result.batch_sizes[i])
        np.testing.assert_allclose(adam.predicted_loss[i], result.predicted_loss[i], rtol=1e-12)


def test_rmsprop_and_refusals():
    cfg = js.configurations(lr=[0.01], samples=[100], decay=[0.9])
    with pytest.raises(ValueError, match="'b1'"):
        js.sweep(PROBLEM, js.configurations(lr=[0.01], samples=[100], b1=[0.5]), steps=STEPS,
                 optimizer=js.RMSprop(1e-3))
    with pytest.raises(ValueError, match="exact"):
        js.sweep(PROBLEM, cfg, steps=STEPS, optimizer=js.RMSprop(1e-3), exact=True)
    with pytest.raises(ValueError, match="optimizer"):
        js.sweep(PROBLEM, cfg, steps=STEPS, optimizer=js.SGD(0.1))
    with pytest.raises(ValueError, match="scalar lr"):
        js.sweep(PROBLEM, cfg, steps=STEPS, optimizer=js.RMSprop(jnp.full(STEPS, 0.01)))
