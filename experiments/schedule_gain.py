"""What the optimal batch schedule gains on real minibatch SGD, at equal samples.

For each problem, the first-order optimal schedule (theory 4, exact integer optimum) and three
baselines with the same sample budget N (constant, linear ramp 1:8, step doubling in 4 stages) are
run as real minibatch SGD (simulate_sgd, control variate on); reported: the Monte Carlo final loss
with its 95% interval, the noise-induced excess over plain gradient descent (E F(x_K) - F(x_K^GD)),
the prediction F(x_T) + h J1, and for the quadratic problems the exact E F(x_K) (theory 5.2/5.3).
The gain of the optimal schedule is the ratio of excesses; it is reported as measured, small or not.
Writes a bar chart and a JSON.

    python experiments/schedule_gain.py [--paths 4000] [--quick] [--out results/schedule_gain]
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--paths", type=int, default=4000)
parser.add_argument("--quick", action="store_true", help="a quarter of the paths")
parser.add_argument("--out", default="results/schedule_gain")
args = parser.parse_args()
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_breast_cancer

import jaxsched as js

PATHS = args.paths // 4 if args.quick else args.paths


def logistic_loss(p, ex):
    a, t = ex
    z = a @ p
    return jnp.logaddexp(0.0, z) - t * z


def cancer_problem():
    X, y = load_breast_cancer(return_X_y=True)
    X = np.hstack([js.datasets.standardise(X), np.ones((X.shape[0], 1))])
    return js.DataProblem(logistic_loss, (X, y.astype(np.float64)), np.zeros(X.shape[1]))


PROBLEMS = {
    # theory 5.1 worked example: T = 10, h N = 40
    "gaussian": (lambda: js.GaussianLinearRegression(np.diag([1.0, 0.3, 0.05]), np.zeros(3),
                                                     np.array([1.0, -2.0, 3.0]), noise_var=0.5),
                 0.05, 200, 800),
    # theory 5.3 reference setting: h = 0.05, K = 400, N = 3200
    "diabetes": (js.datasets.diabetes_problem, 0.05, 400, 3200),
    # logistic regression, T = 3, mean batch 4
    "breast_cancer": (cancer_problem, 0.1, 30, 120),
}


def gd_loss(problem, h, steps):
    @jax.jit
    def run(x0):
        x, _ = jax.lax.scan(lambda x, _: (x - h * problem.gradient(x), None), x0, None, length=steps)
        return problem.terminal_value(x)

    return float(run(problem.x0))


def study(name, seed):
    make, h, steps, samples = PROBLEMS[name]
    problem = make()
    schedules = {
        "optimal": js.optimal_schedule(problem, lr=h, steps=steps, samples=samples).batch_sizes,
        "constant": js.constant_schedule(steps, samples),
        "linear ramp": js.linear_ramp(steps, samples),
        "step doubling": js.step_doubling(steps, samples),
    }
    gd = gd_loss(problem, h, steps)
    out = {"lr": h, "steps": steps, "samples": samples, "gd_loss": gd, "schedules": {}}
    for i, (sched, b) in enumerate(schedules.items()):
        b = np.asarray(b)
        assert b.sum() == samples, (name, sched, b.sum())
        t = time.perf_counter()
        r = js.simulate_sgd(problem, b, lr=h, num_paths=PATHS, key=jax.random.key(seed + i),
                            control_variate=True)
        mean, se = float(r.mean()), float(r.stderr())
        row = {"batch_sizes": b.tolist(), "mc_mean": mean, "mc_stderr": se,
               "mc_excess": mean - gd, "mc_excess_ci95": 1.96 * se,
               "predicted": float(js.expected_loss(problem, b, lr=h)),
               "seconds": time.perf_counter() - t}
        if problem.is_quadratic:
            row["exact"] = float(js.exact_expected_loss(problem, b, lr=h))
        out["schedules"][sched] = row
        exact = f" exact={row['exact']:.6f}" if "exact" in row else ""
        print(f"{name:>13} {sched:>13}: MC={mean:.6f}±{1.96 * se:.1e} (95%) excess over GD="
              f"{mean - gd:.2e} predicted={row['predicted']:.6f}{exact}", flush=True)
    opt = out["schedules"]["optimal"]
    for sched in ("constant", "linear ramp", "step doubling"):
        other = out["schedules"][sched]
        diff = other["mc_mean"] - opt["mc_mean"]
        diff_ci = 1.96 * float(np.hypot(other["mc_stderr"], opt["mc_stderr"]))
        gain = other["mc_excess"] / opt["mc_excess"] if opt["mc_excess"] > 0 else float("nan")
        out[f"gain_vs_{sched.replace(' ', '_')}"] = {
            "loss_difference": diff, "loss_difference_ci95": diff_ci, "excess_ratio": gain}
        print(f"{name:>13} optimal vs {sched}: loss lower by {diff:.2e} ± {diff_ci:.1e} (95%), "
              f"excess ratio {gain:.2f}x", flush=True)
    return out


def plot(results):
    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(5 * len(PROBLEMS), 3.8))
    for ax, name in zip(axes, PROBLEMS, strict=True):
        rows = results[name]["schedules"]
        names = list(rows)
        ax.bar(names, [rows[n]["mc_excess"] for n in names],
               yerr=[rows[n]["mc_excess_ci95"] for n in names], capsize=4, color="C0",
               label="Monte Carlo SGD (95% CI)")
        ax.plot(names, [rows[n]["predicted"] - results[name]["gd_loss"] for n in names], "k_",
                markersize=18, label="predicted")
        if "exact" in rows["optimal"]:
            ax.plot(names, [rows[n]["exact"] - results[name]["gd_loss"] for n in names], "r_",
                    markersize=12, label="exact")
        ax.set_ylabel("E F(x_K) - F(GD)")
        ax.set_title(f"{name}: h={results[name]['lr']}, K={results[name]['steps']}, "
                     f"N={results[name]['samples']}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


def main():
    t0 = time.perf_counter()
    results = {"paths": PATHS, "device": str(jax.devices()[0])}
    for i, name in enumerate(PROBLEMS):
        results[name] = study(name, seed=1000 * (i + 1))
    results["seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=2)
    plot(results)
    print(f"wrote {args.out}.json and {args.out}.png ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
