"""Phase diagram of the gain of the optimal batch schedule over a constant batch with the same
samples, from one sweep per problem:

- Gaussian features (theory 5.1; eigenvalues ``lam_i = 1/i``, d = 20, ``v0_i = 1``,
  ``h = 0.2``, 200 steps): gain against label noise ``s2`` and sample budget;
- diabetes (theory 5.3, d = 10, 200 steps): gain against learning rate and sample budget.

Gain = (noise-induced excess loss of the constant schedule) / (that of the optimal schedule):
predicted, ``constant_objective / objective`` (theory 4), and exact, ``(E f_const - f_GD) /
(E f_opt - f_GD)`` from the exact SGD recursions (theory 5.2, 5.3). An exact gain below 1 means
the first-order optimum loses to the constant schedule in exact SGD (it happens where the optimum
starts with batch sizes at which SGD's second moment is unstable: large h, the O(h) expansion
does not see it). Heatmaps and a JSON of every number go to the results folder.

    python experiments/sweep_phase_diagram.py [--quick] [--out results]
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="coarser grids")
parser.add_argument("--out", default="results")
args = parser.parse_args()
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxsched as js  # noqa: E402

K = 200
n_axis = 8 if args.quick else 20
budgets = np.round(np.geomspace(K, 64 * K, n_axis))
D = 20
LAM = 1.0 / np.arange(1, D + 1)


def gaussian(noise_var):
    return js.DiagonalGaussianRegression(jnp.asarray(LAM), jnp.ones(D), noise_var)


def run(name, problem, axes, axis_names, **fixed):
    cfg = js.grid(**axes)
    if fixed:  # constant columns, not grid axes
        cols = {**cfg.columns, **{k: np.full(len(cfg), v) for k, v in fixed.items()}}
        cfg = js.Configurations(cols, cfg.axes, cfg.coords)
    t = time.perf_counter()
    res = js.sweep(problem, cfg, steps=K, progress=False)
    elapsed = time.perf_counter() - t
    ok = res.ok
    print(f"{name}: {len(res)} configurations in {elapsed:.1f} s (compile included), "
          f"{int(ok.sum())} ok" + ("" if ok.all() else
                                  f"; failed: {sorted(set(res.reason[~ok].tolist()))}"))
    gain = np.where(ok, res.gain, np.nan).reshape(cfg.shape)
    exact = np.where(ok, res.exact_gain, np.nan).reshape(cfg.shape)
    i = np.unravel_index(np.nanargmax(gain), cfg.shape)
    a, b = axis_names
    print(f"  predicted gain {np.nanmin(gain):.3g} .. {np.nanmax(gain):.3g} (largest at "
          f"{a} = {axes[a][i[0]]:.3g}, {b} = {axes[b][i[1]]:.0f}); exact gain "
          f"{np.nanmin(exact):.3g} .. {np.nanmax(exact):.3g}")
    rel = np.abs(exact / gain - 1)
    print(f"  predicted vs exact gain: median relative difference {np.nanmedian(rel):.2g}, "
          f"max {np.nanmax(rel):.2g}")
    worse = exact < 1 - 1e-9
    if worse.any():
        where = ", ".join(f"{a} = {axes[a][r]:.3g}/{b} = {axes[b][c]:.0f}"
                          for r, c in zip(*np.nonzero(worse), strict=True))
        print(f"  exact gain < 1 (the first-order optimum loses to constant in exact SGD) in "
              f"{int(worse.sum())} configurations: {where}")
    for j in (0, len(axes[a]) - 1):
        row = ", ".join(f"{g:.2f}" for g in gain[j])
        print(f"  {a} = {axes[a][j]:.3g}: gain over budgets {row}")
    return {
        "axes": {k: np.asarray(v).tolist() for k, v in axes.items()},
        "gain": np.where(np.isnan(gain), None, gain).tolist(),
        "exact_gain": np.where(np.isnan(exact), None, exact).tolist(),
        "status": res.status.reshape(cfg.shape).tolist(),
        "seconds": elapsed,
    }


noise = np.geomspace(1e-3, 10.0, n_axis)
out = {"steps": K}
out["gaussian"] = run("gaussian (label noise x budget)", gaussian,
                      {"noise_var": noise, "samples": budgets}, ("noise_var", "samples"), lr=0.2)
out["gaussian"].update(lr=0.2, eigenvalues=LAM.tolist())

lrs = np.geomspace(0.005, 0.2, n_axis)
diabetes = js.datasets.diabetes_problem()


out["diabetes"] = run("diabetes (learning rate x budget)", diabetes,
                      {"lr": lrs, "samples": budgets}, ("lr", "samples"))

os.makedirs(args.out, exist_ok=True)
name = "sweep_phase_diagram_quick" if args.quick else "sweep_phase_diagram"
with open(os.path.join(args.out, f"{name}.json"), "w") as f:
    json.dump(out, f, indent=2)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axs = plt.subplots(2, 2, figsize=(10, 8), constrained_layout=True)
panels = [
    ("gaussian", "gain", "noise_var", "label noise variance $s^2$", "Gaussian, predicted gain"),
    ("gaussian", "exact_gain", "noise_var", "label noise variance $s^2$", "Gaussian, exact gain"),
    ("diabetes", "gain", "lr", "learning rate $h$", "diabetes, predicted gain"),
    ("diabetes", "exact_gain", "lr", "learning rate $h$", "diabetes, exact gain"),
]
for ax, (prob, key, yname, ylabel, title) in zip(axs.ravel(), panels, strict=True):
    data = np.array(out[prob][key], dtype=float)
    y = np.asarray(out[prob]["axes"][yname])
    # One log colour scale per problem for the predicted and the exact panel; an exact gain
    # below 1 (the optimum starts with batch sizes at which exact SGD is unstable) is drawn red.
    top = max(np.nanmax(np.array(out[prob][k], dtype=float)) for k in ("gain", "exact_gain"))
    cmap = matplotlib.colormaps["viridis"].with_extremes(under="red")
    norm = matplotlib.colors.LogNorm(vmin=1.0, vmax=top)
    mesh = ax.pcolormesh(budgets / K, y, data, shading="nearest", cmap=cmap, norm=norm)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("samples per step $N / K$")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(mesh, ax=ax, extend="min",
                 label="constant / optimal excess loss (red: < 1)")
fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=150)
print(f"wrote {os.path.join(args.out, name)}.json and .png")
