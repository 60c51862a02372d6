"""Time and peak memory of the sensitivity phi against d: dense adjoint path vs matrix-free path.

An equinox MLP (64 -> width -> 10, tanh) on a subset of scikit-learn's digits data; widths sweep
d from ~10^2 to ~10^4. For each d, in one process:

- dense: ``js.sensitivity`` (the d x d adjoint system of theory 4), up to ``--dense-max-d``;
- matrix-free, subsampled (``--examples`` examples, ``--steps-per-panel`` steps per panel);
- matrix-free, exact (all examples, Gauss nodes in every step), up to ``--exact-max-d``.

Reported: first call (compile + run) and steady-state wall time, XLA's memory analysis of the
compiled computation (arguments + outputs + peak live temporaries, in bytes: what the device holds
at once, independent of the allocator), and the agreement with the dense path (relative error for
the exact path; max |z| = |phi_mf - phi_dense| / SE for the subsampled one). A second table
quantifies the error of evaluating phi on a coarser grid (steps_per_panel > 1) against the dense
path.

    python experiments/bench_matrix_free.py [--widths 2 4 8 16 32 64 134] [--steps 10]
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 134])
parser.add_argument("--n", type=int, default=100, help="digits examples in the loss")
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--lr", type=float, default=0.2)
parser.add_argument("--examples", type=int, default=8)
parser.add_argument("--steps-per-panel", type=int, default=5)
parser.add_argument("--nodes-per-panel", type=int, default=3)
parser.add_argument("--dense-max-d", type=int, default=1300)
parser.add_argument("--exact-max-d", type=int, default=200)
parser.add_argument("--coarse-width", type=int, default=4)
parser.add_argument("--x64", action=argparse.BooleanOptionalAction, default=True)
parser.add_argument("--out", default="results/bench_matrix_free.json")
args = parser.parse_args()
jax.config.update("jax_enable_x64", args.x64)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jaxsched as js  # noqa: E402
from jaxsched._expansion import _common as cm, matrix_free as _matrix_free  # noqa: E402
from jaxsched._expansion.sensitivity import DENSE_MAX_DIM, _parts_core  # noqa: E402

X, y = load_digits(return_X_y=True)
X, y = X[: args.n] / 16.0, y[: args.n]
h, K = args.lr, args.steps


def mlp_problem(width):
    model = eqx.nn.MLP(64, 10, width, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, ex):
        logits = eqx.combine(p, static)(ex[0])
        return jax.nn.logsumexp(logits) - logits[ex[1]]

    return js.DataProblem(loss, (X, y), params)


def _total(m):
    a, o, t = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
    return int(a + o + t)


def compiled_run(core, core_args):
    """Compile once (ahead of time), read XLA's memory analysis, run twice: (output, compile+first
    run seconds, steady-state seconds, bytes)."""
    t = time.perf_counter()
    compiled = core.lower(*core_args).compile()
    out = jax.block_until_ready(compiled(*core_args))
    first = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(compiled(*core_args))
    # equinox wraps the jax Compiled object; the memory analysis lives on the inner one.
    return out, first, time.perf_counter() - t, _total(compiled.compiled.memory_analysis())


def dense_phi(p):
    # The dense path's jitted core (what js.sensitivity runs), compiled ahead of time.
    dtype = p.x0.dtype
    rtol, atol = cm.tolerances(dtype, None, None)
    units = cm.step_units(js.SGD(h), K, dtype)
    args_ = (js.DenseAdjoint(), p, units, K, rtol, atol, cm.default_solver(None))
    parts, first, steady, mem = compiled_run(_parts_core, args_)
    return np.asarray(parts.phi), first, steady, mem


def matrix_free_phi(p, **kw):
    # Same preparation, core and post-processing as js.sensitivity_matrix_free, compiled ahead of
    # time (the importance-sampling pass, when subsampling, is outside the timing).
    prep = _matrix_free._prepare(p, h, K, kw.get("num_examples"), kw["chunk_size"], kw.get("key"),
                                 kw["nodes_per_panel"], kw["steps_per_panel"], None, None, None,
                                 16384, "importance")
    (q, result), first, steady, mem = compiled_run(_matrix_free._matrix_free_core, prep.core_args)
    res = _matrix_free._finish(prep, q[:, :prep.m], None, result)
    return np.asarray(res.phi), np.asarray(res.stderr), first, steady, mem


rows = []
print(f"{'d':>6} {'path':>16} {'first s':>9} {'steady s':>9} {'MiB':>9} {'d^2 MiB':>8}  agreement")
for width in args.widths:
    p = mlp_problem(width)
    d = p.dim
    d2_mib = d * d * p.x0.dtype.itemsize / 2**20
    dense = None
    if d <= args.dense_max_d:
        dense, first, steady, mem = dense_phi(p)
        rows.append(dict(d=d, path="dense", first_s=first, steady_s=steady, bytes=mem))
        print(f"{d:6d} {'dense':>16} {first:9.2f} {steady:9.2f} {mem / 2**20:9.2f} {d2_mib:8.2f}")
    runs = [("mf subsampled", dict(num_examples=args.examples, chunk_size=args.examples,
                                   key=jax.random.PRNGKey(1), nodes_per_panel=args.nodes_per_panel,
                                   steps_per_panel=args.steps_per_panel))]
    if d <= args.exact_max_d:
        runs.append(("mf exact", dict(chunk_size=args.n, nodes_per_panel=4, steps_per_panel=1)))
    for name, kw in runs:
        phi, se, first, steady, mem = matrix_free_phi(p, **kw)
        agree = ""
        row = dict(d=d, path=name, first_s=first, steady_s=steady, bytes=mem)
        if dense is not None:
            if name == "mf exact":
                row["rel_err_vs_dense"] = float(np.max(np.abs(phi - dense)) / np.max(np.abs(dense)))
                agree = f"rel err {row['rel_err_vs_dense']:.1e}"
            else:
                row["max_abs_z_vs_dense"] = float(np.max(np.abs(phi - dense) / se))
                agree = f"max |z| {row['max_abs_z_vs_dense']:.2f}"
        rows.append(row)
        print(f"{d:6d} {name:>16} {first:9.2f} {steady:9.2f} {mem / 2**20:9.2f} {d2_mib:8.2f}  "
              f"{agree}")

# crossover: the smallest d from which the exact matrix-free path (what MatrixFree() does by
# default) is faster than the dense path, steady state and first call (compile included)
for key in ("steady_s", "first_s"):
    faster = [r["d"] for r in rows if r["path"] == "mf exact"
              and any(q["d"] == r["d"] and q["path"] == "dense" and q[key] > r[key] for q in rows)]
    slower = [r["d"] for r in rows if r["path"] == "mf exact"
              and any(q["d"] == r["d"] and q["path"] == "dense" and q[key] <= r[key] for q in rows)]
    print(f"{key}: matrix-free exact faster than dense at d = {faster}, slower at d = {slower} "
          f"(today's DENSE_MAX_DIM = {DENSE_MAX_DIM})")

# coarse grids: phi evaluated on panels of several steps, exact over examples, against dense
p = mlp_problem(args.coarse_width)
dense = dense_phi(p)[0]
coarse = []
print(f"\ncoarse grid, d = {p.dim}, exact over examples, relative error against the dense path")
for spp, npp in [(1, 4), (2, 3), (5, 3), (K, 3), (K, 5)]:
    t = time.perf_counter()
    res = js.sensitivity_matrix_free(p, lr=h, steps=K, chunk_size=args.n, steps_per_panel=spp,
                                     nodes_per_panel=npp)
    err = float(np.max(np.abs(res.phi - dense)) / np.max(np.abs(dense)))
    coarse.append(dict(steps_per_panel=spp, nodes_per_panel=npp, nodes=len(res.node_times),
                       rel_err=err, seconds=time.perf_counter() - t))
    print(f"steps/panel {spp:3d}, nodes/panel {npp}: {len(res.node_times):3d} nodes, "
          f"rel err {err:.1e}")

os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
with open(args.out, "w") as f:
    json.dump(dict(device=str(jax.devices()[0]), x64=args.x64, n=args.n, steps=K, lr=h,
                   rows=rows, coarse=coarse), f, indent=1)
print(f"wrote {args.out}")
