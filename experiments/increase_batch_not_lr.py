"""Increase the batch instead of decaying the learning rate (docs/theory.md, section 8), on the
standardised diabetes data: exact expected losses (the recursion of section 5.3) and real optax SGD
by Monte Carlo.

At equal samples N and equal horizon T = sum_k s_k, the noise term depends on the schedule only
through b / s (samples per unit of intrinsic time). So an lr-decay schedule with a constant batch,

    stage j = 0, 1, 2:  lr h / 3^j,  batch 4,        100 * 3^j steps,

and a constant lr with the batch grown instead,

    stage j = 0, 1, 2:  lr h,        batch 4 * 3^j,  100 steps,

reach the same loss to first order, the second with 300 instead of 1300 steps (23%). The drift
term (first order, depends on the lr only) and the next order in the noise break the tie a little.

Run: python experiments/increase_batch_not_lr.py [--paths 2000]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import jaxsched as js

jax.config.update("jax_enable_x64", True)


def schedules(h: float, base: int = 4, stage: int = 100):
    """(lr per step, batch per step) of the lr-decay run and of the batch-growth run."""
    decay_lr = np.concatenate([np.full(stage * 3**j, h / 3**j) for j in range(3)])
    decay_b = np.full(decay_lr.size, base)
    grow_lr = np.full(3 * stage, h)
    grow_b = np.concatenate([np.full(stage, base * 3**j) for j in range(3)])
    return (decay_lr, decay_b), (grow_lr, grow_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=2000, help="Monte Carlo paths per run")
    args = parser.parse_args()
    p = js.datasets.diabetes_problem()
    print("diabetes, x0 = 0; excess = E f(x_K) - min f; MC = optax.sgd, control variate, +- 1 SE")
    print(f"{'h':>6} {'run':>12} {'steps':>6} {'samples':>7} {'T':>6} {'exact excess':>13} "
          f"{'MC excess':>22} {'GD excess':>10}")
    f_star = float(js.exact_gd_loss(p, lr=0.05, steps=200_000))  # gradient descent converged
    for h in (0.1, 0.05, 0.02):
        rows = {}
        for name, (lr, b) in zip(("lr decay", "batch growth"), schedules(h), strict=True):
            opt = js.SGD(lr)
            exact = float(js.exact_expected_loss(p, b.astype(float), optimizer=opt)) - f_star
            gd = float(js.exact_gd_loss(p, optimizer=opt, steps=b.size)) - f_star
            r = js.simulate_sgd(p, b, optimizer=opt, num_paths=args.paths,
                                key=jax.random.key(0), control_variate=True)
            mc, se = float(r.mean()) - f_star, float(r.stderr())
            rows[name] = (exact, exact + f_star)
            print(f"{h:6.3f} {name:>12} {b.size:6d} {int(b.sum()):7d} {lr.sum():6.2f} "
                  f"{exact:13.6g} {mc:13.6g} +- {se:6.2g} {gd:10.3g}")
        (ex_g, tot_g), (ex_d, tot_d) = rows["batch growth"], rows["lr decay"]
        print(f"{'':6} batch growth vs lr decay: excess ratio {ex_g / ex_d:.4f}, expected loss "
              f"{100 * (tot_g / tot_d - 1):+.3f}%, with {300 / 1300:.0%} of the steps")


if __name__ == "__main__":
    main()
