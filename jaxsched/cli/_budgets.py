"""The budgets of ``jaxsched optimize`` besides fixed steps and samples (docs/theory.md §8):

- ``--steps-budget K``: at most ``K`` steps. At the given samples, lr and optimizer the number of
  steps sets the horizon: more steps shrink the gradient-flow loss but, at equal samples, shrink the
  batches too. The step count ``k <= K`` with the lowest exact loss of its optimal schedule is found
  by an integer search (a geometric grid, then bisection of the gaps around the best, assuming one
  minimum). Every candidate is computed as one ``K``-step run whose last ``K - k`` steps are no-ops
  (learning rate ``NOOP_LR`` x lr, batch ``inf`` for the exact loss; the allocation gives them
  ``min_batch`` samples on top of the budget): one compiled program for every candidate instead
  of one per step count.
- ``--step-time t0,t1``: the cheapest wall-clock ``t0 K + t1 N`` that reaches the predicted loss of
  the optimal schedule at ``--steps`` and ``--samples``, from :func:`jaxsched.steps_samples_front`
  (constant learning rates ``<= --lr``) over a grid of step counts; the samples are then raised to
  the fewest integers whose integer schedule meets the target.

:func:`choose` returns the run's settings (steps, samples, lr) and a description of the budget.
"""

from __future__ import annotations

import dataclasses
import math

from ._common import Interrupts, UsageError, fmt
from ._compute import _library_call, lr_values, make_optimizer, optimal, sensitivity_method
from ._settings import Config

__all__ = ["FRONT_STEP_FACTORS", "NOOP_LR", "choose"]

#: Learning rate of a padded no-op step relative to --lr: the loss moves by about 1e-12 x lr |g|^2
#: per no-op step (1e-11 on the default job, far below the differences between step counts), and
#: the stability batch of such a step stays finite (at 1e-30 its computation overflows).
NOOP_LR = 1e-12
#: The --step-time front's step counts, relative to --steps.
FRONT_STEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
_GRID = 6  # first grid of the steps-budget search
_MAX_RAISES = 60  # --step-time: attempts to raise N until the integer schedule meets the target


def choose(cfg: Config, problem, interrupts: Interrupts) -> tuple[Config, dict]:
    """``(settings of the run, budget description)`` for ``--steps-budget`` or ``--step-time``."""
    if cfg.budget == "steps":
        return _steps_budget(cfg, problem, interrupts)
    return _step_time(cfg, problem, interrupts)


# ------------------------------------------------------------------------------------------------
# --steps-budget
# ------------------------------------------------------------------------------------------------
def _padded_loss(cfg: Config, problem, k: int) -> dict:
    """The optimal schedule of ``k`` steps as a ``K``-step run with ``K - k`` trailing no-ops."""
    import jax.numpy as jnp
    import numpy as np

    import jaxsched as js

    K, n = cfg.steps_budget, cfg.samples
    rates = np.concatenate([lr_values(cfg, k), np.full(K - k, NOOP_LR * cfg.lr)])
    optimizer = make_optimizer(cfg, K, lr_array=jnp.asarray(rates))
    opt, _ = optimal(cfg, problem, optimizer, steps=K, samples=n + (K - k) * cfg.min_batch,
                     method="closed_form")
    b = np.asarray(opt.batch_sizes, dtype=np.int64)
    if int(b[:k].sum()) != n:  # the no-op steps took more than min_batch: cannot happen for k*hi >= n
        raise UsageError(f"--steps-budget: internal allocation error at {k} steps")
    padded = np.concatenate([b[:k].astype(np.float64), np.full(K - k, np.inf)])
    exact = float(_library_call(cfg, js.exact_expected_loss, problem, padded, optimizer=optimizer,
                                throw=False))
    return {"steps": k, "exact_loss": exact if math.isfinite(exact) else None,
            "predicted_loss": float(opt.predicted_loss)}


def _argmin_steps(f, lo: int, hi: int) -> tuple[int, dict]:
    """The integer ``k`` in ``[lo, hi]`` minimising ``f`` (one minimum assumed): ``f`` on a geometric
    grid, then the larger gap next to the best is halved until both neighbours are adjacent."""
    import numpy as np

    values = {int(k): f(int(k)) for k in sorted({round(v) for v in np.geomspace(lo, hi, _GRID)})}
    while True:
        best = min(values, key=lambda k: (values[k], -k))  # ties: the longer run
        ks = sorted(values)
        i = ks.index(best)
        a = ks[i - 1] if i > 0 else best
        b = ks[i + 1] if i + 1 < len(ks) else best
        if b - best <= 1 and best - a <= 1:
            return best, values
        k = (a + best) // 2 if best - a >= b - best else (best + b + 1) // 2
        values[k] = f(k)


def _steps_budget(cfg: Config, problem, interrupts: Interrupts) -> tuple[Config, dict]:
    K, n = cfg.steps_budget, cfg.samples
    hi = n if cfg.max_batch is None else cfg.max_batch
    lo_k, hi_k = max(1, -(-n // hi)), min(K, n // cfg.min_batch)
    key = "exact_loss" if problem.is_quadratic else "predicted_loss"
    seen = {}

    def loss(k):
        interrupts.check()
        seen[k] = _padded_loss(cfg, problem, k)
        v = seen[k][key]
        return math.inf if v is None else v

    best, _ = _argmin_steps(loss, lo_k, hi_k)
    run = dataclasses.replace(cfg, steps=best, defaulted=cfg.defaulted - {"steps"})
    return run, {
        "kind": "steps",
        "steps_budget": K,
        "samples": n,
        "chosen_steps": best,
        "criterion": key,
        "searched": [seen[k] for k in sorted(seen)],
        "description": f"at most {K} steps at {n} samples: {best} steps have the lowest "
        f"{key.replace('_', ' ')} ({fmt(seen[best][key])}) of the {len(seen)} step counts searched",
    }


# ------------------------------------------------------------------------------------------------
# --step-time
# ------------------------------------------------------------------------------------------------
def _step_time(cfg: Config, problem, interrupts: Interrupts) -> tuple[Config, dict]:
    import numpy as np

    import jaxsched as js

    t0, t1 = cfg.step_time
    reference, _ = optimal(cfg, problem, make_optimizer(cfg, cfg.steps))
    target = float(reference.predicted_loss)
    interrupts.check()
    grid = sorted({max(1, round(f * cfg.steps)) for f in FRONT_STEP_FACTORS})
    front = _library_call(
        cfg, js.steps_samples_front, problem, target=target, steps=grid, lr=cfg.lr,
        momentum=cfg.momentum, nesterov=cfg.nesterov, min_batch=cfg.min_batch,
        max_batch=cfg.max_batch, loss="predicted", sensitivity=sensitivity_method(cfg), t0=t0, t1=t1,
    )
    interrupts.check()
    k, n_real, _ = front.cheapest()
    if not math.isfinite(n_real):
        raise UsageError(f"--step-time: no step count in {grid} reaches the target {fmt(target)}")
    lr = float(front.lr_optimal[list(front.steps).index(k)])
    run = dataclasses.replace(cfg, steps=k, lr=lr, defaulted=cfg.defaulted - {"steps", "samples", "lr"})
    n = max(math.ceil(n_real * (1 - 1e-12)), k * cfg.min_batch)
    optimizer = make_optimizer(run, k)
    for _ in range(_MAX_RAISES):  # integers and the stability clip may cost a few samples more
        run.samples = n
        opt, _ = optimal(run, problem, optimizer)
        if float(opt.predicted_loss) <= target:
            break
        interrupts.check()
        n += max(1, math.ceil(1e-3 * n))
    else:
        raise UsageError(f"--step-time: no integer schedule at {k} steps reaches the target "
                         f"{fmt(target)} within {n} samples")
    wall = t0 * k + t1 * n
    reference_wall = t0 * cfg.steps + t1 * cfg.samples
    return run, {
        "kind": "step_time",
        "t0": t0,
        "t1": t1,
        "target_predicted_loss": target,
        "reference": {"steps": cfg.steps, "samples": cfg.samples, "lr": cfg.lr,
                      "seconds": reference_wall},
        "steps_grid": [int(v) for v in front.steps],
        "front_samples": [None if not np.isfinite(v) else float(v) for v in front.samples_optimal],
        "front_lr": [None if not np.isfinite(v) else float(v) for v in front.lr_optimal],
        "chosen_steps": k,
        "chosen_samples": n,
        "chosen_lr": lr,
        "seconds": wall,
        "description": f"step time {t0:g} + {t1:g} x batch: {k} steps and {n} samples at lr "
        f"{lr:.4g} take {fmt(wall, 4)} s (vs {fmt(reference_wall, 4)} s for {cfg.steps} steps and "
        f"{cfg.samples} samples at lr {cfg.lr:g}) and reach the predicted loss {fmt(target)}",
    }
