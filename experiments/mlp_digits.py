"""Optimal batch schedule for an MLP (>= 10^4 parameters) on scikit-learn's digits data.

The sensitivity phi_k comes from the matrix-free path (no d x d matrix: d ~ 10^4 here), estimated
from a uniform sample of examples with its standard error; the schedule is the exact integer
optimum of sum_k phi_k / b_k at the sample budget (theory 4). The prediction
E F(x_K) ~ F(x_T) + h (grad F . mc_T + sum_k phi_k / b_k) (theory 3) is then checked against Monte
Carlo of real minibatch SGD for the optimal, the constant and a linear-ramp schedule at equal
samples, with standard errors. The gain is reported as measured, whatever it is.

    python experiments/mlp_digits.py [--width 134] [--steps 60] [--lr 0.2] [--samples 960]
                                     [--paths 256] [--examples 8] [--x64]

Writes results/mlp_digits.json and results/mlp_digits.png.
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--width", type=int, default=134, help="hidden width (134 gives d = 10060)")
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--lr", type=float, default=0.2)
parser.add_argument("--samples", type=int, default=960, help="sample budget N (mean batch N/K)")
parser.add_argument("--paths", type=int, default=256, help="Monte Carlo SGD paths per schedule")
parser.add_argument("--examples", type=int, default=8, help="examples sampled for phi")
parser.add_argument("--steps-per-panel", type=int, default=15)
parser.add_argument("--nodes-per-panel", type=int, default=2)
parser.add_argument("--rtol", type=float, default=1e-4)
parser.add_argument("--ramp-ratio", type=float, default=8.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--x64", action=argparse.BooleanOptionalAction, default=False)
parser.add_argument("--out", default="results/mlp_digits")
args = parser.parse_args()
jax.config.update("jax_enable_x64", args.x64)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jaxsched as js  # noqa: E402

# ------------------------------------------------------------------------------------------------
# the model and its data: a user's equinox MLP, the loss is the mean cross-entropy on all 1797 digits
X, y = load_digits(return_X_y=True)
key = jax.random.PRNGKey(args.seed)
model = eqx.nn.MLP(64, 10, args.width, 1, activation=jnp.tanh, key=key)
params, static = eqx.partition(model, eqx.is_array)


def cross_entropy(p, example):
    image, label = example
    logits = eqx.combine(p, static)(image)
    return jax.nn.logsumexp(logits) - logits[label]


dtype = jnp.float64 if args.x64 else jnp.float32
problem = js.DataProblem(cross_entropy, (jnp.asarray(X / 16.0, dtype), jnp.asarray(y)), params)
h, K, N = args.lr, args.steps, args.samples
print(f"d = {problem.dim}, n = {problem.num_examples}, h = {h}, K = {K}, N = {N}, {dtype.__name__}")

# ------------------------------------------------------------------------------------------------
# sensitivity, matrix-free and subsampled
t0 = time.perf_counter()
sens = js.sensitivity_matrix_free(
    problem, lr=h, steps=K, num_examples=args.examples, chunk_size=args.examples,
    key=jax.random.fold_in(key, 1), nodes_per_panel=args.nodes_per_panel,
    steps_per_panel=args.steps_per_panel, rtol=args.rtol, atol=args.rtol * 1e-3,
    memory_analysis=True)
phi = np.asarray(sens.phi, np.float64)
phi_se = np.asarray(sens.stderr, np.float64)
t_phi = time.perf_counter() - t0
print(f"phi: {t_phi:.1f} s, {len(sens.node_times)} nodes, compiled buffers "
      f"{sens.memory.total / 2**20:.1f} MiB (one d x d matrix: "
      f"{problem.dim**2 * jnp.dtype(dtype).itemsize / 2**20:.0f} MiB)")


# ------------------------------------------------------------------------------------------------
# schedule-independent parts of the prediction, matrix-free: x_T and the drift correction mc_T
def flow_field(t, state, p):
    x, mc = state
    g = p.gradient(x)
    return (-g, -p.hvp(x, mc) - 0.5 * p.hvp(x, g))


@eqx.filter_jit
def flow(p, T):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(flow_field), diffrax.Tsit5(), 0.0, T, None,
        (p.x0, jnp.zeros_like(p.x0)), args=p,
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9), max_steps=100_000)
    xT, mcT = (leaf[-1] for leaf in sol.ys)
    return p.value(xT), p.gradient(xT) @ mcT


base, corr = (float(v) for v in flow(problem, jnp.asarray(h * K, dtype)))
print(f"F(x_T) = {base:.5f}, drift correction grad F . mc_T = {corr:.5f}")

# ------------------------------------------------------------------------------------------------
# schedules at equal samples
schedules = {
    "optimal": np.asarray(js.integer_optimum(phi, N, min_batch=1)),
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
    "device": str(jax.devices()[0]), "dtype": dtype.__name__, "d": problem.dim,
    "n": problem.num_examples, "lr": h, "steps": K, "samples": N, "paths": args.paths,
    "phi_examples": args.examples, "phi_nodes": len(sens.node_times), "phi_seconds": t_phi,
    "phi_memory_bytes": sens.memory._asdict(), "phi": phi.tolist(), "phi_stderr": phi_se.tolist(),
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
