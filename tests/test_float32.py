"""Float32 as a first-class path: every entry runs on float32 problems (genuine float32
computation: the problem's dtype sets every array's, checked below), with its float32 tolerances
(rtol 1e-5, atol 1e-7 in the ODE solves), and this file states how far the float32 results are
from float64 on the diabetes problem and on a small MLP.

Measured (CPU, this file's sizes; the bounds asserted below are 5-100x these, each with its
reason):

- diabetes (eigen path, 40 steps, lr 0.05): phi 2.8e-7 relative, optimal batch sizes identical,
  predicted loss (ODE moment solve) 1.6e-7, exact loss 4e-10, the exact gain over the constant
  batch 2.3e-5 (a ratio of differences of nearby losses: about 100x the losses' rounding);
- diabetes through the dense adjoint (ODE solves at rtol 1e-5): phi 6.8e-7;
- MLP 64 -> 4 -> 10 on 100 digits (d = 310), against a float64 matrix-free reference with every
  example: dense-adjoint phi 5e-7, matrix-free phi 1.8e-7, predicted loss 1.4e-7, optimal batch
  sizes identical.

So in float32 expect about 6 significant digits of phi and of the losses, 5 from the dense
adjoint (its float32 tolerance rtol 1e-5), 4-5 of a gain, and integer schedules equal to the
float64 ones except, possibly, one sample where the real optimum sits at a rounding boundary.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsched as js

STEPS, LR, SAMPLES = 40, 0.05, 40 * 16


def _diabetes(dtype):
    X, y = js.datasets.diabetes_data()
    return js.LinearRegressionData(X.astype(dtype), y.astype(dtype), np.zeros(X.shape[1], dtype))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def diabetes():
    out = {}
    for dtype in (np.float32, np.float64):
        p = _diabetes(dtype)
        opt = js.optimal_schedule(p, lr=LR, steps=STEPS, samples=SAMPLES)
        const = js.constant_schedule(STEPS, SAMPLES)
        gd = js.exact_gd_loss(p, lr=LR, steps=STEPS)
        exact_opt = js.exact_expected_loss(p, opt.batch_sizes, lr=LR)
        exact_const = js.exact_expected_loss(p, const, lr=LR)
        out[dtype] = dict(
            problem=p, opt=opt,
            predicted=js.expected_loss(p, opt.batch_sizes, lr=LR),
            exact=exact_opt, gain=(exact_const - gd) / (exact_opt - gd),
            dense=js.sensitivity(p, lr=LR, steps=STEPS, method="dense"),
        )
    return out


def test_float32_is_genuinely_float32(diabetes):
    r = diabetes[np.float32]
    for name in ("phi", "beta", "predicted_loss", "base_loss"):
        assert getattr(r["opt"], name).dtype == jnp.float32, name
    for name in ("predicted", "exact", "gain", "dense"):
        assert r[name].dtype == jnp.float32, name
    assert diabetes[np.float64]["opt"].phi.dtype == jnp.float64


def test_diabetes_float32_against_float64(diabetes):
    a, b = diabetes[np.float32], diabetes[np.float64]
    diffs = {
        "phi": _rel(a["opt"].phi, b["opt"].phi),
        "batch": float(np.max(np.abs(np.asarray(a["opt"].batch_sizes) - np.asarray(b["opt"].batch_sizes)))),
        "predicted": _rel(a["predicted"], b["predicted"]),
        "exact": _rel(a["exact"], b["exact"]),
        "gain": _rel(a["gain"], b["gain"]),
        "dense": _rel(a["dense"], b["dense"]),
    }
    print("diabetes float32 vs float64:", {k: f"{v:.1e}" for k, v in diffs.items()})
    # Closed forms in float32: a few ulps (6e-8) of rounding per operation over 40 steps.
    assert diffs["phi"] < 2e-6
    assert diffs["batch"] <= 1
    assert int(np.sum(a["opt"].batch_sizes)) == SAMPLES  # the budget is exact in float32 too
    assert diffs["predicted"] < 1e-5  # ODE moment solve at rtol 1e-5
    assert diffs["exact"] < 2e-6
    # The gain (exact_const - gd) / (exact_opt - gd) divides differences of nearby losses: the
    # rounding of the losses (1e-7) is amplified by loss / (loss - gd), about 100 here.
    assert diffs["gain"] < 2e-4
    # The dense adjoint's float32 solves run at rtol 1e-5: agreement to about that.
    assert diffs["dense"] < 1e-4


def _mlp(dtype):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = jnp.asarray(X[:100] / 16.0, dtype), jnp.asarray(y[:100])
    model = eqx.nn.MLP(64, 10, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree_util.tree_map(lambda v: v.astype(dtype), params)

    def loss(p, ex):
        logits = eqx.combine(p, static)(ex[0])
        return jax.nn.logsumexp(logits) - logits[ex[1]]

    return js.DataProblem(loss, (X, y), params)


@pytest.fixture(scope="module")
def mlp():
    # float32: the dense adjoint through optimal_schedule and the matrix-free sensitivity. The
    # float64 reference is one optimal_schedule on the matrix-free sensitivity with every example
    # (exact to solver tolerance: it equals the float64 dense adjoint to 1e-6 relative,
    # tests/test_data_problem.py), so no second dense compile is needed for the reference.
    p32, p64 = _mlp(jnp.float32), _mlp(jnp.float64)
    return dict(
        problem=p32,
        # warn=False: optimal_schedule's lr-range warning runs a power iteration whose start
        # vector is float64 for a float32 problem when x64 is on (jvp dtype error; reported).
        dense=js.optimal_schedule(p32, lr=0.2, steps=10, samples=160, sensitivity="dense",
                                  warn=False),
        mf=js.sensitivity_matrix_free(p32, lr=0.2, steps=10, chunk_size=50),
        reference=js.optimal_schedule(p64, lr=0.2, steps=10, samples=160,
                                      sensitivity=js.MatrixFree(chunk_size=50), warn=False),
    )


def test_mlp_float32_against_float64(mlp):
    a, ref = mlp, mlp["reference"]
    assert a["problem"].x0.dtype == jnp.float32 and a["dense"].phi.dtype == jnp.float32
    assert a["mf"].phi.dtype == jnp.float32 and ref.phi.dtype == jnp.float64
    diffs = {
        "dense phi": _rel(a["dense"].phi, ref.phi),
        "matrix-free phi": _rel(a["mf"].phi, ref.phi),
        "predicted": _rel(a["dense"].predicted_loss, ref.predicted_loss),
        "batch": float(np.max(np.abs(np.asarray(a["dense"].batch_sizes)
                                     - np.asarray(ref.batch_sizes)))),
    }
    print("MLP float32 vs float64:", {k: f"{v:.1e}" for k, v in diffs.items()})
    # ODE solves at the float32 tolerance rtol 1e-5; 1e-4 leaves a factor 10 for rounding (the
    # float64 reference's own error, 1e-6, is far below).
    assert diffs["dense phi"] < 1e-4
    assert diffs["matrix-free phi"] < 1e-4
    assert diffs["predicted"] < 1e-4
    assert diffs["batch"] <= 1
