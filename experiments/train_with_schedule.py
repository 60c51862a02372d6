"""Train with an exported schedule: minibatch SGD on the diabetes data, optimal vs baselines.

The schedule comes from ``jaxsched optimize`` (``--schedule PATH/schedule.json``) or, by default, is
computed in-process with the same defaults (lr 0.05, 400 steps, 3200 samples). Training is a plain
``jax.lax.scan`` over the steps with an optax optimiser; the batch size of each step is looked up
with ``jaxsched.schedule_fn`` inside the compiled loop. Varying batch sizes never recompile: every
step draws ``max_batch`` indices (with replacement, as the problem assumes) and averages the
per-example gradients of the first ``b_k`` of them (a mask), so all schedules share one compiled
function whose batch table is an ordinary array argument.

For every schedule the final loss ``f(x_K)`` on the whole data set is averaged over many seeds and
reported with its standard error, next to the exact ``E f(x_K)`` of the recursion (theory 5.3):
the two must agree within a few standard errors. Writes ``results/train_with_schedule.json``.

    python experiments/train_with_schedule.py [--schedule jaxsched-out/schedule.json] [--seeds 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

jax.config.update("jax_enable_x64", True)  # before any array: match the exact recursion

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxsched as js  # noqa: E402

NAMES = ("optimal", "constant", "linear_ramp", "step_doubling")


def schedules_from_json(path: str) -> tuple[float, dict[str, np.ndarray]]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if data["problem"]["name"] != "diabetes":
        raise SystemExit(f"{path}: this example trains on the diabetes data only")
    return data["lr"], {k: np.asarray(v["batch_sizes"]) for k, v in data["schedules"].items()}


def schedules_in_process(lr: float, steps: int, samples: int) -> dict[str, np.ndarray]:
    problem = js.datasets.diabetes_problem()
    opt = js.optimal_schedule(problem, lr=lr, steps=steps, samples=samples)
    return {
        "optimal": np.asarray(opt.batch_sizes),
        "constant": np.asarray(js.constant_schedule(steps, samples)),
        "linear_ramp": np.asarray(js.linear_ramp(steps, samples, ratio=8.0)),
        "step_doubling": np.asarray(js.step_doubling(steps, samples, stages=4)),
    }


def make_trainer(X, y, lr: float, max_batch: int):
    """``train(batch_table, keys) -> final losses``, compiled once for every table and seed set."""
    n = X.shape[0]
    optimiser = optax.sgd(lr)

    def minibatch_loss(params, idx, mask, b):
        r = X[idx] @ params - y[idx]
        return 0.5 * jnp.sum(mask * r**2) / b  # mean over the first b of the max_batch draws

    def one_run(batch_table, key):
        schedule = js.schedule_fn(batch_table)  # step -> batch size, usable inside jit

        def step(carry, k):
            params, state, key = carry
            key, sub = jax.random.split(key)
            b = schedule(k)
            idx = jax.random.randint(sub, (max_batch,), 0, n)  # with replacement
            mask = jnp.arange(max_batch) < b
            grads = jax.grad(minibatch_loss)(params, idx, mask, b)
            updates, state = optimiser.update(grads, state, params)
            return (optax.apply_updates(params, updates), state, key), None

        params = jnp.zeros(X.shape[1])
        carry = (params, optimiser.init(params), key)
        (params, _, _), _ = jax.lax.scan(step, carry, jnp.arange(batch_table.shape[0]))
        return 0.5 * jnp.mean((X @ params - y) ** 2)

    return jax.jit(jax.vmap(one_run, in_axes=(None, 0)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", help="schedule.json written by `jaxsched optimize`")
    ap.add_argument("--seeds", type=int, default=4000, help="independent SGD runs per schedule")
    ap.add_argument("--chunk", type=int, default=1000, help="seeds per compiled call (memory)")
    ap.add_argument("--out", default="results", help="folder for the JSON of results")
    args = ap.parse_args(argv)

    if args.schedule:
        lr, schedules = schedules_from_json(args.schedule)
        source = args.schedule
    else:
        lr, steps, samples = 0.05, 400, 3200
        schedules = schedules_in_process(lr, steps, samples)
        source = "computed in-process (lr 0.05, 400 steps, 3200 samples)"
    steps = len(schedules["optimal"])
    samples = int(schedules["optimal"].sum())
    X, y = (jnp.asarray(a) for a in js.datasets.diabetes_data())
    problem = js.datasets.diabetes_problem()
    max_batch = int(max(b.max() for b in schedules.values()))
    train = make_trainer(X, y, lr, max_batch)
    gd = float(js.exact_gd_loss(problem, lr=lr, steps=steps))

    print(f"schedule: {source}; lr {lr}, {steps} steps, {samples} samples, {args.seeds} seeds")
    print(f"gradient descent f(x_K) = {gd:.6f} (exact)")
    results = {}
    t0 = time.perf_counter()
    for i, (name, b) in enumerate(schedules.items()):
        assert int(b.sum()) == samples
        key = jax.random.fold_in(jax.random.key(0), i)  # independent seeds per schedule
        keys = jax.random.split(key, args.seeds)
        table = jnp.asarray(b, dtype=jnp.int32)
        final = np.concatenate(
            [np.asarray(train(table, keys[s : s + args.chunk])) for s in range(0, args.seeds, args.chunk)]
        )
        mean, se = float(final.mean()), float(final.std(ddof=1) / np.sqrt(final.size))
        exact = float(js.exact_expected_loss(problem, b, lr=lr))
        results[name] = {
            "mean_final_loss": mean,
            "standard_error": se,
            "exact_expected_loss": exact,
            "z_vs_exact": (mean - exact) / se,
            "excess_over_gd": mean - gd,
        }
    seconds = time.perf_counter() - t0

    opt = results["optimal"]
    print(
        f"{'schedule':<14} {'SGD mean f(x_K)':>16} {'+- s.e.':>9} {'exact E f(x_K)':>15} "
        f"{'z':>6} {'excess over GD':>15} {'gain':>12}"
    )
    for name, r in results.items():
        # gain = excess / optimal excess, s.e. by the delta method (independent seeds).
        g = r["excess_over_gd"] / opt["excess_over_gd"]
        g_se = abs(g) * np.hypot(
            r["standard_error"] / r["excess_over_gd"], opt["standard_error"] / opt["excess_over_gd"]
        )
        r["gain_over_optimal"], r["gain_standard_error"] = (None, None) if name == "optimal" else (g, g_se)
        gain = "-" if name == "optimal" else f"{g:.2f}+-{g_se:.2f}"
        print(
            f"{name:<14} {r['mean_final_loss']:>16.6f} {r['standard_error']:>9.1e} "
            f"{r['exact_expected_loss']:>15.6f} {r['z_vs_exact']:>6.2f} "
            f"{r['excess_over_gd']:>15.3e} {gain:>12}"
        )
    print(f"(SGD runs took {seconds:.1f} s; gain = excess over GD / optimal's excess over GD)")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train_with_schedule.json")
    payload = {
        "source": source,
        "lr": lr,
        "steps": steps,
        "samples": samples,
        "seeds": args.seeds,
        "gradient_descent_loss": gd,
        "schedules": results,
        "seconds": seconds,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
