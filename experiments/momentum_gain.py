"""What the optimal batch schedule gains with momentum (docs/theory.md §7), on the standardised
diabetes data: heavy ball and Nesterov at mu = 0.9, optimal schedules against the constant batch,
a linear ramp and step doubling at equal samples.

For each optimizer (optax's trace form, lr h, intrinsic step tau = h / (1 - mu)):

- three optima: the first-order square-root rule (``js.ClosedForm``), its boundary-layer refinement
  for momentum (``js.RefinedClosedForm``) and the true optimum of the exact recursion
  (``js.ExactDiscrete``);
- the exact excess loss ``E f(x_K) - min f`` of every schedule (the augmented-state recursion of
  §7, the ground truth for this quadratic problem);
- real ``optax.sgd(momentum=mu, nesterov=...)`` by Monte Carlo (``js.simulate_sgd``, control
  variate), the same random numbers for every schedule: the excess with a 95% interval, and the
  paired difference to the constant batch with its 95% interval.

The stability clip is off (``stability_clip=False``): the script checks instead that every schedule
stays above ``2 b_stab`` (b_stab of a finite data set costs O(d^6) per step, the same at every step
of a constant lr, so it is computed once).

Run: python experiments/momentum_gain.py [--lr 0.001] [--steps 400] [--samples 3200] [--paths 2000]
Writes results/momentum_gain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import jaxsched as js

jax.config.update("jax_enable_x64", True)


def baselines(steps: int, samples: int) -> dict[str, np.ndarray]:
    return {
        "constant": np.asarray(js.constant_schedule(steps, samples)),
        "linear ramp (x8)": np.asarray(js.linear_ramp(steps, samples, ratio=8.0)),
        "step doubling (4)": np.asarray(js.step_doubling(steps, samples, stages=4)),
    }


def optima(p, opt, steps: int, samples: int) -> dict[str, tuple[np.ndarray, float]]:
    """``name -> (integer batch sizes, seconds)`` for the three control methods."""
    out = {}
    methods = (("first-order optimum", js.ClosedForm()), ("refined optimum", js.RefinedClosedForm()),
               ("exact-discrete optimum", js.ExactDiscrete(max_iter=300)))
    for name, method in methods:
        t0 = time.perf_counter()
        res = js.optimal_schedule(p, optimizer=opt, steps=steps, samples=samples, method=method,
                                  stability_clip=False)
        out[name] = (np.asarray(res.batch_sizes), time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.001, help="learning rate h")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--samples", type=int, default=3200)
    parser.add_argument("--paths", type=int, default=2000, help="Monte Carlo paths per schedule")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    p = js.datasets.diabetes_problem()
    K, N, h, mu = args.steps, args.samples, args.lr, args.momentum
    lam_max = 0.1 / js.largest_safe_lr(p)  # largest_safe_lr = 0.1 / lam_max (momentum 0)
    f_star = float(js.exact_gd_loss(p, lr=0.05, steps=200_000))  # gradient descent converged
    tau = h / (1 - mu)
    print(f"diabetes (n = 442, d = 10, lam_max = {lam_max:.3f}), x0 = 0; h = {h}, mu = {mu}, "
          f"tau = {tau:.4g}, T = K tau = {K * tau:.3g}, K = {K}, N = {N}, "
          f"h lam_max / (1 - mu)^2 = {h * lam_max / (1 - mu) ** 2:.3g}")
    print(f"excess = E f(x_K) - min f; MC: real optax, {args.paths} paths, control variate, "
          "95% intervals; 'vs constant' = paired MC difference (same random numbers)\n")
    report = {"problem": "diabetes", "lr": h, "momentum": mu, "steps": K, "samples": N,
              "paths": args.paths, "f_star": f_star, "optimizers": {}}
    for label, nesterov in (("heavy ball", False), ("Nesterov", True)):
        opt = js.SGD(h, momentum=mu, nesterov=nesterov)
        schedules = {name: (b, 0.0) for name, b in baselines(K, N).items()}
        schedules.update(optima(p, opt, K, N))
        b_stab = float(np.asarray(js.stability_batch(p, opt, 1))[0])  # the same at every step
        gd = float(js.exact_gd_loss(p, optimizer=opt, steps=K)) - f_star
        rows, est = {}, {}
        for name, (b, seconds) in schedules.items():
            assert int(b.sum()) == N and b.min() >= 2 * b_stab, (name, b.min(), b_stab)
            exact = float(js.exact_expected_loss(p, b.astype(float), optimizer=opt)) - f_star
            r = js.simulate_sgd(p, b, optimizer=opt, num_paths=args.paths, key=jax.random.key(0),
                                control_variate=True)
            est[name] = np.asarray(r.estimator) - f_star
            mc, se = float(est[name].mean()), float(r.stderr())
            rows[name] = dict(exact=exact, mc=mc, mc_ci95=1.96 * se, seconds=seconds,
                              first_batch=int(b[0]), last_batch=int(b[-1]))
        const = rows["constant"]["exact"]
        print(f"{label}, mu = {mu}: gradient descent excess {gd:.6f}, b_stab = {b_stab:.3g}")
        print(f"  {'schedule':24s} {'b_0':>4s} {'b_K-1':>5s} {'exact excess':>12s} {'/ const':>7s} "
              f"{'noise / const':>13s} {'MC excess (95%)':>22s} {'MC vs constant (95%)':>24s}")
        for name, row in rows.items():
            diff = est[name] - est["constant"]
            row["mc_minus_constant"] = float(diff.mean())
            row["mc_minus_constant_ci95"] = float(1.96 * diff.std(ddof=1) / np.sqrt(diff.size))
            row["ratio_to_constant"] = row["exact"] / const
            row["noise_ratio_to_constant"] = (row["exact"] - gd) / (const - gd)
            print(f"  {name:24s} {row['first_batch']:4d} {row['last_batch']:5d} {row['exact']:12.6f} "
                  f"{row['ratio_to_constant']:7.4f} {row['noise_ratio_to_constant']:13.4f} "
                  f"{row['mc']:12.6f} ± {row['mc_ci95']:.6f} "
                  f"{row['mc_minus_constant']:+11.6f} ± {row['mc_minus_constant_ci95']:.6f}")
        fo, ex = rows["first-order optimum"]["exact"], rows["exact-discrete optimum"]["exact"]
        ref = rows["refined optimum"]["exact"]
        print(f"  share of the achievable gain (const - exact optimum): first order "
              f"{(const - fo) / (const - ex):.4f}, refined {(const - ref) / (const - ex):.4f}\n")
        report["optimizers"][label] = dict(nesterov=nesterov, gd_excess=gd, b_stab=b_stab, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "momentum_gain.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
