"""Forward solve of the expected loss and its reverse-mode gradient, diabetes problem, 400 steps.

Measures, in one process: compile time of each, steady-state time per call (median of repeats),
and the gradient/forward ratio (target <= 3). Also the adjoint sensitivity (all phi_k at once).

    python experiments/bench_core.py [--repeats 20] [--no-x64]
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--repeats", type=int, default=20)
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--x64", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--out", default="results/bench_core.json")
args = parser.parse_args()
jax.config.update("jax_enable_x64", args.x64)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsched as js  # noqa: E402
from jaxsched.datasets import diabetes_problem  # noqa: E402

problem = diabetes_problem()
h, K = 0.05, args.steps
b = jnp.asarray(np.linspace(2.0, 14.0, K))

forward = jax.jit(lambda p, b: js.expected_loss(p, b, lr=h))
gradient = jax.jit(jax.grad(lambda b, p: js.expected_loss(p, b, lr=h)))
sens = jax.jit(lambda p: js.sensitivity(p, lr=h, steps=K))


def timed(fn, *a):
    t = time.perf_counter()
    jax.block_until_ready(fn(*a))
    first = time.perf_counter() - t
    runs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        runs.append(time.perf_counter() - t)
    return first, float(np.median(runs))


c_f, t_f = timed(forward, problem, b)
c_g, t_g = timed(gradient, b, problem)
c_s, t_s = timed(sens, problem)
res = {
    "device": str(jax.devices()[0]),
    "x64": args.x64,
    "steps": K,
    "forward_first_call_s": c_f,
    "forward_s": t_f,
    "gradient_first_call_s": c_g,
    "gradient_s": t_g,
    "sensitivity_first_call_s": c_s,
    "sensitivity_s": t_s,
    "grad_over_forward": t_g / t_f,
}
for k, v in res.items():
    print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    json.dump(res, f, indent=2)
print(f"grad_over_forward={t_g / t_f:.3f}")
