"""The sweep driver: configurations grouped by horizon, chunks padded to one size per horizon, the
sharded core per chunk, and a results folder that makes a sweep resumable.

With ``results_dir`` every finished chunk is written atomically (:func:`jaxsched._misc.atomic_write`)
with its configuration indices; a rerun reads the finished chunks and computes only the missing ones
(an unreadable chunk counts as missing). The folder also holds the configurations
(``configs.npz``), a manifest with the sweep's fingerprint, and at the end ``results.npz`` and
``results.csv``. The fingerprint covers every setting, every configuration column and every leaf of
the problem (values, dtypes, shapes; for a builder, its traced program and the constants it closes
over), so a folder is never silently reused for another sweep. An Adam / RMSprop sweep adds its
optimizer (type and every leaf but ``lr``) and its L-BFGS settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .._control import adaptive as ad
from .._expansion.adaptive import warn_untested_range
from .._misc import atomic_write, check_steps
from .._optimizer import AbstractOptimizer
from . import adaptive as adp, core
from .configs import Configurations, as_configurations, host_checks, problem_params
from .results import SweepResult, assemble, load_chunk
from .status import SweepStatus

__all__ = ["sweep"]

_FORMAT_VERSION = 2
_DEFAULT_CHUNK = 1024
_OUTPUT_FILES = ("results.npz", "results.csv", "configs.npz", "manifest.json")


def sweep(
    problem,
    configs,
    *,
    steps: int | None = None,
    path: str = "auto",
    exact: bool | None = None,
    chunk_size: int | None = None,
    results_dir=None,
    overwrite: bool = False,
    progress: bool | None = None,
    devices=None,
    nodes: int = 8,
    rtol=None,
    atol=None,
    solver=None,
    max_steps: int | None = None,
    callback: Callable[[str, int, int], None] | None = None,
    wait_timeout: float = 3600.0,
    sensitivity=None,
    optimizer=None,
    blocks: int = 50,
    max_iter: int = 100,
    gtol: float = 1e-8,
    loss_floor: float = 0.0,
) -> SweepResult:
    """Optimal schedules over a grid or list of configurations: one compiled call per horizon,
    sharded over all devices, in chunks that resume from disk.

    Each configuration has ``lr`` and ``samples`` (required), ``min_batch`` (default 1),
    ``max_batch`` (default unbounded, ``inf``), ``steps`` (or the ``steps`` argument) and problem
    parameters (every other column) for the builder. Configurations are grouped by ``steps`` (a
    shape): one trace per distinct value; within a group all chunks have one padded size, no larger
    than the group.

    Args:
        problem: a problem shared by all configurations, or ``builder(**params) -> problem``
            called on each configuration's parameters (inside the trace: use ``jnp`` and keep the
            same function object to avoid recompiling).
        configs: :func:`grid`, :func:`configurations` or a mapping of equal-length columns.
        steps: default number of steps when ``configs`` has no ``steps`` column.
        path, exact, nodes, rtol, atol, solver, max_steps: see :func:`sweep_core`.
        chunk_size: configurations per chunk (default: one chunk per horizon, or at most 1024
            with ``results_dir``). Chunk membership does not depend on the device count, so a
            sweep can resume on another machine.
        results_dir: folder for resumable results (created if missing). It must be empty or hold
            the same sweep (same configurations, settings and problem, by fingerprint).
        overwrite: with ``results_dir`` holding another sweep, remove its files and start again
            instead of refusing.
        progress: show a tqdm progress bar (default: when there is more than one chunk).
        sensitivity: ``js.Eigenbasis(nodes=)``, ``js.DenseAdjoint()`` or ``"auto"``/``"eigen"``/
            ``"dense"``, as in :func:`jaxsched.optimal_schedule` (overrides ``path`` and ``nodes``).
        devices: devices of the mesh (default all of ``jax.devices()``; in a multi-process run
            the process's own ``jax.local_devices()``).
        callback: called as ``callback(chunk_name, done, total)`` after each finished chunk.
        wait_timeout: seconds a process of a multi-process run waits for the others' manifest
            and chunks before giving up.
        optimizer: ``None`` (plain SGD at each configuration's ``lr``, the default) or
            :class:`jaxsched.Adam` / :class:`jaxsched.RMSprop` with a scalar ``lr``: see
            "Adam and RMSprop" below.
        blocks, max_iter, gtol: with an adaptive ``optimizer``, the block count (the largest
            divisor of ``steps`` not above it is used), L-BFGS's iteration cap and tolerance, as in
            :func:`jaxsched.adaptive_optimal_schedule`.
        loss_floor: with an adaptive ``optimizer``, the default of the ``loss_floor`` column (the
            value subtracted before the gain's ratio, e.g. ``noise_var / 2`` for linear
            regression; default 0 as in :func:`jaxsched.adaptive_optimal_schedule`).

    Adam and RMSprop (docs/theory.md §9): each configuration's schedule is
    :func:`jaxsched.adaptive_optimal_schedule`'s, computed by L-BFGS through the discrete moment
    model (full covariance), vmapped over the configurations of one ``steps`` group (one compile per
    group). The ``lr`` column replaces the optimizer's learning rate; columns named after its other
    scalar fields (``b1``, ``b2``, ``eps`` for Adam; ``decay``, ``eps`` for RMSprop) replace those,
    and an optional ``loss_floor`` column sets each configuration's floor; the other fields come
    from ``optimizer``. Outputs: ``batch_sizes``, ``beta``, the model's ``predicted_loss``,
    ``relaxed_loss`` and ``constant_loss`` (of ``samples / steps``), ``base_loss``, ``noise_term``,
    ``constant_noise_term``, ``iterations`` and ``gain = (constant_loss - loss_floor) /
    (predicted_loss - loss_floor)`` (the convention of :attr:`jaxsched.AdaptiveSchedule.gains`);
    there is no ``phi``, ``correction``, ``objective`` or exact loss (absent from the table, see
    :class:`SweepOutputs`). Statuses add ``INVALID_OPTIMIZER`` (a swept field the optimizer's
    constructor refuses), ``NONFINITE_MODEL``, ``OPTIMIZER_FAILED``, ``MAX_ITERATIONS`` (L-BFGS's
    last iterate, its numbers kept, as ``adaptive_optimal_schedule`` returns it) and
    ``NO_EXCESS_LOSS``. The SGD-only
    options (``path``, ``exact``, ``sensitivity``, ``nodes``, ``rtol``, ``atol``, ``solver``,
    ``max_steps``) are refused. The fingerprint holds the optimizer (its type and every leaf but
    ``lr``) and these settings, so an SGD folder is never resumed as Adam or the reverse.

    Cost: L-BFGS under vmap runs until the slowest configuration of a chunk has stopped and
    differentiates the ``O(steps d^3)`` recursion at every iteration. Measured on a shared 2-core
    CPU (load average 8; Gaussian linear regression, d = 3, steps = 50, float64, random lr in
    [0.005, 0.03] and budgets, one chunk): about 21-24 configurations/s for 64 and 256
    configurations, after a compile of 17-27 s per ``steps`` group (one
    ``adaptive_optimal_schedule`` call at a time: about 5/s). A few dozen configurations take
    seconds; many thousands belong on an accelerator or in chunks resumed from ``results_dir``.
    At ``gtol = 1e-8`` about half of those configurations stopped at ``max_iter = 100``.

    Multi-process (multi-host) sweeps: after ``jax.distributed.initialize(...)`` in every process,
    each process calls ``sweep`` with the same arguments and the same ``results_dir`` on a shared
    file system. Process ``p`` of ``P`` owns the chunks ``p, p + P, p + 2P, ...`` of the layout and
    computes those that are not on disk yet; process 0 writes the manifest and the final results;
    every process waits for the others' chunks and returns the same :class:`SweepResult`. A rerun
    after a crash recomputes only the missing chunks, each by its owner. No collective
    communication is needed (each process shards its chunks over its local devices).

    Returns:
        A :class:`SweepResult`; also written to ``results_dir`` as ``results.npz`` and
        ``results.csv``.

    Raises:
        ValueError: naming the argument, for missing ``lr``/``samples``/``steps``, bad
            ``chunk_size``, a problem/builder mismatch, a ``results_dir`` holding another sweep
            (naming the folder and what changed) or an unreadable manifest (naming the file);
            for a non-adaptive ``optimizer``, an lr schedule, an SGD-only option with an adaptive
            one, or a column naming a field the optimizer does not have.
    """
    cfg = as_configurations(configs)
    shared, builder = core.split_problem(problem)
    cols = _complete_columns(cfg, steps)
    adaptive = _check_adaptive(optimizer, cols, path=path, exact=exact, nodes=nodes, rtol=rtol,
                               atol=atol, solver=solver, max_steps=max_steps,
                               sensitivity=sensitivity, blocks=blocks, max_iter=max_iter,
                               gtol=gtol, loss_floor=loss_floor)
    opt_cols = adp.optimizer_columns(optimizer) if adaptive else ()
    opt_cols = tuple(k for k in opt_cols if k in cols)
    cfg = Configurations(cols, cfg.axes, cfg.coords)  # completed columns are what is stored
    n = len(cfg)
    params = problem_params(cols, opt_cols + ("loss_floor",)) if adaptive else problem_params(cols)
    if shared is not None and params:
        raise ValueError(
            f"configs: parameters {sorted(params)} need a problem builder (a callable), got a "
            "fixed problem"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size: must be a Python int >= 1, got {chunk_size!r}")
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite: must be a bool, got {overwrite!r}")
    if chunk_size is None and results_dir is not None:
        chunk_size = _DEFAULT_CHUNK

    path, nodes = core.resolve_sensitivity(sensitivity, path, nodes)
    pid, nproc = jax.process_index(), jax.process_count()
    if nproc > 1:
        if results_dir is None:
            raise ValueError("results_dir: a multi-process sweep needs a results folder shared by "
                             "all processes")
        if devices is None:
            devices = jax.local_devices()
    host_status, host_detail = host_checks(cols, params)
    probe = core.probe_problem(shared, builder, params)
    mesh = core.mesh_of(devices)
    step_values = cols["steps"]
    groups = list(dict.fromkeys(int(k) for k in step_values))  # first-appearance order
    if adaptive:
        adp.check_optimizer_columns(optimizer, cols, opt_cols, host_status, host_detail)
        bad = ~np.isfinite(cols["loss_floor"]) & (host_status == 0)
        host_status[bad] = SweepStatus.INVALID_PARAMETER
        host_detail[bad] = "loss_floor"
        _warn_adaptive_range(probe, optimizer, cols, host_status)
        settings_by_steps = {K: _adaptive_settings(probe, K, step_values, cols, blocks, max_iter,
                                                   gtol) for K in groups}
        key = {"version": _FORMAT_VERSION, "optimizer": type(optimizer).__name__,
               "model": adp.MODEL, "covariance": adp.COVARIANCE, "blocks": int(blocks),
               "max_iter": int(max_iter), "gtol": float(gtol), "chunk_size": chunk_size}
    else:
        settings_by_steps = {
            K: core.settings_for(probe, steps=K, path=path, exact=exact, nodes=nodes, rtol=rtol,
                                 atol=atol, solver=solver, max_steps=max_steps)
            for K in groups
        }
        first, rtol0, atol0 = settings_by_steps[groups[0]]
        key = {"version": _FORMAT_VERSION, "path": first.path, "exact": first.exact,
               "nodes": first.nodes, "chunk_size": chunk_size,
               "max_steps": None if max_steps is None else int(max_steps),
               "rtol": float(rtol0), "atol": float(atol0), "solver": repr(first.solver)}
    valid = np.flatnonzero(host_status == 0)

    layout = _layout(groups, step_values, chunk_size)
    folder = None
    finished: dict[str, dict[str, np.ndarray]] = {}
    if results_dir is not None:
        folder = os.fspath(results_dir)
        os.makedirs(folder, exist_ok=True)
        parts = _fingerprint_parts(shared, builder, params, cfg, key)
        if adaptive:
            # every leaf but lr, which the 'lr' column replaces
            parts.update(_leaf_parts("optimizer", eqx.tree_at(lambda o: o.lr, optimizer,
                                                               jnp.zeros(()))))
        if pid == 0:
            _prepare_folder(folder, parts, cfg, key, overwrite)
        else:
            fingerprint = _digest(json.dumps(parts, sort_keys=True))
            _wait_for(lambda: _manifest_fingerprint(folder) == fingerprint, wait_timeout,
                      f"process 0 to write the manifest of this sweep into {folder!r} (it refuses a "
                      "folder holding another sweep; see its error)")
        for _, name, members, _ in layout:
            data = load_chunk(os.path.join(folder, name), members)
            if data is not None:
                finished[name] = data

    show = progress if progress is not None else len(layout) > 1
    bar = None
    if show:
        from tqdm.auto import tqdm

        done0 = sum(len(d["index"]) for d in finished.values())
        bar = tqdm(total=n, initial=done0, unit="config", desc="sweep")
    try:
        done = len(finished)
        for i, (K, name, members, size) in enumerate(layout):
            if name in finished or i % nproc != pid:  # done, or another process's chunk
                continue
            data = _run_chunk(shared, builder, cols, params, members, size, valid, mesh,
                              settings_by_steps[K], optimizer, opt_cols)
            if folder is not None:
                atomic_write(os.path.join(folder, name), lambda f, d=data: np.savez(f, **d))
            finished[name] = data
            done += 1
            if bar is not None:
                bar.update(len(members))
            if callback is not None:
                callback(name, done, len(layout))
    finally:
        if bar is not None:
            bar.close()

    if nproc > 1:
        _collect_others(folder, layout, finished, wait_timeout)
    result = assemble(cfg, cols, layout, finished, host_status, host_detail, adaptive=adaptive)
    if folder is not None and pid == 0:
        result.save(os.path.join(folder, "results.npz"))
        result.to_csv(os.path.join(folder, "results.csv"))
    return result


def _complete_columns(cfg: Configurations, steps) -> dict[str, np.ndarray]:
    """The columns with ``steps``, ``min_batch`` and ``max_batch`` filled in (and checked)."""
    cols = dict(cfg.columns)
    for name in ("lr", "samples"):
        if name not in cols:
            raise ValueError(f"configs: missing the column {name!r}")
    n = len(cfg)
    for name in ("lr", "samples", "min_batch", "max_batch", "steps"):
        if name in cols and cols[name].ndim != 1:
            raise ValueError(f"configs: {name!r} must hold scalars, got shape {cols[name].shape}")
    if "steps" not in cols:
        if steps is None:
            raise ValueError("steps: give steps=... or a 'steps' column in configs")
        cols["steps"] = np.full(n, float(check_steps(steps)))
    cols.setdefault("min_batch", np.ones(n))
    cols.setdefault("max_batch", np.full(n, np.inf))
    step_values = cols["steps"]
    if not np.all((step_values == np.round(step_values)) & (step_values >= 1)):
        raise ValueError("configs: 'steps' must hold integers >= 1")
    return cols


_SGD_ONLY_DEFAULTS = {"path": "auto", "exact": None, "nodes": 8, "rtol": None, "atol": None,
                      "solver": None, "max_steps": None, "sensitivity": None}
#: Names of optimizer hyperparameters; a column with one of them must be a field of the optimizer.
_HYPERPARAMETERS = ("b1", "b2", "eps", "decay")


def _check_adaptive(optimizer, cols, *, blocks, max_iter, gtol, loss_floor, **sgd_only) -> bool:
    """Whether the sweep runs an adaptive optimizer (``optimizer`` checked, the ``loss_floor``
    column filled in); SGD-only options are refused with one."""
    if optimizer is None:
        return False
    if not isinstance(optimizer, AbstractOptimizer) or not optimizer.is_adaptive:
        raise ValueError(
            "optimizer: a sweep takes None (plain SGD at each configuration's lr) or js.Adam / "
            f"js.RMSprop, got {type(optimizer).__name__}")
    if not optimizer.constant_lr:
        raise ValueError("optimizer: the sweep's 'lr' column replaces the optimizer's learning "
                         "rate; pass an optimizer with a scalar lr")
    for name, default in _SGD_ONLY_DEFAULTS.items():
        value = sgd_only[name]
        if not (value is default or value == default or (name == "exact" and value is False)):
            raise ValueError(f"{name}: an option of the SGD sweep; with optimizer="
                             f"{type(optimizer).__name__} the moment model is used (docs/theory.md §9)")
    fields = adp.optimizer_columns(optimizer)
    for name in _HYPERPARAMETERS:
        if name in cols and name not in fields:
            raise ValueError(f"configs: {type(optimizer).__name__} has no field {name!r}; its "
                             f"sweepable fields are {list(fields)} (and 'lr')")
    for name, value, lo in (("blocks", blocks, 1), ("max_iter", max_iter, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"{name}: must be an int >= {lo}, got {value!r}")
    if not (isinstance(gtol, (int, float)) and not isinstance(gtol, bool) and gtol > 0):
        raise ValueError(f"gtol: must be a number > 0, got {gtol!r}")
    n = len(cols["lr"])
    if "loss_floor" not in cols:
        if isinstance(loss_floor, bool) or not isinstance(loss_floor, (int, float, np.floating)):
            raise ValueError(f"loss_floor: must be a number, got {loss_floor!r}")
        cols["loss_floor"] = np.full(n, float(loss_floor))
    elif cols["loss_floor"].ndim != 1:
        raise ValueError(f"configs: 'loss_floor' must hold scalars, got shape {cols['loss_floor'].shape}")
    return True


def _adaptive_settings(probe, K, step_values, cols, blocks, max_iter, gtol):
    """The static settings of one ``steps`` group of an adaptive sweep (see :mod:`.adaptive` for
    the choice of parametrisation)."""
    members = step_values == K
    bounded = probe.batch_cap() is not None or bool(np.any(np.isfinite(cols["max_batch"][members])))
    length = K // ad._block_count(K, int(blocks))
    return adp.AdaptiveSettings(int(K), int(length), bounded, int(max_iter), float(gtol))


def _warn_adaptive_range(probe, optimizer, cols, host_status) -> None:
    """:func:`jaxsched._expansion.adaptive.warn_untested_range` once, at the largest valid lr."""
    ok = host_status == 0
    if not np.any(ok):
        return
    lr = float(np.max(cols["lr"][ok]))
    warn_untested_range(probe, eqx.tree_at(lambda o: o.lr, optimizer, jnp.asarray(lr)), "full",
                        stacklevel=4)


def _layout(groups, step_values, chunk_size):
    """``(steps, file name, member indices, padded size)`` per chunk: per horizon, consecutive
    configuration indices. All chunks of a horizon share one size (one trace), which is never
    larger than the horizon's number of configurations."""
    layout = []
    for K in groups:
        members = np.flatnonzero(step_values == K)
        size = len(members) if chunk_size is None else min(chunk_size, len(members))
        for j, start in enumerate(range(0, len(members), size)):
            layout.append((K, f"chunk-s{K}-{j:05d}.npz", members[start:start + size], size))
    return layout


# ------------------------------------------------------------------------------------------------
# fingerprint and folder


def _digest(*items) -> str:
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray):
            h.update(f"{item.dtype.str}{item.shape}".encode())
            h.update(np.ascontiguousarray(item).tobytes())
        else:
            h.update(str(item).encode())
    return h.hexdigest()[:16]


def _leaf_parts(prefix: str, tree) -> dict[str, str]:
    """A digest per leaf (value, dtype and shape; ``str`` of non-array leaves) and one of the
    structure, which holds the static fields (e.g. ``replace``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = {f"{prefix} structure": _digest(str(treedef))}
    for path, leaf in leaves:
        value = np.asarray(leaf) if eqx.is_array_like(leaf) else leaf
        out[f"{prefix}{jax.tree_util.keystr(path)}"] = _digest(type(leaf).__name__, value)
    return out


def _fingerprint_parts(shared, builder, params, cfg: Configurations, key: dict) -> dict[str, str]:
    """Named digests of everything a sweep's results depend on (see the module docstring)."""
    parts = {f"setting {k}": json.dumps(v) for k, v in sorted(key.items())}
    for group, table in (("column", cfg.columns), ("axis", cfg.axes or {}),
                         ("coordinate", cfg.coords or {})):
        for k, v in sorted(table.items()):
            parts[f"configs {group} {k!r}"] = _digest(np.asarray(v))
    if shared is not None:
        parts.update(_leaf_parts("problem", shared))
        return parts
    # A builder: its traced program (operations, literals, output structure) and every constant it
    # closes over (a data set, a spectrum), plus the named leaves of the first configuration's
    # problem for readable messages.
    first = {k: jnp.asarray(v[0]) for k, v in params.items()}
    closed, shape = jax.make_jaxpr(lambda p: builder(**p), return_shape=True)(first)
    parts["problem builder program"] = _digest(str(closed.jaxpr),
                                               str(jax.tree_util.tree_structure(shape)))
    for i, c in enumerate(closed.consts):
        parts[f"problem builder constant #{i}"] = _digest(np.asarray(c))
    parts.update(_leaf_parts("problem (first configuration)", builder(**first)))
    return parts


def _changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    names = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    out = []
    for k in names:
        if k.startswith("setting ") and k in old and k in new:
            out.append(f"{k}: {old[k]} -> {new[k]}")
        else:
            out.append(k)
    return out


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"results_dir: {path} is not a readable manifest ({e}); remove the folder or pass "
            "overwrite=True (--overwrite)"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), str):
        raise ValueError(
            f"results_dir: {path} is not a sweep manifest (no fingerprint); remove the folder or "
            "pass overwrite=True (--overwrite)"
        )
    return manifest


def _manifest_fingerprint(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"results_dir: waited {timeout:g} s for {what}")
        time.sleep(0.2)


def _collect_others(folder: str, layout, finished: dict, timeout: float) -> None:
    """Load the chunks the other processes of a multi-process sweep computed, waiting for them."""

    def all_there() -> bool:
        for _, name, members, _ in layout:
            if name not in finished:
                data = load_chunk(os.path.join(folder, name), members, notice=lambda _: None)
                if data is None:
                    return False
                finished[name] = data
        return True

    _wait_for(all_there, timeout, "the other processes' chunks")


def _clear(folder: str) -> None:
    """Remove the files of an earlier sweep (and only those) from ``folder``."""
    for name in os.listdir(folder):
        if name in _OUTPUT_FILES or (name.startswith("chunk-") and name.endswith(".npz")):
            os.remove(os.path.join(folder, name))


def _prepare_folder(folder: str, parts: dict[str, str], cfg: Configurations, key: dict,
                    overwrite: bool) -> None:
    fingerprint = _digest(json.dumps(parts, sort_keys=True))
    manifest_path = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest_path):
        try:
            manifest = _read_manifest(manifest_path)
        except ValueError:
            if not overwrite:
                raise
            manifest = {"fingerprint": None}
        if manifest["fingerprint"] == fingerprint:
            return
        if not overwrite:
            old = manifest.get("parts")
            what = ("it was written by an earlier version of jaxsched" if not isinstance(old, dict)
                    else "changed: " + "; ".join(_changes(old, parts)[:6]))
            raise ValueError(
                f"results_dir: {folder!r} holds a different sweep ({what}); use a new folder or "
                "pass overwrite=True (--overwrite)"
            )
        _clear(folder)
    stray = [x for x in os.listdir(folder) if x.startswith("chunk-")]
    if stray and not overwrite:
        raise ValueError(f"results_dir: {folder!r} holds chunks but no manifest; use a new folder")
    if overwrite:
        _clear(folder)
    arrays = {f"config_{k}": v for k, v in cfg.columns.items()}
    if cfg.axes is not None:
        arrays.update({f"axis_{k}": v for k, v in cfg.axes.items()})
        arrays.update({f"coord_{k}": v for k, v in cfg.coords.items()})
    atomic_write(os.path.join(folder, "configs.npz"), lambda f: np.savez(f, **arrays))
    manifest = {"fingerprint": fingerprint, "parts": parts, "settings": key, "n": len(cfg)}
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    atomic_write(manifest_path, lambda f: f.write(text))


# ------------------------------------------------------------------------------------------------
# one chunk


def _run_chunk(shared, builder, cols, params, members, size, valid, mesh, settings,
               optimizer=None, opt_cols=()):
    """Compute one chunk: pad to one size per horizon (a multiple of the device count), replace
    host-rejected rows by a valid configuration, call the sharded core, keep the real rows.
    ``settings`` is ``(Settings, rtol, atol)`` for SGD, an ``AdaptiveSettings`` with an adaptive
    ``optimizer``."""
    ndev = mesh.size
    padded = -(-size // ndev) * ndev
    rows = np.asarray(members)
    ok_rows = np.isin(rows, valid)
    n_real = len(rows)
    out: dict[str, np.ndarray] = {"index": rows}
    if not np.any(ok_rows):
        return out  # every row failed on the host: nothing to compute
    safe = rows[ok_rows][0]
    take = np.where(ok_rows, rows, safe)
    take = np.concatenate([take, np.full(padded - n_real, safe, take.dtype)])
    batch = {
        "lr": cols["lr"][take], "samples": cols["samples"][take],
        "min_batch": cols["min_batch"][take], "max_batch": cols["max_batch"][take],
        "params": {k: v[take] for k, v in params.items()},
    }
    if optimizer is not None:
        # every sweepable field, given or not: one trace whatever columns a sweep has
        batch["optimizer"] = {
            k: cols[k][take] if k in opt_cols else np.full(len(take), float(getattr(optimizer, k)))
            for k in adp.optimizer_columns(optimizer)}
        batch["loss_floor"] = cols["loss_floor"][take]
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(core.AXIS)))
    if optimizer is None:
        settings, rtol, atol = settings
        res = core._sharded_core(builder, shared, batch, rtol, atol, settings, mesh)
    else:
        res = adp.sharded_adaptive_core(builder, shared, optimizer, batch, settings, mesh)
    for f in dataclasses.fields(res):
        v = getattr(res, f.name)
        if v is not None:
            out[f.name] = np.array(v)[:n_real]  # a writable copy
    if optimizer is not None:
        # Rows rejected on the host were computed on a stand-in: record them as rejected in the
        # chunk itself, since load_sweep's host checks know nothing of the optimizer's fields
        # (the statuses it does recompute, budget and lr, override this one there and here).
        rejected = ~ok_rows
        for k, v in out.items():
            if k != "index":
                v[rejected] = 0
        out["status"][rejected] = SweepStatus.INVALID_OPTIMIZER
    return out
