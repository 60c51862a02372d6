"""``jaxsched sweep CONFIG.(toml|json)``: a sweep of optimal schedules from a small config file.

Example (TOML; the JSON form has the same keys)::

    [problem]
    kind = "diabetes"            # "diabetes", "gaussian" or "npz"
    # gaussian: eigenvalues = [1.0, 0.3, 0.05]  or  dim = 100, decay = 1.0  (lam_i = i^-decay)
    #           v0 = 1.0 (or a list), noise_var = 0.5
    # npz:      file = "data.npz" (arrays "features", "targets"), standardise = true
    # diabetes/npz: replace = true, subset_size = 200 (with a subset_seed axis)

    [grid]                       # Cartesian product ([list] instead: equal-length columns)
    lr = [0.02, 0.05]
    samples = {start = 800, stop = 3200, num = 4}      # linspace; scale = "log": geomspace
    # problem parameters: noise_var, decay (gaussian), subset_seed (data sets)

    [sweep]
    steps = 200                  # or a "steps" axis in [grid]
    min_batch = 1                # max_batch = 64 (default: unbounded)
    exact = true                 # exact losses (quadratic problems)
    path = "auto"                # "eigen" or "dense"
    chunk_size = 256
    output = "results/sweep"     # results folder (relative to the config file)

Writes ``results.npz`` / ``results.csv`` (and the resumable chunks) to the output folder and prints
a summary. Rerunning the same command resumes an interrupted sweep. TOML needs Python >= 3.11
(``tomllib``) or the ``tomli`` package; JSON always works.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any

import numpy as np

__all__ = ["add_parser", "load_config", "main", "run"]

_RESERVED_AXES = ("lr", "samples", "min_batch", "max_batch", "steps")
_PARAM_AXES = {
    "gaussian": ("noise_var", "decay"),
    "diabetes": ("subset_seed",),
    "npz": ("subset_seed",),
}


def load_config(path: str) -> dict[str, Any]:
    """Read a TOML or JSON config file into a dict.

    Raises:
        ValueError: naming the file, for an unknown extension, a parse error, or TOML without
            ``tomllib``/``tomli``.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"config: {path}: invalid JSON ({e})") from None
    if ext == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ValueError(
                    "config: TOML needs Python >= 3.11 or the 'tomli' package; use JSON"
                ) from None
        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config: {path}: invalid TOML ({e})") from None
    raise ValueError(f"config: expected a .toml or .json file, got {path!r}")


# ------------------------------------------------------------------------------------------------
# schema: every key, its type and range; one line naming the key for anything else

_PROBLEM_KEYS = {
    "gaussian": ("kind", "eigenvalues", "dim", "decay", "v0", "noise_var"),
    "diabetes": ("kind", "replace", "subset_size"),
    "npz": ("kind", "file", "standardise", "replace", "subset_size"),
}
_RANGE_KEYS = ("start", "stop", "num", "scale", "round")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _want_table(key: str, v) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"{key}: expected a table, got {type(v).__name__} {v!r}")
    return v


def _want_int(key: str, v, lo: int = 1) -> int:
    if not _is_number(v) or float(v) != int(v) or int(v) < lo:
        raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")
    return int(v)


def _want_number(key: str, v, lo: float | None = None) -> float:
    if not _is_number(v) or (lo is not None and v < lo):
        bound = "" if lo is None else f" >= {lo:g}"
        raise ValueError(f"{key}: expected a finite number{bound}, got {v!r}")
    return float(v)


def _want_bool(key: str, v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{key}: expected true or false, got {v!r}")
    return v


def _want_str(key: str, v, choices=None) -> str:
    if not isinstance(v, str) or (choices is not None and v not in choices):
        allowed = "" if choices is None else f" (one of {', '.join(map(repr, choices))})"
        raise ValueError(f"{key}: expected a string{allowed}, got {v!r}")
    return v


def _no_unknown(section: str, table: dict, allowed) -> None:
    for k in table:
        if k not in allowed:
            raise ValueError(f"{section}.{k}: unknown key (allowed: {', '.join(allowed)})")


def _check_problem(spec) -> None:
    spec = _want_table("problem", spec)
    kind = spec.get("kind")
    if kind not in _PROBLEM_KEYS:
        raise ValueError(f"problem.kind: must be one of {sorted(_PROBLEM_KEYS)}, got {kind!r}")
    _no_unknown("problem", spec, _PROBLEM_KEYS[kind])
    for k, v in spec.items():
        key = f"problem.{k}"
        if k in ("dim", "subset_size"):
            _want_int(key, v, 1 if k == "dim" else 2)
        elif k in ("decay",):
            _want_number(key, v)
        elif k == "noise_var":
            _want_number(key, v, 0.0)
        elif k in ("replace", "standardise"):
            _want_bool(key, v)
        elif k == "file":
            _want_str(key, v)
        elif k in ("eigenvalues", "v0"):
            values = v if isinstance(v, list) else [v]
            if k == "eigenvalues" and not isinstance(v, list):
                raise ValueError(f"{key}: expected a list of numbers > 0, got {v!r}")
            if not values or not all(_is_number(x) for x in values):
                raise ValueError(f"{key}: expected a number or a non-empty list of numbers, got {v!r}")


def _check_axis(name: str, spec) -> None:
    key = f"grid.{name}"
    if isinstance(spec, dict):
        _no_unknown(key, spec, _RANGE_KEYS)
        for k in ("start", "stop", "num"):
            if k not in spec:
                raise ValueError(f"{key}.{k}: a range needs start, stop and num")
        _want_number(f"{key}.start", spec["start"])
        _want_number(f"{key}.stop", spec["stop"])
        _want_int(f"{key}.num", spec["num"])
        if "scale" in spec:
            _want_str(f"{key}.scale", spec["scale"], ("linear", "log"))
        if "round" in spec:
            _want_bool(f"{key}.round", spec["round"])
        return
    values = spec if isinstance(spec, list) else [spec]
    if not values:
        raise ValueError(f"{key}: expected a non-empty list of numbers")
    if name == "subset_seed" or not any(isinstance(x, list) for x in values):
        for x in values:
            if not _is_number(x):
                raise ValueError(f"{key}: expected numbers or a range table, got {x!r}")
        if name in ("samples", "min_batch", "max_batch", "steps", "subset_seed"):
            for x in values:
                _want_int(key, x, 0 if name == "subset_seed" else 1)


_SWEEP_CHECKS = {
    "steps": lambda k, v: _want_int(k, v),
    "min_batch": lambda k, v: _want_int(k, v),
    "max_batch": lambda k, v: _want_int(k, v),
    "exact": _want_bool,
    "path": lambda k, v: _want_str(k, v, ("auto", "eigen", "dense")),
    "chunk_size": lambda k, v: _want_int(k, v),
    "output": lambda k, v: _want_str(k, v),
    "progress": _want_bool,
    "nodes": lambda k, v: _want_int(k, v),
    "overwrite": _want_bool,
}


def check_config(config) -> None:
    """Validate a parsed sweep config against the schema (module docstring).

    Raises:
        ValueError: one line naming the offending key (``section.key``), for an unknown key, a
            wrong type or an out-of-range value.
    """
    if not isinstance(config, dict):
        raise ValueError(f"config: expected a table at the top level, got {type(config).__name__}")
    _no_unknown("config", config, ("problem", "grid", "list", "sweep"))
    if ("grid" in config) == ("list" in config):
        raise ValueError("config: give exactly one of [grid] (a product) or [list] (columns)")
    _check_problem(config.get("problem", {}))
    section = "grid" if "grid" in config else "list"
    table = _want_table(section, config[section])
    if not table:
        raise ValueError(f"{section}: expected a table of axes")
    for name, spec in table.items():
        _check_axis(name, spec)
    opts = _want_table("sweep", config.get("sweep", {}))
    _no_unknown("sweep", opts, tuple(_SWEEP_CHECKS))
    for k, v in opts.items():
        _SWEEP_CHECKS[k](f"sweep.{k}", v)


def _axis(name: str, spec) -> np.ndarray:
    """Axis values: a list, a number, or ``{start, stop, num, scale}``."""
    if isinstance(spec, dict):
        missing = {"start", "stop", "num"} - set(spec)
        if missing:
            raise ValueError(f"grid.{name}: a range needs start, stop and num (missing {missing})")
        scale = spec.get("scale", "linear")
        if scale not in ("linear", "log"):
            raise ValueError(f"grid.{name}: scale must be 'linear' or 'log', got {scale!r}")
        fn = np.geomspace if scale == "log" else np.linspace
        values = fn(float(spec["start"]), float(spec["stop"]), int(spec["num"]))
        if spec.get("round", name in ("samples", "min_batch", "max_batch", "steps")):
            values = np.round(values)
        return values
    try:
        values = np.atleast_1d(np.asarray(spec, dtype=np.float64))
    except (TypeError, ValueError):
        raise ValueError(f"grid.{name}: expected numbers or a range table") from None
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"grid.{name}: expected a non-empty list of numbers")
    return values


def _data_arrays(spec: dict, base_dir: str):
    import jaxsched as js

    kind = spec.get("kind")
    if kind == "diabetes":
        return js.datasets.diabetes_data()
    file = spec.get("file")
    if not file:
        raise ValueError("problem.file: an npz problem needs a file with 'features' and 'targets'")
    path = file if os.path.isabs(file) else os.path.join(base_dir, file)
    with np.load(path) as z:
        if "features" not in z or "targets" not in z:
            raise ValueError(f"problem.file: {path} needs arrays 'features' and 'targets'")
        X, y = np.asarray(z["features"], float), np.asarray(z["targets"], float)
    if spec.get("standardise", True):
        X = js.datasets.standardise(X)
        y = js.datasets.standardise(y[:, None])[:, 0]
    return X, y


def _gaussian_spectrum(spec: dict):
    if "eigenvalues" in spec:
        lam = np.asarray(spec["eigenvalues"], dtype=np.float64)
        if lam.ndim != 1 or lam.size == 0 or np.any(lam <= 0):
            raise ValueError("problem.eigenvalues: expected a non-empty list of positive numbers")
        return lam, None
    if "dim" not in spec:
        raise ValueError("problem: a gaussian problem needs 'eigenvalues' or 'dim' (with 'decay')")
    dim = int(spec["dim"])
    if dim < 1:
        raise ValueError(f"problem.dim: must be >= 1, got {dim}")
    return None, dim


def build_problem(spec: dict, axes: dict[str, np.ndarray], base_dir: str = "."):
    """The problem (or builder) and the extra configuration axes for a ``[problem]`` table.

    Returns:
        ``(problem_or_builder, axes)`` where ``axes`` has problem-parameter axes converted to
        what the builder takes (``subset_seed`` becomes ``subset`` index arrays).
    """
    import jax.numpy as jnp

    import jaxsched as js

    kind = spec.get("kind")
    if kind not in _PARAM_AXES:
        raise ValueError(f"problem.kind: must be one of {sorted(_PARAM_AXES)}, got {kind!r}")
    params = [k for k in axes if k not in _RESERVED_AXES]
    unknown = [k for k in params if k not in _PARAM_AXES[kind]]
    if unknown:
        raise ValueError(
            f"grid: {unknown} are not parameters of a {kind} problem "
            f"(allowed: {list(_RESERVED_AXES) + list(_PARAM_AXES[kind])})"
        )
    axes = dict(axes)
    if kind == "gaussian":
        lam, dim = _gaussian_spectrum(spec)
        if lam is None and "decay" not in spec and "decay" not in axes:
            raise ValueError("problem.decay: needed with 'dim' (eigenvalues i^-decay)")
        d = lam.size if lam is not None else dim
        v0 = np.broadcast_to(np.asarray(spec.get("v0", 1.0), dtype=np.float64), (d,)).copy()
        noise_var = float(spec.get("noise_var", 0.0))
        decay = float(spec.get("decay", 1.0))
        index = np.arange(1, d + 1, dtype=np.float64)

        def gaussian(noise_var=noise_var, decay=decay):
            eig = jnp.asarray(lam) if lam is not None else jnp.asarray(index) ** (-decay)
            return js.DiagonalGaussianRegression(eig, jnp.asarray(v0), noise_var)

        if lam is not None and "decay" in axes:
            raise ValueError("grid.decay: needs problem.dim instead of problem.eigenvalues")
        if not params:
            return gaussian(), axes
        return gaussian, axes

    X, y = _data_arrays(spec, base_dir)
    replace = bool(spec.get("replace", True))
    if "subset_seed" not in axes:
        return js.LinearRegressionData(X, y, np.zeros(X.shape[1]), replace=replace), axes
    n = X.shape[0]
    m = int(spec.get("subset_size", n // 2))
    if not 2 <= m <= n:
        raise ValueError(f"problem.subset_size: must be in [2, {n}], got {m}")
    seeds = axes.pop("subset_seed")
    axes["subset"] = np.stack(
        [np.sort(np.random.default_rng(int(s)).choice(n, m, replace=False)) for s in seeds]
    )
    Xj, yj = jnp.asarray(X), jnp.asarray(y)

    def data_subset(subset):
        idx = subset.astype(jnp.int32)
        return js.LinearRegressionData(Xj[idx], yj[idx], jnp.zeros(X.shape[1]), replace=replace)

    return data_subset, axes


def run(config: dict, *, base_dir: str = ".", output: str | None = None,
        chunk_size: int | None = None, progress: bool | None = None, overwrite: bool = False,
        out=None):
    """Run the sweep described by ``config`` (the parsed file) and, with an output folder, write
    its pictures there (``gain.png``, ``first_batch.png``, ``last_batch.png``).

    Returns:
        The :class:`jaxsched.SweepResult`.

    Raises:
        ValueError: one line naming the key of the config (or the argument) that is wrong.
    """
    import jax

    jax.config.update("jax_enable_x64", True)  # tolerances of the solvers assume float64
    import jaxsched as js

    out = sys.stdout if out is None else out
    check_config(config)
    table = config.get("grid", config.get("list"))
    axes = {k: _axis(k, v) for k, v in table.items()}
    problem, axes = build_problem(config.get("problem", {}), axes, base_dir)
    opts = dict(config.get("sweep", {}))
    if "grid" in config:
        configs = js.grid(**axes)
    else:
        configs = js.configurations(**axes)
    n = len(configs)
    extra = {k: np.full(n, float(opts[k])) for k in ("min_batch", "max_batch")
             if k in opts and k not in configs.columns}
    if extra:
        configs = js.Configurations({**configs.columns, **extra}, configs.axes, configs.coords)
    folder = output if output is not None else opts.get("output")
    if folder is not None and not os.path.isabs(folder) and output is None:
        folder = os.path.join(base_dir, folder)
    steps = opts.get("steps")
    t0 = time.perf_counter()
    result = js.sweep(
        problem,
        configs,
        steps=None if steps is None else int(steps),
        path=opts.get("path", "auto"),
        exact=opts.get("exact"),
        nodes=int(opts.get("nodes", 8)),
        chunk_size=chunk_size if chunk_size is not None else (
            int(opts["chunk_size"]) if "chunk_size" in opts else None),
        results_dir=folder,
        progress=progress if progress is not None else opts.get("progress"),
        overwrite=overwrite or bool(opts.get("overwrite", False)),
    )
    elapsed = time.perf_counter() - t0
    pictures = write_pictures(result, folder) if folder is not None else []
    _summary(result, elapsed, folder, out, pictures)
    return result


def write_pictures(result, folder: str) -> list[str]:
    """Heatmaps of the gain and of the optimal schedule's first and last batch over the two widest
    axes, written atomically into ``folder`` (nothing when no configuration succeeded)."""
    from jaxsched._sweep.plot import write_pngs

    if not result.ok.any():
        return []
    return write_pngs(result, folder)


def _summary(result, elapsed: float, folder, out, pictures=()) -> None:
    n = len(result)
    ok = result.ok
    print(f"sweep: {n} configurations in {elapsed:.2f} s; {int(ok.sum())} ok, "
          f"{int((~ok).sum())} failed", file=out)
    for reason, count in collections.Counter(result.reason[~ok].tolist()).most_common():
        print(f"  failed ({count}): {reason}", file=out)
    if ok.any():
        gain = np.where(ok, result.gain, -np.inf)
        i = int(np.argmax(gain))
        row = {k: v for k, v in result.rows()[i].items()
               if k not in ("batch_sizes", "reason", "ok", "status")}
        print(f"  largest gain (constant / optimal noise term): {result.gain[i]:.4g} at "
              + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items()
                          if k in result.configs.columns or k.endswith("_index")), file=out)
        print(f"  gain range: {result.gain[ok].min():.4g} .. {result.gain[ok].max():.4g}", file=out)
        if "exact_gain" in result.outputs:
            eg = result.outputs["exact_gain"][ok]
            print(f"  exact gain range: {eg.min():.4g} .. {eg.max():.4g}", file=out)
    if folder is not None:
        print(f"  results: {os.path.join(folder, 'results.csv')} and results.npz", file=out)
    if pictures:
        print("  pictures: " + ", ".join(os.path.basename(p) for p in pictures), file=out)


def _handler(args) -> int:
    try:
        config = load_config(args.config)
        run(
            config,
            base_dir=os.path.dirname(os.path.abspath(args.config)),
            output=args.output,
            chunk_size=args.chunk_size,
            progress=False if args.no_progress else None,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"jaxsched sweep: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "sweep",
        help="optimal schedules over a grid of configurations (TOML or JSON config)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("config", help="config file (.toml or .json); see jaxsched.cli.sweep")
    p.add_argument("--output", help="results folder (overrides [sweep].output)")
    p.add_argument("--chunk-size", type=int, help="configurations per chunk")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another sweep in the output folder")
    p.set_defaults(func=_handler)
    return p


def main(argv=None) -> int:
    """Standalone entry: ``python -m jaxsched.cli.sweep sweep CONFIG``."""
    parser = argparse.ArgumentParser(prog="jaxsched")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
