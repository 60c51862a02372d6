"""Optimal batch schedule for an MLP (>= 10^5 parameters) on scikit-learn's digits data, through
``js.optimal_schedule(..., sensitivity=js.MatrixFree(num_examples=m, key=...))``.

The sensitivity phi_k comes from the matrix-free path (no d x d matrix: d ~ 10^5 here, one d x d
float32 matrix would be 40 GB), estimated from an importance sample of m examples with its standard
error; the schedule is the exact integer optimum of sum_k phi_k / b_k at the sample budget
(theory 4). The prediction E F(x_K) ~ F(x_T) + h (correction + sum_k phi_k / b_k) (theory 3) is
then checked against Monte Carlo of real minibatch SGD (``js.simulate_sgd``) for the optimal, the
constant and a linear-ramp schedule at equal samples, with 95% intervals. The gain is reported as
measured, whatever it is. XLA's memory analysis of the compiled matrix-free program is printed
(one more compile of the same program, ahead of time, timed separately).

    python experiments/mlp_digits.py [--width 1334] [--n 512] [--steps 20] [--lr 0.2]
                                     [--samples 320] [--paths 256] [--examples 8] [--x64]

Writes results/mlp_digits.json and results/mlp_digits.png.
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--width", type=int, default=1334, help="hidden width (1334 gives d = 100060)")
parser.add_argument("--n", type=int, default=512, help="digits examples in the loss (of 1797)")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--lr", type=float, default=0.2)
parser.add_argument("--samples", type=int, default=320, help="sample budget N (mean batch N/K)")
parser.add_argument("--paths", type=int, default=256, help="Monte Carlo SGD paths per schedule")
parser.add_argument("--examples", type=int, default=8, help="examples sampled for phi")
parser.add_argument("--steps-per-panel", type=int, default=10)
parser.add_argument("--nodes-per-panel", type=int, default=2)
parser.add_argument("--rtol", type=float, default=1e-4)
parser.add_argument("--ramp-ratio", type=float, default=8.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--x64", action=argparse.BooleanOptionalAction, default=False)
parser.add_argument("--out", default="results/mlp_digits")
args = parser.parse_args()
jax.config.update("jax_enable_x64", args.x64)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jaxsched as js  # noqa: E402
from jaxsched._expansion import matrix_free as _mf  # noqa: E402  (memory analysis only)

# ------------------------------------------------------------------------------------------------
# the model and its data: a user's equinox MLP, the loss is the mean cross-entropy on n digits
X, y = load_digits(return_X_y=True)
X, y = X[: args.n], y[: args.n]
key = jax.random.PRNGKey(args.seed)
model = eqx.nn.MLP(64, 10, args.width, 1, activation=jnp.tanh, key=key)
params, static = eqx.partition(model, eqx.is_array)


def cross_entropy(p, example):
    image, label = example
    logits = eqx.combine(p, static)(image)
    return jax.nn.logsumexp(logits) - logits[label]


dtype = jnp.float64 if args.x64 else jnp.float32
params = jax.tree_util.tree_map(lambda v: v.astype(dtype), params)
problem = js.DataProblem(cross_entropy, (jnp.asarray(X / 16.0, dtype), jnp.asarray(y)), params)
h, K, N = args.lr, args.steps, args.samples
print(f"d = {problem.dim}, n = {problem.num_examples}, h = {h}, K = {K}, N = {N}, "
      f"{jnp.dtype(dtype).name}; device {jax.devices()[0]}")

# ------------------------------------------------------------------------------------------------
# the optimal schedule, with phi matrix-free and subsampled (importance sampling)
mf_options = dict(num_examples=args.examples, chunk_size=args.examples, key=jax.random.fold_in(key, 1),
                  nodes_per_panel=args.nodes_per_panel, steps_per_panel=args.steps_per_panel)
t0 = time.perf_counter()
opt = js.optimal_schedule(problem, lr=h, steps=K, samples=N, min_batch=1,
                          sensitivity=js.MatrixFree(**mf_options), rtol=args.rtol,
                          atol=args.rtol * 1e-3)
jax.block_until_ready(opt)
t_phi = time.perf_counter() - t0
phi = np.asarray(opt.phi, np.float64)
print(f"optimal_schedule (matrix-free phi, compile included): {t_phi:.1f} s; objective "
      f"{float(opt.objective):.4g} +- {float(opt.objective_stderr):.2g} (SE bound)")

t0 = time.perf_counter()
prep = _mf._prepare(problem, h, K, args.examples, args.examples, mf_options["key"],
                    args.nodes_per_panel, args.steps_per_panel, args.rtol, args.rtol * 1e-3, None,
                    16384, "importance")
memory = _mf._memory_stats(_mf._matrix_free_core.lower(*prep.core_args).compile())
dxd = problem.dim**2 * jnp.dtype(dtype).itemsize
print(f"matrix-free program: {memory.total / 2**20:.1f} MiB of buffers (XLA memory analysis; "
      f"one d x d matrix: {dxd / 2**30:.1f} GiB, ratio {memory.total / dxd:.1e}); "
      f"analysis {time.perf_counter() - t0:.1f} s")
# the same sample's standard errors per step, for the plot (the schedule's own are in opt)
sens = js.sensitivity_matrix_free(problem, lr=h, steps=K, rtol=args.rtol, atol=args.rtol * 1e-3,
                                  **mf_options)
phi_se = np.asarray(sens.stderr, np.float64)
base, corr = float(opt.base_loss), float(opt.correction)
print(f"F(x_T) = {base:.5f}, drift correction {corr:.5f}")

# ------------------------------------------------------------------------------------------------
# schedules at equal samples
schedules = {
    "optimal": np.asarray(opt.batch_sizes),
    "constant": np.asarray(js.constant_schedule(K, N)),
    "linear ramp": np.asarray(js.linear_ramp(K, N, ratio=args.ramp_ratio)),
}
for name, b in schedules.items():
    assert int(b.sum()) == N, name
neg = js.negative_sensitivity_report(phi, schedules["optimal"])


def noise_term(b):
    """sum_k phi_k / b_k and its standard error (phi's errors are correlated across steps through
    the common sample, so the SE of the sum is bounded by the sum of the SEs)."""
    return float(np.sum(phi / b)), float(np.sum(phi_se / b))


pred = {}
for name, b in schedules.items():
    s, s_se = noise_term(b)
    pred[name] = {"noise_term": s, "noise_term_se_bound": s_se,
                  "predicted_loss": base + h * (corr + s)}
gain = pred["constant"]["noise_term"] / pred["optimal"]["noise_term"]
print(f"predicted gain over constant (noise term): {gain:.3f}")

# ------------------------------------------------------------------------------------------------
# Monte Carlo of real minibatch SGD
mc = {}
for i, (name, b) in enumerate(schedules.items()):
    t0 = time.perf_counter()
    r = js.simulate_sgd(problem, b, lr=h, num_paths=args.paths, key=jax.random.fold_in(key, 10 + i))
    mc[name] = {"mean": float(r.mean()), "stderr": float(r.stderr()),
                "seconds": time.perf_counter() - t0}
    print(f"{name:12s} MC E F = {mc[name]['mean']:.5f} +- {mc[name]['stderr']:.5f}   "
          f"predicted {pred[name]['predicted_loss']:.5f}")

diffs = {}
for name in ("constant", "linear ramp"):
    d = mc[name]["mean"] - mc["optimal"]["mean"]
    se = float(np.hypot(mc[name]["stderr"], mc["optimal"]["stderr"]))
    pd = h * (pred[name]["noise_term"] - pred["optimal"]["noise_term"])
    diffs[name] = {"mc_minus_optimal": d, "stderr": se, "predicted": pd}
    print(f"{name:12s} - optimal: MC {d:+.5f} +- {se:.5f} (95%: {d - 1.96 * se:+.5f} .. "
          f"{d + 1.96 * se:+.5f}), predicted {pd:+.5f}")
excess = {name: mc[name]["mean"] - base for name in mc}
mc_gain = excess["constant"] / excess["optimal"]
print("measured excess over F(x_T): " + ", ".join(f"{k} {v:.5f}" for k, v in excess.items()))

# ------------------------------------------------------------------------------------------------
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
result = {
    "device": str(jax.devices()[0]), "dtype": jnp.dtype(dtype).name, "d": problem.dim,
    "n": problem.num_examples, "lr": h, "steps": K, "samples": N, "paths": args.paths,
    "phi_examples": args.examples, "phi_nodes": len(sens.node_times),
    "optimal_schedule_seconds": t_phi, "phi_memory_bytes": memory._asdict(), "dxd_bytes": dxd,
    "phi": phi.tolist(), "phi_stderr": phi_se.tolist(),
    "node_times": np.asarray(sens.node_times).tolist(),
    "phi_at_nodes": np.asarray(sens.phi_nodes).tolist(),
    "negative_phi_steps": neg.steps.tolist(), "negative_phi_mass_share": neg.share_of_mass,
    "base_loss": base, "correction": corr,
    "schedules": {k: v.tolist() for k, v in schedules.items()},
    "predicted": pred, "predicted_gain": gain, "monte_carlo": mc, "differences": diffs,
    "measured_excess_over_gradient_flow": excess, "measured_gain_of_excess": mc_gain,
}
with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
t_mid = (np.arange(K) + 0.5) * h
ax1.plot(t_mid, phi / h, label="phi_k / h (per-step mean)")
ax1.fill_between(t_mid, (phi - 2 * phi_se) / h, (phi + 2 * phi_se) / h, alpha=0.3,
                 label="+- 2 SE (subsample)")
ax1.plot(np.asarray(sens.node_times), np.asarray(sens.phi_nodes), "o", label="phi(t) at nodes")
ax1.set_xlabel("t = k h")
ax1.set_ylabel("phi(t)")
if np.all(phi - 2 * phi_se > 0):
    ax1.set_yscale("log")  # phi spans decades: a boundary layer just before T
ax1.set_title(f"sensitivity, MLP d = {problem.dim} (matrix-free, m = {args.examples})")
ax1.legend()
for name, b in schedules.items():
    ax2.step(np.arange(K), b, where="post",
             label=f"{name}: MC E F = {mc[name]['mean']:.4f} +- {mc[name]['stderr']:.4f}")
ax2.set_xlabel("step k")
ax2.set_ylabel("batch size")
ax2.set_title(f"N = {N} samples; predicted gain {gain:.2f}x (noise term)")
ax2.legend(fontsize=8)
fig.tight_layout()
fig.savefig(args.out + ".png", dpi=120)
print(f"wrote {args.out}.json and {args.out}.png")
