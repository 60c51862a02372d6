"""One sweep of 10^5 configurations (eigen path) in one call: time and throughput.

Gaussian features in their eigenbasis (``js.DiagonalGaussianRegression``, d = 10, eigenvalues 1 ...
0.01, label noise 0.5), K = 100 steps, a grid of 250 learning rates x 400 budgets. Prints the
wall time of the first call (compile + run), of a second call with the same shapes (run only),
the throughput in configurations per second, and a spot check of one configuration against
``js.optimal_schedule`` (same phi and batch sizes).

    python experiments/sweep_1e5.py [--lrs 250 --budgets 400 --steps 100]
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np

import jaxsched as js

parser = argparse.ArgumentParser()
parser.add_argument("--lrs", type=int, default=250)
parser.add_argument("--budgets", type=int, default=400)
parser.add_argument("--steps", type=int, default=100)
args = parser.parse_args()

lam = jnp.geomspace(1.0, 0.01, 10)
problem = js.DiagonalGaussianRegression(lam, jnp.ones(10), 0.5)
K = args.steps
grid = js.grid(lr=jnp.linspace(0.01, 0.5, args.lrs),
               samples=jnp.linspace(2 * K, 64 * K, args.budgets).round())
n = len(grid)

t0 = time.perf_counter()
res = js.sweep(problem, grid, steps=K, exact=False, progress=False)
first = time.perf_counter() - t0
t0 = time.perf_counter()
res = js.sweep(problem, grid, steps=K, exact=False, progress=False)
second = time.perf_counter() - t0
ok = int(np.sum(res.ok))
print(f"{n} configurations, K = {K}, d = 10, eigen path, {jax.device_count()} device(s)")
print(f"first call (compile + run): {first:.2f} s; second call: {second:.2f} s "
      f"-> {n / second:,.0f} configurations/s ({ok} ok)")

i = n // 3
cfg = {k: float(v[i]) for k, v in grid.columns.items() if k in ("lr", "samples")}
ref = js.optimal_schedule(problem, lr=cfg["lr"], steps=K, samples=cfg["samples"], sensitivity=js.Eigenbasis(),
                          stability_clip=False, warn=False)
rel = float(np.max(np.abs(np.asarray(res.phi[i]) - np.asarray(ref.phi)) / np.abs(np.asarray(ref.phi))))
same = bool(np.array_equal(np.asarray(res.batch_sizes[i]), np.asarray(ref.batch_sizes)))
print(f"spot check (lr {cfg['lr']:.4g}, samples {cfg['samples']:g}): phi rel. diff {rel:.2e}, "
      f"same batches: {same}")
