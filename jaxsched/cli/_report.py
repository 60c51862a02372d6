"""The outputs of ``jaxsched optimize``: the content of ``schedule.json`` and ``schedule.csv``, the
figure ``schedule.png`` and the table printed after a run (for SGD with exact losses; for Adam and
RMSprop with the moment model's predictions only)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ._common import fmt
from ._compute import Results
from ._settings import DOUBLING_STAGES, RAMP_RATIO, Config


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _gain(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def _stopped_at_cap(cfg: Config, res: Results) -> bool:
    return cfg.method != "closed_form" and res.iterations >= cfg.max_iter


#: Why an Adam/RMSprop schedule.json has null fields (docs/theory.md §9).
NOT_AVAILABLE = {
    "exact_loss": "no exact recursion exists for Adam/RMSprop (the preconditioner is a nonlinear "
    "function of the gradients); every loss is the moment model's prediction",
    "phi": "no sensitivities: the expected loss is not affine in 1/b, so there is no phi and no "
    "square-root rule (jaxsched export, which fits stages to phi, does not apply)",
    "gradient_descent_loss": "no noise-free reference: for Adam/RMSprop the batch size moves the "
    "mean path itself; excess losses are over min f instead (moment_model.loss_floor)",
    "stability_clipped_steps": "the mean-square stability clip is SGD's (theory 8.2)",
}


def payload(cfg: Config, info: dict, res: Results) -> dict:
    """The content of ``schedule.json``."""
    if cfg.adaptive:
        return _adaptive_payload(cfg, info, res)
    return {
        "problem": info,
        "lr": cfg.lr,
        "steps": cfg.steps,
        "samples": cfg.samples,
        "min_batch": cfg.min_batch,
        "max_batch": cfg.max_batch,
        "x64": cfg.x64,
        "method": cfg.method,
        "iterations": res.iterations,
        "max_iter": None if cfg.method == "closed_form" else cfg.max_iter,
        "stopped_at_iteration_cap": _stopped_at_cap(cfg, res),
        "schedules": {
            name: {
                "batch_sizes": [int(v) for v in b],
                "predicted_loss": _finite_or_none(res.predicted[name]),
                "exact_loss": _finite_or_none(res.exact[name]),
            }
            for name, b in res.schedules.items()
        },
        "gradient_descent_loss": {
            "predicted": _finite_or_none(res.gd_predicted),
            "exact": _finite_or_none(res.gd_exact),
        },
        "baseline_parameters": {
            "linear_ramp": {"ratio": RAMP_RATIO},
            "step_doubling": {"stages": min(DOUBLING_STAGES, cfg.steps)},
        },
        "stage_compression": res.compression,
        "phi": [float(v) for v in res.phi],
        "sensitivity": cfg.sensitivity,
        "optimizer": optimizer_info(cfg),
        "lr_schedule": [float(v) for v in res.lr_schedule],
        "budget": res.budget if res.budget is not None else {"kind": "samples"},
        "stability_clipped_steps": res.clipped_steps,
        "warnings": list(res.warnings),
    }


def _adaptive_payload(cfg: Config, info: dict, res: Results) -> dict:
    """``schedule.json`` of an Adam/RMSprop run: the SGD layout where its fields make sense, null
    (with the reason in ``not_available``) where they do not, and the moment model used."""
    floor = res.loss_floor
    return {
        "problem": info,
        "lr": cfg.lr,
        "steps": cfg.steps,
        "samples": cfg.samples,
        "min_batch": cfg.min_batch,
        "max_batch": cfg.max_batch,
        "x64": cfg.x64,
        "method": cfg.method,
        "iterations": res.iterations,
        "max_iter": cfg.max_iter,
        "stopped_at_iteration_cap": bool(res.moment_model["stopped_at_iteration_cap"]),
        "schedules": {
            name: {
                "batch_sizes": [int(v) for v in b],
                "predicted_loss": _finite_or_none(res.predicted[name]),
                "exact_loss": None,
                "predicted_excess_loss": _finite_or_none(res.predicted[name] - floor),
            }
            for name, b in res.schedules.items()
        },
        "gradient_descent_loss": None,
        "baseline_parameters": {
            "linear_ramp": {"ratio": RAMP_RATIO},
            "step_doubling": {"stages": min(DOUBLING_STAGES, cfg.steps)},
            "sgd_sqrt_rule": {"description": "b_k proportional to sqrt(phi_k) of plain SGD at the "
                              "same learning rates (theory 4), integers with the exact budget"},
        },
        "stage_compression": None,
        "phi": None,
        "sensitivity": None,
        "optimizer": optimizer_info(cfg),
        "lr_schedule": [float(v) for v in res.lr_schedule],
        "budget": {"kind": "samples"},
        "stability_clipped_steps": None,
        "moment_model": {
            **res.moment_model,
            "loss_floor": floor,
            "loss_floor_description": "min f (the least-squares optimum), subtracted for the "
            "excess losses and gains",
            "reference": "docs/theory.md section 9",
        },
        "not_available": dict(NOT_AVAILABLE),
        "warnings": list(res.warnings),
    }


def optimizer_info(cfg: Config) -> dict:
    """The optimizer of the run as schedule.json records it (the library's argument names)."""
    if cfg.optimizer == "adam":
        return {"name": "adam", "lr": cfg.lr, "b1": cfg.b1, "b2": cfg.b2, "eps": cfg.eps,
                "lr_schedule": cfg.lr_schedule}
    if cfg.optimizer == "rmsprop":
        return {"name": "rmsprop", "lr": cfg.lr, "decay": cfg.b2, "eps": cfg.eps,
                "eps_in_sqrt": False, "lr_schedule": cfg.lr_schedule}
    return {
        "name": "sgd",
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "nesterov": cfg.nesterov,
        "lr_schedule": cfg.lr_schedule,
    }


def optimizer_text(cfg: Config) -> str:
    """``SGD``, ``heavy-ball SGD (momentum 0.9)``, ``Nesterov SGD (...)``, ``Adam (b1 ..., b2 ...,
    eps ...)`` or ``RMSprop (decay ..., eps ...)``, with the lr schedule."""
    if cfg.optimizer == "adam":
        name = f"Adam (b1 {cfg.b1:g}, b2 {cfg.b2:g}, eps {cfg.eps:g})"
    elif cfg.optimizer == "rmsprop":
        name = f"RMSprop (PyTorch convention, decay {cfg.b2:g}, eps {cfg.eps:g} outside the root)"
    elif cfg.momentum == 0:
        name = "plain SGD"
    else:
        name = f"{'Nesterov' if cfg.nesterov else 'heavy-ball'} SGD (momentum {cfg.momentum:g})"
    return f"optimizer {name}, {cfg.lr_schedule} lr schedule (peak {cfg.lr:g})"


def csv_text(res: Results) -> str:
    """The content of ``schedule.csv``: one row per step, one column per schedule."""
    names = list(res.schedules)
    lines = [",".join(["step", *names])]
    steps = len(res.schedules["optimal"])
    for k in range(steps):
        lines.append(",".join([str(k), *(str(int(res.schedules[n][k])) for n in names)]))
    return "\n".join(lines) + "\n"


_STYLE = {
    "optimal": {"color": "C3", "lw": 2.2, "zorder": 5},
    "constant": {"color": "C0", "lw": 1.4},
    "linear_ramp": {"color": "C2", "lw": 1.4},
    "step_doubling": {"color": "C1", "lw": 1.4},
    "compressed": {"color": "C4", "lw": 1.6, "ls": "--", "zorder": 6},
    "sgd_sqrt_rule": {"color": "C5", "lw": 1.4, "ls": ":"},
}


def write_png(path: str, cfg: Config, info: dict, res: Results) -> None:
    """The figure ``schedule.png``: schedules, exact losses and their excess (SGD on quadratic
    problems; the schedules alone for Adam / RMSprop, which have no exact loss trajectory)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    quadratic = res.gd_trajectory is not None
    # A fixed layout and plain-text labels: constrained layout and mathtext cost about half of
    # the figure's time (measured 2.5 s against 1.2 s under load), most of a warm run's plotting.
    fig = Figure(figsize=(13.5 if quadratic else 6, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if quadratic else 1, squeeze=False)[0]
    steps = np.arange(cfg.steps)
    for name, b in res.schedules.items():
        axes[0].step(steps, b, where="post", label=name.replace("_", " "), **_STYLE.get(name, {}))
    axes[0].set(xlabel="step k", ylabel="batch size b_k", title="batch-size schedules")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    if quadratic:
        k = np.arange(cfg.steps + 1)
        axes[1].plot(k, res.gd_trajectory, color="k", lw=1, ls=":", label="gradient descent")
        for name, tr in res.trajectories.items():
            excess = tr - res.gd_trajectory
            style = _STYLE.get(name, {})
            axes[1].plot(k, tr, label=name.replace("_", " "), **style)
            axes[2].plot(k[1:], np.maximum(excess[1:], 1e-300), **style)
        axes[1].set(xlabel="step k", ylabel="E f(x_k) (exact)", title="expected loss")
        axes[1].legend(fontsize=8)
        axes[2].set(
            xlabel="step k",
            ylabel="E f(x_k) - f(x_k of GD)",
            title="excess over gradient descent (noise)",
        )
        axes[2].set_yscale("log")
    who = f"{cfg.optimizer}, " if cfg.adaptive else ""
    fig.suptitle(f"{info['name']}: {who}lr = {cfg.lr:g}, {cfg.steps} steps, {cfg.samples} samples",
                 fontsize=11)
    if quadratic:
        fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.86, wspace=0.28)
    else:
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.86)
    fig.savefig(path, format="png", dpi=110)


def text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return write


def _fmt_gain(x: float | None) -> str:
    return "-" if x is None else f"{fmt(x, 3)}x"


def _align(head: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r):
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    return [line(r) for r in [head, *rows]]


def _adaptive_table(res: Results) -> list[str]:
    head = ("schedule", "predicted E f(x_K)", "predicted excess", "gain (predicted)")
    floor = res.loss_floor
    opt_excess = res.predicted["optimal"] - floor
    rows = [
        (
            name,
            fmt(res.predicted[name]),
            fmt(res.predicted[name] - floor, 4),
            "-" if name == "optimal" else _fmt_gain(_gain(res.predicted[name] - floor, opt_excess)),
        )
        for name in res.schedules
    ]
    return _align(head, rows)


def _table(res: Results) -> list[str]:
    head = (
        "schedule",
        "predicted E f(x_K)",
        "exact E f(x_K)",
        "exact excess",
        "gain (exact)",
        "gain (predicted)",
    )
    rows = []
    opt_excess = None if res.gd_exact is None else res.exact["optimal"] - res.gd_exact
    for name in res.schedules:
        excess = None if res.gd_exact is None else res.exact[name] - res.gd_exact
        is_opt = name == "optimal"
        rows.append(
            (
                name,
                fmt(res.predicted[name]),
                fmt(res.exact[name]),
                fmt(excess, 4),
                "-" if is_opt else _fmt_gain(_gain(excess, opt_excess)),
                "-" if is_opt else _fmt_gain(_gain(res.noise[name], res.noise["optimal"])),
            )
        )
    return _align(head, rows)


def report(cfg: Config, info: dict, res: Results, written: list[str]) -> str:
    """The text printed after a successful run (every number in ``%g`` style)."""

    def dflt(name):
        return " (default)" if name in cfg.defaulted else ""

    bound = "unbounded" if cfg.max_batch is None else str(cfg.max_batch)
    if "num_examples" in info:
        size = f"{info['num_examples']} examples x {info['dim']} features"
    else:
        size = (
            f"dim {info['dim']}, {info['spectrum']} spectrum, condition {info['condition']:g}, "
            f"noise variance {info['noise']:g}"
        )
    settings = (
        f"settings lr {cfg.lr:g}{dflt('lr')}, steps {cfg.steps}{dflt('steps')}, "
        f"samples {cfg.samples}{dflt('samples')}, batch sizes in [{cfg.min_batch}, {bound}], "
        f"method {cfg.method}, {'float64' if cfg.x64 else 'float32'}"
    )
    if cfg.adaptive:
        return _adaptive_report(cfg, info, res, written, size, settings)
    baselines = (
        f"baselines constant; linear ramp (last/first = {RAMP_RATIO:g}); step doubling "
        f"({min(DOUBLING_STAGES, cfg.steps)} stages); same samples and bounds"
    )
    lines = [f"problem  {info['name']}: {info['description']} ({size})", settings,
             f"{optimizer_text(cfg)}; sensitivity {cfg.sensitivity}", baselines]
    if res.budget is not None:
        lines.append(f"budget   {res.budget['description']}")
    lines.append("")
    lines += _table(res)
    lines += [
        "",
        f"gradient descent (exact gradients, same lr and steps): f(x_K) = {fmt(res.gd_exact)} "
        f"exact, {fmt(res.gd_predicted)} predicted",
        "exact excess = E f(x_K) minus gradient descent's f(x_K): the loss due to gradient noise",
        "gain = the schedule's excess / the optimal schedule's excess (> 1: the optimal one "
        "wins); predicted gain = ratio of sum_k phi_k / b_k",
    ]
    if cfg.method != "closed_form":
        if _stopped_at_cap(cfg, res):
            lines.append(
                f"note: L-BFGS stopped at its iteration cap ({res.iterations} of --max-iter "
                f"{cfg.max_iter}) before meeting its tolerance: the schedule may not be fully "
                "optimised (raise --max-iter)"
            )
        else:
            lines.append(f"L-BFGS converged in {res.iterations} iterations (cap {cfg.max_iter})")
    if res.clipped_steps:
        lines.append(f"note: the stability clip b_k >= 2 b_stab(lr_k) binds at {res.clipped_steps} steps")
    lines += [f"note: {w}" for w in res.warnings]
    if res.compression is not None:
        c = res.compression
        stages = ", ".join(f"{s['batch_size']} x {s['steps']}" for s in c["stage_list"])
        lines += [
            "",
            f"stage compression (at most {c['stages']} stages, batch sizes multiples of "
            f"{c['multiple_of']}): sum_k phi_k / b_k = {fmt(c['objective'])} vs "
            f"{fmt(c['unconstrained_objective'])} unconstrained "
            f"({_fmt_gain(_gain(c['objective'], c['unconstrained_objective']))})",
            f"  stages (batch size x steps): {stages}",
        ]
    lines += ["", f"computed in {res.seconds:.1f} s; wrote {', '.join(written)}"]
    return "\n".join(lines)


def _adaptive_report(cfg: Config, info: dict, res: Results, written: list[str], size: str,
                     settings: str) -> str:
    """The text after an Adam/RMSprop run: the moment model's predictions only (no exact losses)."""
    mm = res.moment_model
    model = (
        f"model    the {mm['model']} moment model of docs/theory.md section 9, level {mm['level']}, "
        f"{mm['covariance']} covariance; L-BFGS over {mm['blocks']} blocks"
    )
    baselines = (
        f"baselines constant; linear ramp (last/first = {RAMP_RATIO:g}); step doubling "
        f"({min(DOUBLING_STAGES, cfg.steps)} stages); SGD square-root rule (b_k ~ sqrt(phi_k) of "
        "plain SGD at the same lr); same samples and bounds"
    )
    lines = [f"problem  {info['name']}: {info['description']} ({size})", settings,
             optimizer_text(cfg), model, baselines, ""]
    lines += _adaptive_table(res)
    lines += [
        "",
        f"every loss is the moment model's prediction: {cfg.optimizer} has no exact recursion and no "
        "closed form (the expected loss is not affine in 1/b)",
        f"predicted excess = predicted E f(x_K) minus min f = {fmt(res.loss_floor)} (least-squares "
        "optimum); gain = the schedule's excess / the optimal schedule's excess (> 1: the optimal "
        "one wins)",
    ]
    if mm["stopped_at_iteration_cap"]:
        lines.append(
            f"note: L-BFGS stopped at its iteration cap ({res.iterations} of --max-iter "
            f"{cfg.max_iter}) before meeting its tolerance: the schedule may not be fully optimised "
            "(raise --max-iter)"
        )
    else:
        lines.append(f"L-BFGS converged in {res.iterations} iterations (cap {cfg.max_iter})")
    lines += [f"note: {w}" for w in res.warnings]
    lines += ["", f"computed in {res.seconds:.1f} s; wrote {', '.join(written)}"]
    return "\n".join(lines)

