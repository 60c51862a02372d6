"""Monte Carlo throughput: the forward-only lax.scan diffusion against the diffrax one, same problem.

Path-steps per second (paths x SGD steps / steady-state seconds: the fastest of the repeats after
the first call, whose compile time is reported separately) for simulate_sde with method="scan" and
method="diffrax", each with Euler–Maruyama and the stochastic Runge–Kutta solver at the same number
of substeps per SGD step, measured side by side in one process; minibatch SGD (simulate_sgd) for
reference. Target: scan >= 10x diffrax on CPU. (The two "srk" schemes differ: diffrax's GeneralShARK
is Stratonovich with Lévy areas, the scan's is an Itô predictor–corrector; both have a second-order
drift.)
Writes a JSON and a bar chart.

    python experiments/bench_mc.py [--paths 4000] [--steps 100] [--substeps 4] [--repeats 3]
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--paths", type=int, default=4000)
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--substeps", type=int, default=4)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--problem", choices=("gaussian", "diabetes"), default="gaussian")
parser.add_argument("--x64", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--out", default="results/bench_mc")
args = parser.parse_args()
jax.config.update("jax_enable_x64", args.x64)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import jaxsched as js

if args.problem == "gaussian":
    # theory 5.1 worked example (d = 3, Cholesky factor of Sigma, 3 Brownian motions)
    problem = js.GaussianLinearRegression(np.diag([1.0, 0.3, 0.05]), np.zeros(3),
                                          np.array([1.0, -2.0, 3.0]), noise_var=0.5)
else:
    # d = 10, the d x n diffusion of centred per-example gradients, n = 442 Brownian motions
    problem = js.datasets.diabetes_problem()
h = 0.05
b = np.full(args.steps, 8)
dt = h / args.substeps


def timed(run):
    t = time.perf_counter()
    jax.block_until_ready(run(0).final_loss)
    first = time.perf_counter() - t
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(i + 1).final_loss)
        times.append(time.perf_counter() - t)
    # the fastest repeat: the least disturbed by other load on the machine
    return first, float(np.min(times))


cases = {}
for method in ("scan", "diffrax"):
    for solver in ("euler", "srk"):
        cases[f"sde {method} {solver}"] = (
            lambda i, method=method, solver=solver: js.simulate_sde(
                problem, b, lr=h, num_paths=args.paths, key=jax.random.key(i), method=method,
                solver=solver, dt=dt))
cases["sgd"] = lambda i: js.simulate_sgd(problem, b, lr=h, num_paths=args.paths,
                                         key=jax.random.key(i))

results = {"device": str(jax.devices()[0]), "x64": args.x64, "problem": args.problem,
           "paths": args.paths, "steps": args.steps, "substeps": args.substeps, "cases": {}}
for name, run in cases.items():
    first, steady = timed(run)
    rate = args.paths * args.steps / steady
    results["cases"][name] = {"first_call_s": first, "steady_s": steady, "path_steps_per_s": rate}
    print(f"{name:>18}: first call {first:7.2f} s, steady {steady:8.4f} s, "
          f"{rate:12.4g} path-steps/s", flush=True)

c = results["cases"]
for solver in ("euler", "srk"):
    ratio = c[f"sde scan {solver}"]["path_steps_per_s"] / c[f"sde diffrax {solver}"]["path_steps_per_s"]
    results[f"scan_over_diffrax_{solver}"] = ratio
    print(f"scan / diffrax ({solver}): {ratio:.1f}x  (target >= 10x)")

os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out + ".json", "w") as f:
    json.dump(results, f, indent=2)
fig, ax = plt.subplots(figsize=(7, 3.5))
names = list(c)
ax.barh(names, [c[n]["path_steps_per_s"] for n in names])
ax.set_xscale("log")
ax.set_xlabel("path-steps per second (steady state)")
ax.set_title(f"{args.problem}: {args.paths} paths x {args.steps} steps, {args.substeps} substeps, "
             f"{results['device']}", fontsize=9)
fig.tight_layout()
fig.savefig(args.out + ".png", dpi=120)
print(f"wrote {args.out}.json and {args.out}.png")
