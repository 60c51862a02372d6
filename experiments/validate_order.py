"""Order of accuracy of the prediction E F(x_K) ~ F(x_T) + h J1 (theory 3) against the learning rate.

For each problem and each h (same horizon T and the same continuous schedule beta(t), sampled on
the steps), the error of the prediction against the process it describes:

- Gaussian linear regression (theory 5.1) and the diabetes data (theory 5.3): exact discrete SGD
  moments, no Monte Carlo; also the error of the zeroth-order prediction F(x_T) (slope 1);
- logistic regression on scikit-learn's breast-cancer data (per-example DataProblem) and the log cosh
  example of theory 3: Monte Carlo SGD with the control variate (error bars: 95% intervals), plus the
  prediction without its third-derivative term; for log cosh also the corrected diffusion.

Fitted log-log slopes are printed (2 expected for the full prediction). Writes a figure and a JSON.

    python experiments/validate_order.py [--paths 20000] [--quick] [--out results/validate_order]
"""

import argparse
import json
import os
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--paths", type=int, default=20000, help="Monte Carlo paths per point")
parser.add_argument("--quick", action="store_true", help="fewer learning rates and paths")
parser.add_argument("--out", default="results/validate_order")
args = parser.parse_args()
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_breast_cancer

import jaxsched as js

PATHS = args.paths // 4 if args.quick else args.paths


def schedule(beta, h, horizon, integer):
    """b_k = beta at the midpoint of step k (rounded for Monte Carlo)."""
    steps = round(horizon / h)
    b = beta((np.arange(steps) + 0.5) * h)
    return np.round(b).astype(int) if integer else b


def slope(hs, errs, ok=None):
    """Least-squares slope of log|err| against log h (over the points marked ok)."""
    hs, errs = np.asarray(hs), np.abs(np.asarray(errs))
    ok = np.ones(len(hs), bool) if ok is None else np.asarray(ok)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(hs[ok]), np.log(errs[ok]), 1)[0])


def without_third(problem, e, h):
    """The prediction without the third-derivative term: its source gone, m = 0 (theory 3)."""
    return float(e.predicted_loss - h * jnp.dot(problem.terminal_gradient(e.x_final), e.m_final))


# ------------------------------------------------------------------------------------------------
# exact problems
# ------------------------------------------------------------------------------------------------
def gaussian_problem():
    """Theory 5.1 worked example: eigenvalues (1, 0.3, 0.05), v0 = (1, -2, 3), s2 = 0.5."""
    return js.GaussianLinearRegression(np.diag([1.0, 0.3, 0.05]), np.zeros(3),
                                       np.array([1.0, -2.0, 3.0]), noise_var=0.5)


def exact_study(name, problem, hs, horizon, beta):
    rows = []
    for h in hs:
        b = schedule(beta, h, horizon, integer=False)
        e = js.expansion(problem, b, lr=h)
        exact = float(js.exact_expected_loss(problem, b, lr=h))
        rows.append(dict(h=h, exact=exact, predicted=float(e.predicted_loss),
                         base=float(e.base_loss), error=exact - float(e.predicted_loss),
                         error_zeroth=exact - float(e.base_loss)))
        print(f"{name:>9} h={h:<7} exact={exact:.8f} predicted={float(e.predicted_loss):.8f} "
              f"error={rows[-1]['error']:+.3e}  F(x_T) error={rows[-1]['error_zeroth']:+.3e}",
              flush=True)
    out = dict(rows=rows, slope=slope(hs, [r["error"] for r in rows]),
               slope_zeroth=slope(hs, [r["error_zeroth"] for r in rows]))
    print(f"{name:>9} slope of |error|: {out['slope']:.3f} (zeroth order: {out['slope_zeroth']:.3f})")
    return out


# ------------------------------------------------------------------------------------------------
# Monte Carlo problems
# ------------------------------------------------------------------------------------------------
def logistic_loss(p, ex):
    a, t = ex
    z = a @ p
    return jnp.logaddexp(0.0, z) - t * z


def cancer_problem():
    X, y = load_breast_cancer(return_X_y=True)
    X = np.hstack([js.datasets.standardise(X), np.ones((X.shape[0], 1))])
    return js.DataProblem(logistic_loss, (X, y.astype(np.float64)), np.zeros(X.shape[1]))


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(40)
_GH_X, _GH_W = jnp.asarray(_GH_X), jnp.asarray(_GH_W / _GH_W.sum())


def _logcosh(z):
    return jnp.abs(z) + jnp.log1p(jnp.exp(-2.0 * jnp.abs(z))) - jnp.log(2.0)


def logcosh_problem():
    """Theory 3: l(x; a) = log cosh(x - a), a ~ N(0, 1), x0 = 3; f and Sigma by Gauss–Hermite."""
    def f(x):
        return jnp.sum(_GH_W * _logcosh(x[0] - _GH_X))

    def sigma(x):
        t = jnp.tanh(x[0] - _GH_X)
        return jnp.reshape(jnp.sum(_GH_W * t * t) - jnp.sum(_GH_W * t) ** 2, (1, 1))

    return js.SampledProblem(lambda x, a: _logcosh(x[0] - a), lambda key: jax.random.normal(key),
                             x0=jnp.array([3.0]), loss=f, noise_cov=sigma)


def monte_carlo_study(name, problem, hs, horizon, beta, processes, seed):
    rows = []
    for i, h in enumerate(hs):
        b = schedule(beta, h, horizon, integer=True)
        e = js.expansion(problem, b, lr=h)
        pred, pred_no_m = float(e.predicted_loss), without_third(problem, e, h)
        for process in processes:
            t = time.perf_counter()
            key = jax.random.key(seed + i)
            if process == "sgd":
                r = js.simulate_sgd(problem, b, lr=h, num_paths=PATHS, key=key, control_variate=True)
            else:
                r = js.simulate_sde(problem, b, lr=h, num_paths=PATHS, key=key, method="scan",
                                    control_variate=True)
            mean, se = float(r.mean()), float(r.stderr())
            rows.append(dict(process=process, h=h, mean=mean, stderr=se, predicted=pred,
                             predicted_without_third=pred_no_m, error=mean - pred,
                             error_without_third=mean - pred_no_m, seconds=time.perf_counter() - t))
            print(f"{name:>9} {process} h={h:<6} MC={mean:.7f}±{se:.1e} predicted={pred:.7f} "
                  f"error={mean - pred:+.2e} ({(mean - pred) / se:+.1f} SE)  without m: "
                  f"{mean - pred_no_m:+.2e} ({(mean - pred_no_m) / se:+.1f} SE)", flush=True)
    out = dict(rows=rows)
    for process in processes:
        sub = [r for r in rows if r["process"] == process]
        resolved = [abs(r["error"]) > 3 * r["stderr"] for r in sub]
        out[f"slope_{process}"] = slope([r["h"] for r in sub], [r["error"] for r in sub], resolved)
        out[f"slope_{process}_without_third"] = slope(
            [r["h"] for r in sub], [r["error_without_third"] for r in sub])
        print(f"{name:>9} {process}: slope of |error| {out[f'slope_{process}']:.3f} (points "
              f"resolved beyond 3 SE only), without the m term {out[f'slope_{process}_without_third']:.3f}")
    return out


def main():
    t0 = time.perf_counter()
    results = {"paths": PATHS, "device": str(jax.devices()[0])}
    hs_exact = [0.2, 0.1, 0.05, 0.025] if args.quick else [0.2, 0.1, 0.05, 0.025, 0.0125]
    results["gaussian"] = exact_study("gaussian", gaussian_problem(), hs_exact, 10.0,
                                      lambda t: 2.0 + 0.5 * t)
    results["diabetes"] = exact_study("diabetes", js.datasets.diabetes_problem(), hs_exact[1:],
                                      10.0, lambda t: 4.0 + 1.2 * t)
    hs_mc = [0.2, 0.1, 0.05] if args.quick else [0.4, 0.2, 0.1, 0.05]
    results["breast_cancer"] = monte_carlo_study("cancer", cancer_problem(), hs_mc, 3.0,
                                                 lambda t: 2.0 + 2.0 * t, ("sgd",), seed=100)
    results["logcosh"] = monte_carlo_study("logcosh", logcosh_problem(), hs_mc[1:], 3.0,
                                           lambda t: 2.0 + 2.0 * t, ("sgd", "sde"), seed=200)
    results["seconds"] = time.perf_counter() - t0
    plot(results)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}.json and {args.out}.png ({results['seconds']:.0f} s)")


def plot(results):
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, name in zip(axes[:2], ("gaussian", "diabetes"), strict=True):
        rows = results[name]["rows"]
        hs = [r["h"] for r in rows]
        ax.loglog(hs, [abs(r["error"]) for r in rows], "o-",
                  label=f"F(x_T) + h J1 (slope {results[name]['slope']:.2f})")
        ax.loglog(hs, [abs(r["error_zeroth"]) for r in rows], "s--",
                  label=f"F(x_T) (slope {results[name]['slope_zeroth']:.2f})")
        ax.set_title(f"{name}: |exact E F - prediction|")
    for ax, name in zip(axes[2:], ("breast_cancer", "logcosh"), strict=True):
        res = results[name]
        for process, marker in (("sgd", "o"), ("sde", "^")):
            rows = [r for r in res["rows"] if r["process"] == process]
            if not rows:
                continue
            hs = np.array([r["h"] for r in rows])
            ci = 1.96 * np.array([r["stderr"] for r in rows])
            fitted = res[f"slope_{process}"]
            full = (f"{process}: full (slope {fitted:.2f})" if np.isfinite(fitted)
                    else f"{process}: full (within Monte Carlo error at every h)")
            for key, style, label in (
                    ("error", "-", full),
                    ("error_without_third", ":", f"{process}: without m term")):
                y = np.abs([r[key] for r in rows])
                # log axes: the lower whisker stops just above zero
                ax.errorbar(hs, y, yerr=[np.minimum(ci, 0.99 * y), ci], fmt=marker + style,
                            capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name}: |Monte Carlo - prediction| (95% CI)")
    for ax, name in zip(axes, ("gaussian", "diabetes", "breast_cancer", "logcosh"), strict=True):
        hs = sorted({r["h"] for r in results[name]["rows"]})
        ax.set_xticks(hs, [f"{h:g}" for h in hs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("learning rate h")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
    main()
