"""Sweep benchmark: >= 1000 configurations of the diabetes problem (d = 10, 200 steps) through
``jaxsched.sweep`` against a straightforward SciPy reference, side by side in one run.

The reference solves the same equations of theory 3-4 with ``scipy.integrate.solve_ivp``
(DOP853, rtol 1e-10): the gradient flow and drift correction forward with a dense interpolant,
then the adjoint ``a, Lam`` and ``q(t) = int_t^T phi`` backward, ``phi_k = q_k - q_{k+1}``; then
the square-root rule with the bounds (``brentq`` on the multiplier). It runs in a Python loop on
an evenly spaced subset of the configurations and its time is scaled per configuration.

Checks: relative agreement 1e-6 on the predicted loss (relaxed optimum from each side's own
``phi``, and the sweep's integer schedule evaluated with the reference ``phi``). Prints compile
time, time per configuration for each, the ratio, the gradient/forward ratio of
``jax.grad(sum of swept predicted losses)`` with respect to the learning rates, and the number of
traces of the sweep (chunked: several chunks, one trace). With ``--dense`` also times the dense
diffrax path on a subset.

    python experiments/bench_sweep.py [--quick] [--dense] [--out results]

The last line reads ``speedup_vs_scipy=<x> grad_over_forward=<y> traces=<n>``.
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="200 configurations, 3 SciPy runs")
parser.add_argument("--dense", action="store_true", help="also time the dense diffrax path")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--out", default="results")
args = parser.parse_args()
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402
from scipy.optimize import brentq  # noqa: E402

import jaxsched as js  # noqa: E402
from jaxsched import _sweep  # noqa: E402

K = args.steps
N_LR, N_SAMPLES, N_REF = (10, 20, 3) if args.quick else (25, 40, 12)
LRS = np.linspace(0.01, 0.1, N_LR)
SAMPLES = np.round(np.geomspace(2 * K, 40 * K, N_SAMPLES))
problem = js.datasets.diabetes_problem()
X, y = js.datasets.diabetes_data()


# ---------------------------------------------------------------------------------------------
# SciPy reference, written plainly


def scipy_first_order(lr, steps, rtol=1e-10, atol=1e-12):
    """phi_k, F(x_T) and grad F . mc_T of theory 3-4 for least squares, with solve_ivp."""
    n, d = X.shape
    S = X.T @ X / n

    def grad(x):
        return X.T @ (X @ x - y) / n

    def sigma(x):
        r = X @ x - y
        g = X.T @ r / n
        return (X * (r**2)[:, None]).T @ X / n - np.outer(g, g)

    T = lr * steps

    def forward(t, u):
        g = grad(u[:d])
        return np.concatenate([-g, -S @ u[d:] - 0.5 * S @ g])

    fwd = solve_ivp(forward, (0.0, T), np.zeros(2 * d), method="DOP853", rtol=rtol, atol=atol,
                    dense_output=True)
    xT, mcT = fwd.y[:d, -1], fwd.y[d:, -1]
    gF = grad(xT)

    def backward(t, u):  # a' = S a, Lam' = S Lam + Lam S (D3f = 0), q' = -tr(Lam Sigma(x(t)))
        a, Lam = u[:d], u[d:d + d * d].reshape(d, d)
        x = fwd.sol(t)[:d]
        return np.concatenate([S @ a, (S @ Lam + Lam @ S).ravel(), [-np.sum(Lam * sigma(x))]])

    ts = lr * np.arange(steps, -1, -1)
    bwd = solve_ivp(backward, (T, 0.0), np.concatenate([gF, 0.5 * S.ravel(), [0.0]]),
                    method="DOP853", rtol=rtol, atol=atol, t_eval=ts)
    q = bwd.y[-1][::-1]
    return q[:-1] - q[1:], 0.5 * np.mean((X @ xT - y) ** 2), gF @ mcT


def sqrt_rule(phi, samples, lo=1.0, hi=np.inf):
    """b_k = clip(sqrt(phi_k / nu), lo, hi) with sum_k b_k = samples (theory 4)."""
    hi = min(hi, samples)
    root = np.sqrt(phi)

    def excess(log_nu):
        return np.sum(np.clip(root * np.exp(-0.5 * log_nu), lo, hi)) - samples

    a = np.log(phi.min() / hi**2) - 1.0
    b = np.log(phi.max() / lo**2) + 1.0
    return np.clip(root * np.exp(-0.5 * brentq(excess, a, b, xtol=1e-15, rtol=1e-15)), lo, hi)


# ---------------------------------------------------------------------------------------------
# the sweep

cfg = js.grid(lr=LRS, samples=SAMPLES)
n = len(cfg)
chunk = n // 4  # four chunks: still one trace
print(f"diabetes problem, d = {X.shape[1]}, n = {X.shape[0]}, {K} steps, {n} configurations "
      f"({N_LR} learning rates x {N_SAMPLES} budgets), chunks of {chunk}, "
      f"device {jax.devices()[0]}")

traces0 = _sweep.TRACE_COUNTS["sweep"]
t = time.perf_counter()
result = js.sweep(problem, cfg, steps=K, exact=False, chunk_size=chunk, progress=False)
first = time.perf_counter() - t
traces = _sweep.TRACE_COUNTS["sweep"] - traces0
runs = []
for _ in range(3):
    t = time.perf_counter()
    result = js.sweep(problem, cfg, steps=K, exact=False, chunk_size=chunk, progress=False)
    runs.append(time.perf_counter() - t)
sweep_total = float(np.median(runs))
sweep_per = sweep_total / n
compile_s = first - sweep_total
assert _sweep.TRACE_COUNTS["sweep"] - traces0 == traces, "the sweep recompiled"
print(f"sweep: first call {first:.2f} s (compile ~{compile_s:.2f} s), then {sweep_total:.3f} s "
      f"for {n} = {1e3 * sweep_per:.3f} ms per configuration; traces = {traces}; "
      f"{int(result.ok.sum())}/{n} ok")

# ---------------------------------------------------------------------------------------------
# SciPy loop on a subset

subset = np.unique(np.linspace(0, n - 1, N_REF).round().astype(int))
errors_relaxed, errors_integer = [], []
t = time.perf_counter()
reference = {}
for i in subset:
    lr, N = cfg.columns["lr"][i], cfg.columns["samples"][i]
    phi, base, corr = scipy_first_order(lr, K)
    beta = sqrt_rule(phi, N)
    reference[i] = (phi, base, corr, beta)
scipy_total = time.perf_counter() - t
scipy_per = scipy_total / len(subset)
for i in subset:
    phi, base, corr, beta = reference[i]
    lr = cfg.columns["lr"][i]
    ref_relaxed = base + lr * (corr + np.sum(phi / beta))
    ours_relaxed = (result.base_loss[i] + lr * (result.correction[i]
                                                + result.relaxed_objective[i]))
    b = result.batch_sizes[i, :K]
    ref_integer = base + lr * (corr + np.sum(phi / b))
    errors_relaxed.append(abs(ours_relaxed / ref_relaxed - 1))
    errors_integer.append(abs(result.predicted_loss[i] / ref_integer - 1))
agree = max(errors_relaxed + errors_integer)
print(f"scipy (solve_ivp DOP853 + sqrt rule): {scipy_total:.2f} s for {len(subset)} = "
      f"{1e3 * scipy_per:.1f} ms per configuration")
print(f"agreement on the predicted loss: max relative difference {agree:.2e} "
      f"(relaxed optimum {max(errors_relaxed):.2e}, integer schedule {max(errors_integer):.2e})"
      f" -> {'ok' if agree <= 1e-6 else 'FAILED'} (target 1e-6)")
speedup = scipy_per / sweep_per
print(f"speedup (time per configuration, scipy / sweep): {speedup:.1f}x")

# ---------------------------------------------------------------------------------------------
# gradient of the swept predicted loss with respect to the learning rates

lr_all = jnp.asarray(cfg.columns["lr"])
N_all = jnp.asarray(cfg.columns["samples"])


def swept(lr):
    return js.sweep_core(problem, lr=lr, samples=N_all, steps=K, exact=False).predicted_loss


forward = jax.jit(swept)
gradient = jax.jit(jax.grad(lambda lr: jnp.sum(swept(lr))))


def median_time(fn, x, repeats=3):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


t_fwd = median_time(forward, lr_all)
t_grad = median_time(gradient, lr_all)
g = gradient(lr_all)
grad_ratio = t_grad / t_fwd
print(f"jax.grad of the sum of {n} predicted losses w.r.t. lr: {t_grad:.3f} s vs forward "
      f"{t_fwd:.3f} s -> ratio {grad_ratio:.2f}; all finite: {bool(jnp.all(jnp.isfinite(g)))}")

out = {
    "device": str(jax.devices()[0]),
    "steps": K,
    "configurations": n,
    "chunk_size": chunk,
    "sweep_first_call_s": first,
    "sweep_compile_s": compile_s,
    "sweep_s": sweep_total,
    "sweep_ms_per_config": 1e3 * sweep_per,
    "scipy_configs": len(subset),
    "scipy_ms_per_config": 1e3 * scipy_per,
    "speedup_vs_scipy": speedup,
    "max_relative_difference": agree,
    "forward_s": t_fwd,
    "grad_s": t_grad,
    "grad_over_forward": grad_ratio,
    "traces": traces,
}

# ---------------------------------------------------------------------------------------------
# optional: the dense diffrax path (any problem; O(d^3) per right-hand side)

if args.dense:
    sub = js.configurations(lr=cfg.columns["lr"][subset], samples=cfg.columns["samples"][subset])
    t = time.perf_counter()
    dense = js.sweep(problem, sub, steps=K, path="dense", exact=False, progress=False)
    dense_first = time.perf_counter() - t
    t = time.perf_counter()
    dense = js.sweep(problem, sub, steps=K, path="dense", exact=False, progress=False)
    dense_total = time.perf_counter() - t
    diff = np.max(np.abs(dense.predicted_loss / result.predicted_loss[subset] - 1))
    print(f"dense diffrax path on the subset: first call {dense_first:.1f} s, then "
          f"{1e3 * dense_total / len(subset):.1f} ms per configuration "
          f"({scipy_per / (dense_total / len(subset)):.1f}x scipy); max relative difference to "
          f"the eigen path {diff:.1e}")
    out.update(dense_ms_per_config=1e3 * dense_total / len(subset), dense_first_call_s=dense_first,
               dense_vs_eigen_max_relative_difference=float(diff))

os.makedirs(args.out, exist_ok=True)
path = os.path.join(args.out, "bench_sweep_quick.json" if args.quick else "bench_sweep.json")
with open(path, "w") as f:
    json.dump(out, f, indent=2)
print(f"wrote {path}")
print(f"speedup_vs_scipy={speedup:.1f} grad_over_forward={grad_ratio:.2f} traces={traces}")
