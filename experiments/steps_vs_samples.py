"""The steps-versus-samples front (docs/theory.md §8, ``js.steps_samples_front``) on the
standardised diabetes data: for a target expected loss, the fewest samples N(K) that reach it in K
steps, with the optimal (square-root rule) batch schedule and with a constant batch, each at its best
constant learning rate up to ``lr_max`` (default 4x the largest safe one, ``s lam_max = 0.4``; the
losses are exact, so the front need not stay inside the expansion's tested range), from the exact
recursion.

This is the first-principles counterpart of the empirical critical-batch-size curve (McCandlish et
al. 2018). At fixed horizon T = K s the noise term depends on the samples only (theory 8's
degeneracy), so K enters only through the horizon it allows, T <= K lr_max: the front is an L, a
wall at the fewest steps in which gradient descent at lr_max reaches the target, then a plateau
N_min (the samples at the best horizon), rather than McCandlish's hyperbola. The script prints the
critical batch ``N_min / K_wall`` (``StepsSamplesFront.critical_batch``: fewest samples over the
grid / fewest steps that reach the target, so K_wall has the grid's resolution), the samples the
optimal schedule saves at each K, and the cheapest point of the step-time model ``t0 K + t1 N``.

Run: python experiments/steps_vs_samples.py [--excess 0.004 0.003] [--lr-factor 4] [--horizons 6]
Writes results/steps_vs_samples.json and results/steps_vs_samples.png.
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

STEPS = [12, 16, 23, 32, 45, 64, 90, 128, 181, 256]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--excess", type=float, nargs="+", default=[0.004, 0.003],
                        help="targets: E f(x_K) - min f")
    parser.add_argument("--lr-factor", type=float, default=4.0,
                        help="lr_max = factor x js.largest_safe_lr (s lam_max = 0.1 x factor)")
    parser.add_argument("--horizons", type=int, default=6, help="horizon grid per step count")
    parser.add_argument("--t0", type=float, default=1.0, help="step time t0 + t1 * batch")
    parser.add_argument("--t1", type=float, default=0.05)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    p = js.datasets.diabetes_problem()
    lr = args.lr_factor * js.largest_safe_lr(p)
    f_star = float(js.exact_gd_loss(p, lr=0.05, steps=200_000))  # gradient descent converged
    print(f"diabetes, plain SGD, lr <= {lr:.4g} (s lam_max <= {0.1 * args.lr_factor:.2g}), exact "
          f"recursion; step counts "
          f"{STEPS}; step time {args.t0} + {args.t1} b")
    report = {"problem": "diabetes", "lr_max": lr, "steps": STEPS, "f_star": f_star, "t0": args.t0,
              "t1": args.t1, "targets": []}
    fronts = []
    for excess in args.excess:
        t0 = time.perf_counter()
        front = js.steps_samples_front(p, target=f_star + excess, steps=STEPS, lr=lr,
                                       horizons=args.horizons, t0=args.t0, t1=args.t1)
        seconds = time.perf_counter() - t0
        entry = {"excess": excess, "seconds": seconds}
        print(f"\ntarget excess {excess} ({seconds:.1f} s)")
        print(f"  {'K':>5s} {'N optimal':>10s} {'N constant':>10s} {'saved':>6s} "
              f"{'lr opt':>7s} {'lr const':>8s} {'B opt':>6s} {'B const':>7s}")
        for i, k in enumerate(STEPS):
            no, nc = front.samples_optimal[i], front.samples_constant[i]
            saved = 1 - no / nc if np.isfinite(nc) else float("nan")
            print(f"  {k:5d} {no:10.1f} {nc:10.1f} {saved:6.1%} {front.lr_optimal[i]:7.4f} "
                  f"{front.lr_constant[i]:8.4f} {no / k:6.2f} {nc / k:7.2f}")
        for which in ("optimal", "constant"):
            samples = getattr(front, f"samples_{which}")
            finite = np.isfinite(samples)
            k_wall, n_min = int(np.asarray(STEPS)[finite].min()), float(samples[finite].min())
            kk, n, wall = front.cheapest(which)
            entry[which] = dict(samples=[float(v) for v in samples],
                                lr=[float(v) for v in getattr(front, f"lr_{which}")],
                                k_wall=k_wall, n_min=n_min,
                                b_crit=front.critical_batch(which),
                                cheapest=dict(steps=kk, samples=n, wall=wall))
            print(f"  {which:>8s}: wall K_wall = {k_wall}, plateau N_min = {n_min:.0f}, critical "
                  f"batch N_min / K_wall = {front.critical_batch(which):.1f}; cheapest t0 K + t1 N: "
                  f"K = {kk}, N = {n:.0f}, wall-clock {wall:.1f}")
        report["targets"].append(entry)
        fronts.append((excess, front, entry))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "steps_vs_samples.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    plot(fronts, os.path.join(args.out, "steps_vs_samples.png"), lr)


def plot(fronts, path, lr) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 5.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = np.asarray(STEPS)
    for c, (excess, front, entry) in zip(colors, fronts, strict=False):
        for which, style, marker in (("optimal", "-", "o"), ("constant", "--", "s")):
            samples = getattr(front, f"samples_{which}")
            ax.plot(steps, samples, style, marker=marker, ms=4, color=c,
                    label=f"excess {excess}: {which} batch")
            k_wall, n_min = entry[which]["k_wall"], entry[which]["n_min"]
            # the L the front approaches: the wall at K_wall and the plateau N_min
            ax.plot([k_wall, k_wall, steps[-1]], [n_min * 3, n_min, n_min], ":", color=c, lw=0.9)
            ax.plot([k_wall], [n_min], marker="*", ms=13, color=c, mec="k", ls="none")
            ax.annotate(f"B = {n_min / k_wall:.0f}", (k_wall, n_min), xytext=(-8, -4),
                        textcoords="offset points", ha="right", va="top", color=c, fontsize=9)
        unreachable = steps[~np.isfinite(front.samples_optimal)]
        if unreachable.size:
            ax.axvspan(steps[0] * 0.9, unreachable.max(), color=c, alpha=0.07)
    ax.plot([], [], ":", color="gray", label="wall K_wall and plateau N_min")
    ax.plot([], [], "*", color="gray", mec="k", ms=12, label="critical batch B = N_min / K_wall")
    ax.axvspan(0, 0, color="gray", alpha=0.15, label="gradient descent at lr_max misses the target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(steps[0] * 0.9, steps[-1] * 1.1)
    ax.set_xticks(steps, [str(k) for k in steps], minor=False)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("steps K")
    ax.set_ylabel("fewest samples N that reach the target")
    ax.set_title(f"Steps vs samples on diabetes (SGD, lr <= {lr:.3g}, exact recursion)")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
