"""Time per optimal schedule against the dimension d: the eigenbasis path (O(d) per time point,
Gaussian features given by their spectrum, d = 10 .. 10^4) and the dense diffrax path
(``optimal_schedule(..., sensitivity=js.DenseAdjoint())``: ``d x d`` adjoint, O(d^3) per
right-hand side, d = 10 .. 500), plus the dense path's memory from XLA's memory analysis of its
compiled program (compiled only, not run, up to d = 1210), in bytes and in ``d x d`` buffers.
Both for the dense adjoint's default (long DOP853 steps, ``phi`` from the dense output) and, in the
same process so that the ratios hold under the same machine load, for the earlier method that
lands on every step boundary (``js.DenseAdjoint(land_on_boundaries=True)``, "landing"); the
dense rows also time the sensitivity alone (``js.sensitivity``), the part the method changes.

Problem: Gaussian linear regression (theory 5.1) with eigenvalues ``lam_i = 1 / i``, initial
offset ``v0_i = 1 / sqrt(d)``, label noise 0.5, ``h = 0.1``, 200 steps, budget 8 per step. The
dense path gets the same spectrum rotated by a random orthogonal matrix. Compile time is excluded
(best of repeated calls after a first one). Fitted exponents: least squares slope of
log(time) (and log(bytes)) against log(d) over the larger half of the dimensions (the asymptotic
regime): theory 3 for the dense time, 2 for its memory.

    python experiments/bench_scaling.py [--quick] [--dense-only] [--out results]
"""

import argparse
import json
import os
import sys
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="fewer dimensions (dense up to 100)")
parser.add_argument("--dense-only", action="store_true",
                    help="only the dense rows: d = 500 timed, memory at d = 1210 (no eigen path, no plot)")
parser.add_argument("--out", default="results")
args = parser.parse_args()
jax.config.update("jax_enable_x64", True)
# The package of this checkout, ahead of an installed copy (the script's folder is what Python puts
# first on sys.path, not the repository root).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsched as js  # noqa: E402

H, K = 0.1, 200
SAMPLES = 8 * K
if args.dense_only:
    EIGEN_DIMS, DENSE_DIMS, MEMORY_DIMS = [], [500], [1210]
elif args.quick:
    EIGEN_DIMS, DENSE_DIMS, MEMORY_DIMS = [10, 100, 1000, 10000], [10, 30, 100], [50, 100, 300]
else:
    EIGEN_DIMS = [10, 30, 100, 300, 1000, 3000, 10000]
    DENSE_DIMS = [10, 20, 50, 100, 200, 500]
    MEMORY_DIMS = [50, 100, 300, 600, 1210]
METHODS = {"dense": js.DenseAdjoint(), "landing": js.DenseAdjoint(land_on_boundaries=True)}


def spectrum(d):
    lam = 1.0 / np.arange(1, d + 1)
    return lam, np.full(d, 1.0 / np.sqrt(d))


def best_time(fn, repeats):
    """First call (compile + run) and the best of ``repeats`` later calls (least disturbed by
    other processes)."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return first, float(np.min(times))


def exponent(dims, times):
    half = len(dims) // 2
    x, y = np.log(dims[half:]), np.log(times[half:])
    return float(np.polyfit(x, y, 1)[0])


results = {"eigen": [], "dense": [], "landing": []}
print(f"Gaussian features, lam_i = 1/i, h = {H}, {K} steps, budget {SAMPLES}; "
      f"device {jax.devices()[0]}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
      f"({os.cpu_count()} CPUs)")
for d in EIGEN_DIMS:
    lam, v0 = spectrum(d)
    problem = js.DiagonalGaussianRegression(lam, v0, 0.5)

    def run(problem=problem):
        return js.sweep_core(problem, lr=jnp.asarray([H]), samples=jnp.asarray([SAMPLES]),
                             steps=K, exact=False).batch_sizes

    first, t = best_time(run, repeats=7)
    b = np.asarray(run())[0]
    assert b.sum() == SAMPLES
    results["eigen"].append({"d": d, "seconds": t, "first_call_s": first})
    print(f"eigen path  d = {d:6d}: {1e3 * t:9.2f} ms per optimal schedule "
          f"(first call {first:.1f} s)")

rng = np.random.default_rng(0)
for d in DENSE_DIMS:
    lam, v0 = spectrum(d)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    problem = js.GaussianLinearRegression((Q * lam) @ Q.T, np.zeros(d), Q @ v0, 0.5)
    phis = {}
    for path, method in METHODS.items():
        def run(problem=problem, method=method):
            return js.optimal_schedule(problem, lr=H, steps=K, samples=SAMPLES,
                                       sensitivity=method).batch_sizes

        def phi(problem=problem, method=method):
            return js.sensitivity(problem, lr=H, steps=K, method=method)

        first, t = best_time(run, repeats=3 if d <= 100 else 1)
        _, t_phi = best_time(phi, repeats=3 if d <= 100 else 1)
        phis[path] = np.asarray(phi())
        if d <= 200:  # the eigen path on the same problem (one eigh) gives the same schedule
            eig = js.sweep_core(problem, lr=jnp.asarray([H]), samples=jnp.asarray([SAMPLES]),
                                steps=K, exact=False).batch_sizes[0]
            assert np.abs(np.asarray(eig) - np.asarray(run())).max() <= 1
        results[path].append({"d": d, "seconds": t, "first_call_s": first, "sensitivity_s": t_phi})
        print(f"{path:<8} path d = {d:6d}: {1e3 * t:9.2f} ms per optimal schedule, "
              f"{1e3 * t_phi:9.2f} ms per sensitivity (first call {first:.1f} s)", flush=True)
    ref = np.asarray(js.sensitivity(problem, lr=H, steps=K, method=js.Eigenbasis()))
    errors = {k: float(np.max(np.abs(v - ref) / np.abs(ref))) for k, v in phis.items()}
    results["dense"][-1]["phi_rel_error"] = errors["dense"]
    results["landing"][-1]["phi_rel_error"] = errors["landing"]
    new, old = results["dense"][-1], results["landing"][-1]
    print(f"         d = {d:6d}: dense / landing time {new['seconds'] / old['seconds']:.2f} "
          f"(schedule), {new['sensitivity_s'] / old['sensitivity_s']:.2f} (sensitivity); largest "
          f"per-step relative error of phi against the eigenbasis closed form: dense "
          f"{errors['dense']:.1e}, landing {errors['landing']:.1e}")


def dense_memory(d: int, method) -> int:
    """Bytes (arguments + outputs + peak temporaries) of the dense method's compiled program."""
    import diffrax

    from jaxsched._expansion import _common as cm
    from jaxsched._expansion.sensitivity import _parts_core

    lam, v0 = spectrum(d)
    problem = js.GaussianLinearRegression(np.diag(lam), np.zeros(d), v0, 0.5)
    dtype = problem.x0.dtype
    units = cm.step_units(js.SGD(H), K, dtype)
    rtol, atol = cm.tolerances(dtype, None, None)
    lowered = _parts_core.lower(method, problem, units, K, rtol, atol, diffrax.Tsit5())
    m = lowered.compile().compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


for path, method in METHODS.items():
    results[f"{path}_memory"] = []
    for d in MEMORY_DIMS:
        t = time.perf_counter()
        b = dense_memory(d, method)
        buffers = b / (d * d * 8)
        results[f"{path}_memory"].append({"d": d, "bytes": b, "dxd_buffers": buffers})
        print(f"{path:<8} memory d = {d:5d}: {b / 2**20:9.1f} MiB = {buffers:5.1f} d x d float64 "
              f"buffers (compiled in {time.perf_counter() - t:.1f} s)", flush=True)
    if len(MEMORY_DIMS) > 1:
        mem_d = np.array([r["d"] for r in results[f"{path}_memory"]], float)
        mem_b = np.array([r["bytes"] for r in results[f"{path}_memory"]], float)
        results[f"{path}_memory_exponent"] = exponent(mem_d, mem_b)
        print(f"{path} memory ~ d^{results[f'{path}_memory_exponent']:.2f} (theory 2)")

if args.dense_only:
    sys.exit(0)
for path in ("eigen", "dense", "landing"):
    dims = np.array([r["d"] for r in results[path]], float)
    times = np.array([r["seconds"] for r in results[path]])
    results[f"{path}_exponent"] = exponent(dims, times)
print(f"fitted exponents (time ~ d^p over the larger half of d): eigen p = "
      f"{results['eigen_exponent']:.2f} (theory 1), dense p = {results['dense_exponent']:.2f}, "
      f"landing p = {results['landing_exponent']:.2f} (theory 3 once O(d^3) dominates)")

os.makedirs(args.out, exist_ok=True)
name = "bench_scaling_quick" if args.quick else "bench_scaling"
with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(5.5, 4))
for path, marker in (("eigen", "o"), ("dense", "s"), ("landing", "^")):
    dims = [r["d"] for r in results[path]]
    times = [r["seconds"] for r in results[path]]
    ax.loglog(dims, times, marker=marker,
              label=f"{path} path (fitted d^{results[path + '_exponent']:.2f})")
ax.set_xlabel("dimension d")
ax.set_ylabel("seconds per optimal schedule")
ax.set_title(f"Optimal schedule, {K} steps ({jax.devices()[0].platform})")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=150)
print(f"wrote {os.path.join(args.out, name)}.json and .png")
