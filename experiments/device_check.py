"""Accelerator check: the float32 paths of jaxsched on the default device, timed, with the ratio to
the same script on CPU and the agreement with its results.

Four jobs, each timed on its first call (compile + run) and on a second call (steady state):

1. ``sweep``: one ``js.sweep_core`` call over ``--configs`` configurations (default 10^5: a grid
   of learning rates x budgets) on the eigen path (Gaussian features, d = 100, 100 steps);
2. ``monte_carlo``: ``js.simulate_sgd`` with ``--paths`` paths (default 10^6) of the optimal
   schedule on the diabetes data, and its predicted gain over the constant batch checked with a
   95% interval;
3. ``matrix_free``: ``js.sensitivity_matrix_free`` of an MLP on the digits data with at least 10^5
   parameters (``--width``; subsample of ``--examples`` examples, importance sampling), with XLA's
   memory analysis;
4. ``optimal_schedule``: ``js.optimal_schedule`` end to end on that MLP with
   ``sensitivity=js.MatrixFree(num_examples=..., key=...)``.

Everything runs in float32 (``jax_enable_x64`` off). Typical use, one run per machine:

    JAX_PLATFORMS=cpu python experiments/device_check.py --json cpu.json    # the CPU reference
    python experiments/device_check.py --cpu-reference cpu.json              # on the GPU machine
    python experiments/device_check.py --cpu-smoke                           # tiny sizes, seconds

The table gives absolute seconds and, with ``--cpu-reference``, ``cpu / here`` for the steady
state, and the agreement of each job's numbers with the CPU run: the largest relative difference
of the schedule-level outputs (float32 on two devices: differences of order 1e-6 relative are
rounding; batch sizes may differ by one where the real optimum sits at a rounding boundary).
``--cpu-smoke`` forces the CPU and tiny sizes, so the whole script runs end to end in seconds
(tests/test_device_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

SMOKE = {"configs": 64, "paths": 2000, "width": 8, "examples": 8, "n": 200, "mlp_steps": 6,
         "sweep_steps": 20}
FULL = {"configs": 100_000, "paths": 1_000_000, "width": 300, "examples": 32, "n": 1797,
        "mlp_steps": 20, "sweep_steps": 100}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--cpu-reference", metavar="FILE", help="JSON written by a CPU run")
    parser.add_argument("--json", metavar="FILE", help="write this run's results here")
    for name in ("configs", "paths", "width", "examples"):
        parser.add_argument(f"--{name}", type=int, default=None)
    return parser.parse_args(argv)


def _timed(fn):
    """``(value, first call seconds, second call seconds)``; each call waits for its results."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    t = time.perf_counter()
    value = jax.block_until_ready(fn())
    return value, first, time.perf_counter() - t


def _sweep(js, jnp, np, size):
    d, steps = 100, size["sweep_steps"]
    lam = 1.0 / np.arange(1, d + 1)
    problem = js.DiagonalGaussianRegression(lam, np.full(d, 1.0 / np.sqrt(d)), 0.5)
    n = size["configs"]
    budgets = 2 ** np.arange(3, 13)  # 8 .. 4096 samples per step
    lr = np.geomspace(0.01, 1.0, -(-n // len(budgets)))
    grid_lr, grid_b = np.meshgrid(lr, budgets * steps, indexing="ij")
    lr_c = jnp.asarray(grid_lr.reshape(-1)[:n], jnp.float32)
    samples_c = jnp.asarray(grid_b.reshape(-1)[:n], jnp.float32)

    def run():
        return js.sweep_core(problem, lr=lr_c, samples=samples_c, steps=steps, path="eigen",
                             exact=False)

    out, first, steady = _timed(run)
    head = slice(0, 16)
    return first, steady, {
        "predicted_loss": np.asarray(out.predicted_loss[head]).tolist(),
        "gain": np.asarray(out.gain[head]).tolist(),
        "batch_sizes_first": np.asarray(out.batch_sizes[0]).tolist(),
        "ok_fraction": float(np.mean(np.asarray(out.status) == 0)),
    }, f"{n} configurations, {n / steady:.3g} per second"


def _monte_carlo(js, jnp, np, size):
    problem = js.datasets.diabetes_problem()
    lr, steps, samples = 0.05, 100, 1600
    opt = js.optimal_schedule(problem, lr=lr, steps=steps, samples=samples)
    const = js.constant_schedule(steps, samples)
    key = jax.random.PRNGKey(0)
    paths = size["paths"]

    def run():
        a = js.simulate_sgd(problem, opt.batch_sizes, lr=lr, num_paths=paths, key=key)
        b = js.simulate_sgd(problem, const, lr=lr, num_paths=paths, key=jax.random.fold_in(key, 1))
        return a.final_loss, b.final_loss

    (fa, fb), first, steady = _timed(run)
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    gd = float(js.exact_gd_loss(problem, lr=lr, steps=steps))
    # gain = (constant excess) / (optimal excess) over gradient descent; delta method for its SE
    ea, eb = fa.mean() - gd, fb.mean() - gd
    sa, sb = fa.std(ddof=1) / np.sqrt(paths), fb.std(ddof=1) / np.sqrt(paths)
    gain = eb / ea
    se = abs(gain) * np.sqrt((sa / ea) ** 2 + (sb / eb) ** 2)
    exact_gain = ((float(js.exact_expected_loss(problem, const, lr=lr)) - gd)
                  / (float(js.exact_expected_loss(problem, opt.batch_sizes, lr=lr)) - gd))
    predicted_gain = float(opt.constant_objective / opt.objective)
    return first, steady, {
        "mc_gain": float(gain), "mc_gain_se": float(se), "predicted_gain": predicted_gain,
        "exact_gain": float(exact_gain), "mean_optimal": float(fa.mean()),
        "mean_constant": float(fb.mean()),
    }, (f"{paths} paths x 2 schedules; gain MC {gain:.4f} +- {1.96 * se:.4f} (95%), predicted "
        f"{predicted_gain:.4f}, exact {exact_gain:.4f}")


def mlp_problem(width: int, n: int):
    """A tanh MLP 64 -> width -> width -> 10 on the first ``n`` digits (float32): ``64 w + w^2 +
    10 w + 2 w + 10`` parameters (width 300: 112,810)."""
    import equinox as eqx
    import jax.numpy as jnp
    from sklearn.datasets import load_digits

    import jaxsched as js

    X, y = load_digits(return_X_y=True)
    X, y = jnp.asarray(X[:n] / 16.0, jnp.float32), jnp.asarray(y[:n])
    model = eqx.nn.MLP(64, 10, width, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, ex):
        logits = eqx.combine(p, static)(ex[0])
        return jax.nn.logsumexp(logits) - logits[ex[1]]

    return js.DataProblem(loss, (X, y), params, chunk_size=64)


def _matrix_free(js, jnp, np, size, problem):
    key = jax.random.PRNGKey(1)
    steps, lr = size["mlp_steps"], 0.1

    def run():
        return js.sensitivity_matrix_free(problem, lr=lr, steps=steps,
                                          num_examples=size["examples"], chunk_size=8, key=key,
                                          steps_per_panel=5, nodes_per_panel=3)

    res, first, steady = _timed(run)
    mem = js.sensitivity_matrix_free(problem, lr=lr, steps=steps, num_examples=size["examples"],
                                     chunk_size=8, key=key, steps_per_panel=5, nodes_per_panel=3,
                                     memory_analysis=True).memory
    dxd = problem.dim**2 * 4
    return first, steady, {
        "phi": np.asarray(res.phi).tolist(), "stderr": np.asarray(res.stderr).tolist(),
        "memory_bytes": mem.total, "dxd_bytes": dxd,
    }, (f"d = {problem.dim}, {size['examples']} examples; XLA memory {mem.total / 2**20:.1f} MiB "
        f"= {mem.total / dxd:.2g} of one d x d float32 matrix")


def _optimal_schedule(js, jnp, np, size, problem):
    steps, lr = size["mlp_steps"], 0.1
    samples = 16 * steps
    sens = js.MatrixFree(num_examples=size["examples"], chunk_size=8, key=jax.random.PRNGKey(1),
                         steps_per_panel=5, nodes_per_panel=3)

    def run():
        return js.optimal_schedule(problem, lr=lr, steps=steps, samples=samples, sensitivity=sens)

    out, first, steady = _timed(run)
    return first, steady, {
        "batch_sizes": np.asarray(out.batch_sizes).tolist(),
        "predicted_loss": float(out.predicted_loss),
        "objective": float(out.objective), "objective_stderr": float(out.objective_stderr),
    }, f"d = {problem.dim}, {steps} steps, batch sizes {np.asarray(out.batch_sizes)[[0, -1]]} first/last"


def _relative(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def agreement(values: dict, reference: dict) -> str:
    """The largest relative difference of each shared numeric output, compactly."""
    parts = []
    for k, v in values.items():
        if k in reference and k not in ("memory_bytes", "dxd_bytes"):
            parts.append(f"{k} {_relative(v, reference[k]):.1e}")
    return ", ".join(parts)


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", False)
    import jax.numpy as jnp
    import numpy as np

    import jaxsched as js

    size = dict(SMOKE if args.cpu_smoke else FULL)
    for name in ("configs", "paths", "width", "examples"):
        if getattr(args, name) is not None:
            size[name] = getattr(args, name)
    reference = None
    if args.cpu_reference:
        with open(args.cpu_reference) as f:
            reference = json.load(f)
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}; float32; sizes {size}")
    problem = mlp_problem(size["width"], size["n"])
    jobs = {
        "sweep": lambda: _sweep(js, jnp, np, size),
        "monte_carlo": lambda: _monte_carlo(js, jnp, np, size),
        "matrix_free": lambda: _matrix_free(js, jnp, np, size, problem),
        "optimal_schedule": lambda: _optimal_schedule(js, jnp, np, size, problem),
    }
    results = {"platform": device.platform, "device": device.device_kind, "size": size, "jobs": {}}
    print(f"{'job':<18}{'first s':>9}{'steady s':>10}{'cpu/here':>10}  notes")
    for name, job in jobs.items():
        first, steady, values, note = job()
        results["jobs"][name] = {"first_s": first, "steady_s": steady, "values": values}
        ratio, agree = "", ""
        if reference is not None and name in reference["jobs"]:
            ref = reference["jobs"][name]
            ratio = f"{ref['steady_s'] / steady:.2f}"
            agree = "; vs CPU: " + agreement(values, ref["values"])
        print(f"{name:<18}{first:9.2f}{steady:10.3f}{ratio:>10}  {note}{agree}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
