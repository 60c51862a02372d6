"""Adam / RMSprop batch schedules by gradient descent through the moment model, measured on real
optax (docs/theory.md §9.4's table on this project's problem).

For Gaussian linear regression (d = 5, eigenvalues spanning 100x, label noise 1; Adam, RMSprop,
Adam with b2 = 0.99) and logistic regression on the breast-cancer data (Adam), h = 0.01,
K = 1000, N = 8000 (mean batch 8), optax defaults: the optimum found through the discrete L1 model
(and, with --continuous, through the diffrax form) against the constant schedule, a linear ramp,
step doubling and plain SGD's square-root rule. Every schedule is run with real optax Adam /
RMSprop on the same path keys (common random numbers), and the ratio of excess losses
``(E F - min f)`` to the constant's is reported with a 95% interval from the paired per-path
losses (delta method). The model's predicted ratio is printed next to it.

Writes results/adam_schedules.png (the optimum's shape for b2 = 0.999 and 0.99, and RMSprop).

    python experiments/adam_schedules.py [--paths 6000] [--continuous] [--max-iter 100] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jaxsched as js  # noqa: E402

H, K, N = 0.01, 1000, 8000


def issue_problem(d=5, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    cov = (Q * np.logspace(0, -2, d)) @ Q.T
    return js.GaussianLinearRegression(0.5 * (cov + cov.T), np.zeros(d), np.ones(d), 1.0)


def cancer_problem():
    """Logistic regression on scikit-learn's breast-cancer data: features standardised, projected on
    their 5 principal components, plus a bias; x0 = 0; sampled with replacement. Returns the
    problem and ``min f`` (Newton's method on the full-data loss)."""
    import jax.numpy as jnp
    from sklearn.datasets import load_breast_cancer

    from jaxsched.datasets import standardise

    X, y = load_breast_cancer(return_X_y=True)
    X = standardise(X)
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    A, t = np.hstack([X @ vt[:5].T, np.ones((X.shape[0], 1))]), y.astype(np.float64)

    def loss(p, ex):
        a, label = ex
        z = a @ p
        return jnp.logaddexp(0.0, z) - label * z

    x = np.zeros(A.shape[1])
    for _ in range(50):  # Newton on a strictly convex loss: converges quadratically
        s = 1 / (1 + np.exp(-(A @ x)))
        x = x - np.linalg.solve((A * (s * (1 - s))[:, None]).T @ A, A.T @ (s - t))
    z = A @ x
    floor = float(np.mean(np.logaddexp(0.0, z) - t * z))
    return js.DataProblem(loss, (A, t), np.zeros(A.shape[1])), floor


def paired_ratio(a, b):
    """``mean(a) / mean(b)`` and its standard error from paired samples (delta method)."""
    r = a.mean() / b.mean()
    return r, np.std(a - r * b, ddof=1) / (np.sqrt(a.size) * b.mean())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--paths", type=int, default=6000)
    parser.add_argument("--continuous", action="store_true",
                        help="also optimise through the diffrax form and compare on real optax")
    parser.add_argument("--out", default="results")
    parser.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations")
    parser.add_argument("--only", nargs="*", default=None, help="names of the rows to run")
    args = parser.parse_args()
    gauss = issue_problem()
    cancer, cancer_floor = cancer_problem()
    baselines = {"ramp": js.linear_ramp(K, N), "doubling": js.step_doubling(K, N)}
    configs = [("Adam", gauss, js.Adam(H)), ("RMSprop", gauss, js.RMSprop(H)),
               ("Adam b2=0.99", gauss, js.Adam(H, b2=0.99)),
               ("breast cancer logistic, Adam", cancer, js.Adam(H))]
    if args.only:
        configs = [c for c in configs if c[0] in args.only]
    key = jax.random.key(2024)
    shapes = {}
    print(f"Gaussian linear regression d=5 and breast-cancer logistic regression (5 PCs + bias), "
          f"h={H}, K={K}, N={N}; {args.paths} real-optax paths per schedule (common random "
          "numbers); excess-loss ratio to the constant, 95% intervals")
    for name, problem, opt in configs:
        floor = cancer_floor if problem is cancer else 0.5 * float(problem.noise_var)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", js.UntestedRangeWarning)
            res = js.adaptive_optimal_schedule(problem, optimizer=opt, steps=K, samples=N,
                                               loss_floor=floor, baselines=baselines,
                                               max_iter=args.max_iter)
        t_opt = time.perf_counter() - t0
        schedules = {"optimised": res.batch_sizes, "constant": js.constant_schedule(K, N),
                     "ramp": baselines["ramp"], "doubling": baselines["doubling"]}
        sqrt_b = js.integer_optimum(js.sensitivity(problem, lr=H, steps=K), N)
        schedules["sgd_sqrt_rule"] = sqrt_b
        if args.continuous:
            resc = js.adaptive_optimal_schedule(problem, optimizer=opt, steps=K, samples=N,
                                                loss_floor=floor, model="continuous",
                                                max_iter=args.max_iter)
            schedules["optimised (diffrax)"] = resc.batch_sizes
        losses = {}
        for sname, b in schedules.items():
            r = js.simulate_sgd(problem, b, optimizer=opt, num_paths=args.paths, key=key)
            losses[sname] = np.asarray(r.final_loss) - floor
        print(f"\n{name}: optimum in {int(res.iterations)} L-BFGS iterations, {t_opt:.1f} s")
        for sname, a in losses.items():
            ratio, se = paired_ratio(a, losses["constant"])
            pred = {"optimised": res.ratios["constant"],
                    "sgd_sqrt_rule": res.ratios["constant"] / res.ratios["sgd_sqrt_rule"],
                    "ramp": res.ratios["constant"] / res.ratios["ramp"],
                    "doubling": res.ratios["constant"] / res.ratios["doubling"],
                    "constant": 1.0}.get(sname)
            if sname == "optimised (diffrax)":
                pred = (float(resc.predicted_loss) - floor) / (float(resc.baseline_losses[0]) - floor)
            model_mc = a.mean() / (np.std(a, ddof=1) / np.sqrt(a.size))
            print(f"  {sname:>20s}: measured {ratio:.3f} ± {1.96 * se:.3f}   predicted {pred:.3f}   "
                  f"excess loss {a.mean():.5f} (MC/SE {model_mc:.0f})")
        shapes[name] = np.asarray(res.batch_sizes)

    os.makedirs(args.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, b in shapes.items():
        blocks = b.reshape(-1, 20).mean(1)  # the optimiser's 50 blocks of 20 steps
        ax.step(np.arange(blocks.size) * 20, blocks, where="post", label=name)
    ax.axhline(N / K, color="k", lw=0.8, ls="--", label="constant")
    ax.set_xlabel("step")
    ax.set_ylabel("batch size")
    ax.set_title(f"Optimal batch schedule through the moment model (h={H}, K={K}, N={N})")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "adam_schedules.png")
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
