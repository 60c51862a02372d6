"""Tests of the sweep layer: one compiled, vmapped, sharded call equals the loop over
``optimal_schedule``; failures are reported per configuration; chunks resume from disk; the
eigenbasis path equals the closed form (theory 5.1) and the dense diffrax path (theory 4)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsched as js
from jaxsched._expansion import eigen as _eigen
from jaxsched._sweep import core as _core, driver as _driver
from jaxsched.cli import sweep as _sweep_cli

REPO = pathlib.Path(__file__).resolve().parents[1]

# Small problems: the dense path compiles once for this module (steps=20, chunks of 4).
STEPS = 20
COV = np.array([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 0.2]])
X_STAR = np.array([1.0, -1.0, 0.5])


def gaussian(noise_var):
    return js.GaussianLinearRegression(COV, jnp.asarray(X_STAR), jnp.zeros(3), noise_var)


def spectral(decay, noise_var):
    lam = jnp.arange(1.0, 7.0) ** (-decay)
    return js.DiagonalGaussianRegression(lam, jnp.linspace(1.0, -1.0, 6), noise_var)


GOOD = {"lr": [0.05, 0.1, 0.1, 0.05, 0.1, 0.2, 0.1, 0.05],
        "samples": [40, 100, 60, 200, 23, 80, 400, 57],
        "noise_var": [0.1, 1.0, 0.0, 0.5, 0.3, 0.2, 2.0, 0.7]}


def count_traces(mp: pytest.MonkeyPatch) -> list:
    """Record one entry per trace of the sweep core: the per-configuration function is traced once
    per compilation (vmap and lax.map trace their body once)."""
    calls = []
    original = _core._one_config

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mp.setattr(_core, "_one_config", counting)
    return calls


def count_chunks(mp: pytest.MonkeyPatch) -> list:
    """Record the configuration indices of every chunk computation."""
    calls = []
    original = _driver._run_chunk

    def counting(shared, builder, cols, params, members, *args):
        calls.append(tuple(int(i) for i in members))
        return original(shared, builder, cols, params, members, *args)

    mp.setattr(_driver, "_run_chunk", counting)
    return calls


@pytest.fixture(scope="module")
def dense_sweep():
    with pytest.MonkeyPatch.context() as mp:
        traces = count_traces(mp)
        result = js.sweep(gaussian, js.configurations(**GOOD), steps=STEPS, path="dense",
                          chunk_size=4, progress=False)
    return result, len(traces)


def test_sweep_equals_loop_of_optimal_schedule(dense_sweep):
    result, traces = dense_sweep
    # Two chunks, one trace: the chunk shape is fixed and every varying value is an array leaf.
    assert traces == 1
    assert result.ok.all()
    for i in range(len(result)):
        h, N, s2 = (GOOD[k][i] for k in ("lr", "samples", "noise_var"))
        p = gaussian(s2)
        ref = js.optimal_schedule(p, lr=h, steps=STEPS, samples=N)
        np.testing.assert_array_equal(result.batch_sizes[i], ref.batch_sizes)
        # Same algorithm and tolerances; only the vmapped arithmetic may round differently.
        np.testing.assert_allclose(result.predicted_loss[i], ref.predicted_loss, rtol=1e-10)
        np.testing.assert_allclose(result.phi[i], ref.phi, rtol=1e-8)
        np.testing.assert_allclose(result.gain[i], ref.gain_over_constant, rtol=1e-8)
        const = ref.base_loss + h * (ref.correction + ref.constant_objective)
        np.testing.assert_allclose(result.constant_loss[i], const, rtol=1e-10)
        # Exact losses: the recursion of theory 5.2 on the same schedules (no ODE involved).
        exact = js.exact_expected_loss(p, ref.batch_sizes, lr=h)
        exact_const = js.exact_expected_loss(p, jnp.full(STEPS, N / STEPS), lr=h)
        np.testing.assert_allclose(result.exact_loss[i], exact, rtol=1e-12)
        np.testing.assert_allclose(result.exact_constant_loss[i], exact_const, rtol=1e-12)
        assert int(result.batch_sizes[i].sum()) == N


def test_failing_configurations_are_reported_and_the_rest_intact(dense_sweep):
    good, _ = dense_sweep
    cfg = {k: list(v) for k, v in GOOD.items()}
    bad = {
        1: ("samples", 10, js.SweepStatus.INFEASIBLE_BUDGET, "samples 10 < steps * min_batch"),
        3: ("lr", -1.0, js.SweepStatus.INVALID_LR, "lr"),
        4: ("noise_var", np.nan, js.SweepStatus.INVALID_PARAMETER, "noise_var"),
        # lr x lam_max = 2.3 >= 2 (lam_max = 1.15 for COV): gradient descent diverges, whatever
        # the schedule; the first-order numbers are finite and must not be reported.
        5: ("lr", 2.0, js.SweepStatus.GD_DIVERGES, "gradient descent diverges"),
        # T = 2e6: the explicit solver needs millions of steps -> max_steps reached, throw=False
        # (a solver failure is reported before the divergence of gradient descent).
        6: ("lr", 1e5, js.SweepStatus.SOLVER_FAILED, "maximum number of solver steps"),
    }
    for i, (key, value, _, _) in bad.items():
        cfg[key][i] = value
    with pytest.MonkeyPatch.context() as mp:
        traces = count_traces(mp)
        result = js.sweep(gaussian, js.configurations(**cfg), steps=STEPS, path="dense",
                          chunk_size=4, progress=False)
    assert not traces  # same shapes: no recompilation
    for i in range(len(result)):
        if i in bad:
            _, _, status, text = bad[i]
            assert result.status[i] == status
            assert not result.ok[i] and text in result.reason[i]
            assert result.predicted_loss[i] == 0 and not result.batch_sizes[i].any()
        else:
            assert result.ok[i] and result.reason[i] == ""
            np.testing.assert_array_equal(result.batch_sizes[i], good.batch_sizes[i])
            np.testing.assert_allclose(result.predicted_loss[i], good.predicted_loss[i],
                                       rtol=1e-12)
    for v in result.outputs.values():
        assert np.all(np.isfinite(v))  # failures are statuses, never NaN


def test_eigen_path_failure_inside_the_core(spectral_reference):
    # An eigenvalue overflowing to inf (3^800) passes the host checks (the parameter is finite)
    # and makes phi non-finite inside the core. Same builder and chunk size as the fixture: no
    # recompilation.
    reference, _ = spectral_reference
    cfg = js.configurations(lr=[0.1, 0.1, 0.1, 0.1, 0.1], samples=[40] * 5,
                            decay=[0.5, -800.0, 0.5, 0.5, 0.5], noise_var=[0.0, 0.1, 0.1, 0.1, 0.1])
    with pytest.MonkeyPatch.context() as mp:
        traces = count_traces(mp)
        result = js.sweep(spectral, cfg, steps=STEPS, chunk_size=5, progress=False)
    assert not traces
    assert result.ok[0]
    np.testing.assert_array_equal(result.batch_sizes[0], reference.batch_sizes[0])
    assert result.status[1] == js.SweepStatus.NONFINITE_SENSITIVITY
    assert "not finite" in result.reason[1]


def _numpy_phi(X, y, x0, h, K, nodes=12):
    """phi_k of theory 4 for least squares with dense matrices and SciPy's expm: gradient flow
    x(t) = x^ + e^{-S t}(x0 - x^), Lam(t) = (1/2) e^{-S(T-t)} S e^{-S(T-t)},
    Sigma = mean_i r_i^2 a_i a_i^T - g g^T, Gauss-Legendre with 12 nodes per step (exact to
    rounding for these entire functions on steps of length 0.1)."""
    from scipy.linalg import expm

    n = len(y)
    S = X.T @ X / n
    x_hat = np.linalg.lstsq(X, y, rcond=None)[0]
    T = h * K
    xi, w = np.polynomial.legendre.leggauss(nodes)
    phi = np.zeros(K)
    for k in range(K):
        for t, wt in zip(h * (k + (1 + xi) / 2), h * w / 2, strict=True):
            x = x_hat + expm(-S * t) @ (x0 - x_hat)
            r = X @ x - y
            g = X.T @ r / n
            sigma = (X * r[:, None] ** 2).T @ X / n - np.outer(g, g)
            E = expm(-S * (T - t))
            phi[k] += wt * np.sum(0.5 * E @ S @ E * sigma)
    base = 0.5 * np.mean((X @ (x_hat + expm(-S * T) @ (x0 - x_hat)) - y) ** 2)
    return phi, base


def test_eigen_path_equals_closed_form_and_dense_reference():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    cov = Q @ np.diag([1.0, 0.5, 0.2, 0.05]) @ Q.T
    p = js.GaussianLinearRegression(cov, rng.normal(size=4), rng.normal(size=4), 0.3)
    h, K, T = 0.1, 30, 3.0
    parts = js.eigen_first_order_parts(p, lr=h, steps=K)
    # Closed form of theory 5.1 (exact exponential integrals): Gauss-Legendre with 8 nodes is
    # exact to rounding at lam h = 0.1.
    np.testing.assert_allclose(parts.phi, js.gaussian_sensitivity(p, lr=h, steps=K), rtol=1e-12)
    np.testing.assert_allclose(parts.correction, js.gaussian_correction(p, horizon=T), rtol=1e-12)
    np.testing.assert_allclose(parts.base_loss, js.gaussian_gd_loss(p, horizon=T), rtol=1e-12)
    # The same problem given by its spectrum.
    diag = js.DiagonalGaussianRegression.from_gaussian(p)
    np.testing.assert_allclose(js.eigen_first_order_parts(diag, lr=h, steps=K).phi, parts.phi,
                               rtol=1e-12)
    # Finite data, both routes (exact exponential sums for d^2 <= n, quadrature for d^2 > n),
    # against dense matrices in NumPy/SciPy. (The diffrax path is compared through
    # optimal_schedule above and in experiments/bench_sweep.py against SciPy's solve_ivp.)
    for n, d in ((40, 3), (12, 5)):
        X = rng.normal(size=(n, d))
        y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
        x0 = rng.normal(size=d)
        ours = js.eigen_first_order_parts(js.LinearRegressionData(X, y, x0), lr=h, steps=K)
        phi, base = _numpy_phi(X, y, x0, h, K)
        # expm and eigh round differently: a few hundred ulps on the smallest phi_k.
        np.testing.assert_allclose(ours.phi, phi, rtol=1e-10)
        np.testing.assert_allclose(ours.base_loss, base, rtol=1e-12)


def test_diagonal_exact_recursion_equals_dense_recursion():
    p = spectral(1.0, 0.4)
    b = jnp.asarray(np.random.default_rng(1).integers(1, 9, STEPS), float)
    e = _eigen._eigen_form(p)
    ours = _eigen._diagonal_exact(e, 1.0 / b, jnp.asarray(0.2))
    ref = js.exact_expected_loss(p.to_gaussian(), b, lr=0.2)  # theory 5.2, full M_k
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


SPECTRAL_GRID = {"lr": [0.1, 0.3], "samples": [40, 120], "decay": [0.5, 1.0, 2.0],
                 "noise_var": [0.0, 0.5]}


@pytest.fixture(scope="module")
def spectral_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = js.sweep(spectral, js.grid(**SPECTRAL_GRID), steps=STEPS, chunk_size=5,
                      results_dir=folder, progress=False)
    return result, folder


def test_interrupted_sweep_resumes_without_recomputing(tmp_path, spectral_reference, monkeypatch):
    reference, _ = spectral_reference
    computed = count_chunks(monkeypatch)
    cfg = js.grid(**SPECTRAL_GRID)  # 24 configurations in 5 chunks
    calls = []

    def stop_after_two(name, done, total):
        calls.append(name)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        js.sweep(spectral, cfg, steps=STEPS, chunk_size=5, results_dir=tmp_path,
                 progress=False, callback=stop_after_two)
    partial = js.load_sweep(tmp_path)
    assert (partial.status == -1).sum() == 24 - 10  # two chunks of 5 on disk
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files
    js.sweep(spectral, cfg, steps=STEPS, chunk_size=5, results_dir=tmp_path, progress=False,
             callback=lambda *a: calls.append(a[0]))
    chunks = sorted(tmp_path.glob("chunk-*.npz"))
    assert len(chunks) == 5 and len(calls) == 5
    # Every chunk computed exactly once over both runs.
    on_disk = sorted(tuple(np.load(c)["index"].tolist()) for c in chunks)
    assert sorted(computed) == on_disk
    # A third run finds everything on disk and computes nothing.
    again = js.sweep(spectral, cfg, steps=STEPS, chunk_size=5, results_dir=tmp_path,
                     progress=False)
    assert sorted(computed) == on_disk
    loaded = js.load_sweep(tmp_path)
    for res in (again, loaded):
        np.testing.assert_array_equal(res.status, reference.status)
        for k, v in reference.outputs.items():
            np.testing.assert_array_equal(res.outputs[k], v, err_msg=k)
    # The table: one row per configuration, grid coordinates, reloaded as numbers.
    rows = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 25 and rows[0].startswith("index,lr,samples,decay,noise_var")
    np.testing.assert_array_equal(loaded.on_grid("gain").shape, (2, 2, 3, 2))
    np.testing.assert_allclose(loaded.on_grid("gain")[1, 0, 2, 1],
                               reference.gain[np.ravel_multi_index((1, 0, 2, 1), (2, 2, 3, 2))])


def test_results_dir_of_another_sweep_is_refused(spectral_reference):
    _, folder = spectral_reference
    other = js.grid(**{**SPECTRAL_GRID, "lr": [0.1, 0.2]})
    with pytest.raises(ValueError, match="results_dir"):
        js.sweep(spectral, other, steps=STEPS, chunk_size=5, results_dir=folder, progress=False)


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import jaxsched as js
    from tests.test_sweep import spectral, SPECTRAL_GRID, STEPS
    assert len(jax.devices()) == 8
    cfg = js.grid(**SPECTRAL_GRID)
    sharded = js.sweep(spectral, cfg, steps=STEPS, chunk_size=5, progress=False)
    single = js.sweep(spectral, cfg, steps=STEPS, chunk_size=5, progress=False,
                      devices=jax.devices()[:1])
    for k, v in sharded.outputs.items():
        np.testing.assert_allclose(v, single.outputs[k], rtol=1e-12, err_msg=k)
    sharded.save(sys.argv[2])
""")


def test_sharded_on_eight_devices_equals_single_device(tmp_path, spectral_reference):
    reference, _ = spectral_reference
    out = tmp_path / "sharded.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(REPO), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = js.load_results(out)
    np.testing.assert_array_equal(sharded.status, reference.status)
    np.testing.assert_array_equal(sharded.batch_sizes, reference.batch_sizes)
    for k, v in reference.outputs.items():
        # Same arithmetic per configuration; XLA may vectorise another batch shape differently.
        np.testing.assert_allclose(sharded.outputs[k], v, rtol=1e-12, err_msg=k)


def test_gradient_of_swept_loss_holds_the_schedule_fixed():
    lr = jnp.asarray([0.1, 0.2])
    N = jnp.asarray([60.0, 90.0])
    noise = jnp.asarray([0.3, 0.6])
    decay = jnp.ones(2)

    def total(lr):
        out = js.sweep_core(spectral, lr=lr, samples=N, steps=STEPS, exact=False,
                            params={"decay": decay, "noise_var": noise})
        return jnp.sum(out.predicted_loss), out.batch_sizes

    (_, b), g = jax.value_and_grad(total, has_aux=True)(lr)
    for i in range(2):
        p = spectral(1.0, noise[i])

        def loss(h, i=i, p=p):
            parts = js.eigen_first_order_parts(p, lr=h, steps=STEPS)
            return parts.base_loss + h * (parts.correction + jnp.sum(parts.phi / b[i]))

        eps = 1e-6  # central difference: error O(eps^2) against rounding O(1e-16 / eps)
        fd = (loss(lr[i] + eps) - loss(lr[i] - eps)) / (2 * eps)
        np.testing.assert_allclose(g[i], fd, rtol=1e-7)


def test_cli_sweep_from_json(tmp_path):
    config = {
        "problem": {"kind": "gaussian", "dim": 6, "v0": 1.0},
        "grid": {"lr": [0.1, 0.3], "samples": {"start": 40, "stop": 120, "num": 2},
                 "decay": [0.5, 1.0, 2.0], "noise_var": [0.0, 0.5]},
        "sweep": {"steps": STEPS, "chunk_size": 5, "output": "out"},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert _sweep_cli.main(["sweep", str(path), "--no-progress"]) == 0
    table = (tmp_path / "out" / "results.csv").read_text().strip().splitlines()
    assert len(table) == 25
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**config, "grid": {**config["grid"], "colour": [1]}}))
    assert _sweep_cli.main(["sweep", str(bad)]) == 2


def test_validation_errors_name_the_argument():
    cfg = js.configurations(lr=[0.1], samples=[40])
    with pytest.raises(ValueError, match="steps"):
        js.sweep(gaussian(0.1), cfg)
    with pytest.raises(ValueError, match="path"):
        js.sweep(gaussian(0.1), cfg, steps=STEPS, path="fast")
    with pytest.raises(ValueError, match="configs"):
        js.sweep(gaussian(0.1), js.configurations(lr=[0.1]), steps=STEPS)
    with pytest.raises(ValueError, match="builder"):
        js.sweep(gaussian(0.1), js.configurations(lr=[0.1], samples=[40], noise_var=[1.0]),
                 steps=STEPS)
    with pytest.raises(ValueError, match="chunk_size"):
        js.sweep(gaussian(0.1), cfg, steps=STEPS, chunk_size=0)
    with pytest.raises(ValueError, match="exact"):
        p = js.Problem(lambda x: jnp.sum(x**2), lambda x: jnp.eye(1), jnp.ones(1))
        js.sweep(p, cfg, steps=STEPS, exact=True)
    with pytest.raises(ValueError, match="lr"):
        js.grid(lr=[], samples=[1])


def test_sweep_takes_the_same_sensitivity_objects_as_optimal_schedule():
    p = js.DiagonalGaussianRegression(jnp.asarray([1.0, 0.3, 0.05]), jnp.asarray([1.0, -2.0, 3.0]), 0.5)
    lrs = jnp.asarray([0.1, 0.2])
    out = js.sweep_core(p, lr=lrs, samples=jnp.asarray([80.0, 80.0]), steps=20,
                        sensitivity=js.Eigenbasis(nodes=8), exact=False)
    for i, h in enumerate(lrs):
        ref = js.optimal_schedule(p, lr=h, steps=20, samples=80, sensitivity=js.Eigenbasis(nodes=8))
        np.testing.assert_allclose(out.phi[i], ref.phi, rtol=1e-12)
        np.testing.assert_array_equal(out.batch_sizes[i], ref.batch_sizes)
    with pytest.raises(ValueError, match="sensitivity"):
        js.sweep_core(p, lr=lrs, samples=jnp.asarray([80.0, 80.0]), steps=20, sensitivity=js.MatrixFree())
    with pytest.raises(ValueError, match="sensitivity"):
        js.sweep(p, {"lr": lrs, "samples": jnp.asarray([80.0, 80.0])}, steps=20, sensitivity="spectral")
