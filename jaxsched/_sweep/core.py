"""Hyperparameter sweeps of the optimal schedule: one jit-compiled, vmapped, sharded call over a grid
of configurations, run in resumable chunks (theory 4 for the schedule, 5 for the exact losses).

A *configuration* is a learning rate ``lr``, a sample budget ``samples``, bounds ``min_batch`` /
``max_batch``, a horizon in steps ``steps``, and any problem parameters (label noise, spectrum,
data subset, ...) that a problem *builder* turns into a problem. For each configuration the sweep
returns the optimal integer schedule, its predicted loss ``F(x_T) + h J1`` (theory 3), the
predicted loss of the constant schedule with the same budget, the gain, and for quadratic problems
the exact expected losses of both schedules (theory 5.2 / 5.3).

Design:

- **One compiled call per horizon.** ``steps`` is a shape (phi has ``steps`` entries), so the
  configurations are grouped by ``steps`` and each group is one trace; everything else (``lr``,
  budget, bounds, problem parameters) is an array leaf and never recompiles. Chunks of a group are
  padded to one common size, so a chunked sweep is still one trace per group.
- **Sharding.** The configuration axis is split over a 1-D ``jax.sharding.Mesh`` of all devices
  with ``jax.shard_map``: each device runs the vmapped core on its own slice (its ODE loops stop
  independently). Chunks are padded to a multiple of the device count. The same code runs on one
  CPU, several GPUs or a TPU slice.
- **Failures are results.** Infeasible budgets, bad learning rates, non-finite parameters, ODE
  solver failures (diffrax with ``throw=False``, the result code kept), non-finite sensitivities
  or exact losses are reported per configuration as ``status`` / ``reason``; their numbers are
  set to 0 (never NaN) and the other configurations are untouched.
- **Two paths to phi.**

  * ``"eigen"``: for quadratic problems, in the eigenbasis of the Hessian ``S``
    (:func:`eigen_first_order_parts`). For Gaussian features (theory 5.1) ``phi(t)`` costs
    ``O(d)`` per time point and the per-step integrals are Gauss-Legendre rules (``nodes`` per
    step); for a finite data set (theory 5.3) the integrals are exact sums of exponentials,
    ``O(d^3)`` per step (or quadrature at ``O(n d)`` per time point when ``d^2 > n``). An
    eigendecomposition ``O(d^3)`` is paid once per problem, unless the problem is given by its
    spectrum (:class:`DiagonalGaussianRegression`), where everything is ``O(K d)``.
  * ``"dense"``: the diffrax adjoint system of theory 4 for any problem: ``Lam`` is a ``d x d``
    matrix and every right-hand side costs ``O(d^3)`` (``H Lam``) plus one ``Sigma(x)``.

- **Resumable chunks.** With ``results_dir`` every finished chunk is written atomically (temporary
  file, then ``os.replace``) with its configuration indices; a rerun reads the finished chunks and
  computes only the missing ones. The folder also holds the configurations (``configs.npz``), a
  manifest, and at the end ``results.npz`` and ``results.csv``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._control import optimal as ctl
from .._expansion import eigen as eig, moments as ex
from .._problem.base import AbstractProblem
from .._problem.exact import exact_expected_loss, exact_gd_loss
from .._problem.linear import DiagonalGaussianRegression, GaussianLinearRegression, LinearRegressionData
from .._types import Array, Float, Int

__all__ = [
    "Configurations",
    "SweepOutputs",
    "SweepResult",
    "SweepStatus",
    "configurations",
    "grid",
    "load_results",
    "load_sweep",
    "sweep",
    "sweep_core",
]

#: Number of traces of the sweep core (tests use it to prove a sweep compiles once).
TRACE_COUNTS: collections.Counter = collections.Counter()
#: Number of chunk computations, keyed by chunk file path (tests use it to prove resumption).
CHUNK_COUNTS: collections.Counter = collections.Counter()

_AXIS = "config"
_RESERVED = ("lr", "samples", "min_batch", "max_batch", "steps")
_FORMAT_VERSION = 1

# ------------------------------------------------------------------------------------------------
# status codes


class SweepStatus:
    """Status codes of a configuration (``SweepResult.status``); 0 means success."""

    OK = 0
    INVALID_LR = 1
    INFEASIBLE_BUDGET = 2
    INVALID_PARAMETER = 3
    SOLVER_FAILED = 4
    NONFINITE_SENSITIVITY = 5
    NONFINITE_EXACT = 6
    NO_NOISE_TERM = 7


_REASONS = {
    SweepStatus.OK: "",
    SweepStatus.INVALID_LR: "lr: must be finite and > 0",
    SweepStatus.INFEASIBLE_BUDGET: "samples: infeasible budget for steps and the bounds",
    SweepStatus.INVALID_PARAMETER: "problem parameter not finite",
    SweepStatus.SOLVER_FAILED: "ODE solver failed",
    SweepStatus.NONFINITE_SENSITIVITY: "sensitivity phi or base loss not finite",
    SweepStatus.NONFINITE_EXACT: "exact SGD recursion not finite (lr beyond the stability limit?)",
    SweepStatus.NO_NOISE_TERM: "noise term of the optimal schedule <= 0: the gain is undefined",
}


def _reason(status: int, solver_result: int, detail: str = "") -> str:
    if status == SweepStatus.SOLVER_FAILED:
        messages = diffrax.RESULTS._index_to_message
        msg = messages[solver_result] if 0 < solver_result < len(messages) else "unknown result"
        return f"ODE solver failed: {msg}"
    base = _REASONS.get(int(status), f"unknown status {status}")
    if status == SweepStatus.INFEASIBLE_BUDGET and not detail:
        detail = "found inside the core: without replacement a batch is at most num_examples"
    return f"{base} ({detail})" if detail else base


# ------------------------------------------------------------------------------------------------
# A Gaussian problem given by its spectrum


# ------------------------------------------------------------------------------------------------
# dense path (any problem): the lead's adjoint system with throw=False


# ------------------------------------------------------------------------------------------------
# one configuration (traced, vmapped)


class _Settings(NamedTuple):
    """Static settings of a sweep core: changing one recompiles."""

    steps: int
    path: str
    exact: bool
    nodes: int
    max_steps: int
    solver: Any
    batch: int = 1  # configurations per device (bounds the eigen path's memory)


class SweepOutputs(eqx.Module):
    """Per-configuration outputs of :func:`sweep_core` (leading axis: configurations).

    Schedules: ``batch_sizes`` (the exact integer optimum), ``beta`` (the relaxed optimum),
    ``phi``. Losses (theory 3): ``predicted_loss`` of ``batch_sizes``, ``constant_loss`` of the
    constant real schedule ``samples / steps``, ``base_loss = F(x_T)``, ``correction``; noise terms
    ``objective``, ``relaxed_objective``, ``constant_objective`` (``sum_k phi_k w(b_k)``);
    ``gain = constant_objective / objective`` (noise-induced excess, constant over optimal).
    Exact (quadratic problems with ``exact=True``, else ``None``): ``exact_loss``,
    ``exact_constant_loss``, ``exact_gd_loss`` (plain gradient descent) and ``exact_gain =
    (exact_constant_loss - exact_gd_loss) / (exact_loss - exact_gd_loss)``.
    ``status`` (:class:`SweepStatus`, 0 = success) and ``solver_result`` (diffrax result code).
    Every number of a failed configuration is 0.
    """

    batch_sizes: Int[Array, "n steps"]
    beta: Float[Array, "n steps"]
    phi: Float[Array, "n steps"]
    predicted_loss: Float[Array, " n"]
    constant_loss: Float[Array, " n"]
    base_loss: Float[Array, " n"]
    correction: Float[Array, " n"]
    objective: Float[Array, " n"]
    relaxed_objective: Float[Array, " n"]
    constant_objective: Float[Array, " n"]
    gain: Float[Array, " n"]
    status: Int[Array, " n"]
    solver_result: Int[Array, " n"]
    exact_loss: Float[Array, " n"] | None = None
    exact_constant_loss: Float[Array, " n"] | None = None
    exact_gd_loss: Float[Array, " n"] | None = None
    exact_gain: Float[Array, " n"] | None = None


_SCALAR_OUTPUTS = (
    "predicted_loss", "constant_loss", "base_loss", "correction", "objective",
    "relaxed_objective", "constant_objective", "gain",
)
_STEP_OUTPUTS = ("batch_sizes", "beta", "phi")


def _first_failure(*pairs):
    """The code of the first ``(failed, code)`` pair that failed, else ``SweepStatus.OK``."""
    status = jnp.asarray(SweepStatus.OK)
    for failed, code in reversed(pairs):
        status = jnp.where(failed, code, status)
    return status


def _exact_losses(problem, b, constant, lr, steps, path):
    if isinstance(problem, DiagonalGaussianRegression) or (
        path == "eigen" and isinstance(problem, GaussianLinearRegression)
    ):
        # Theory 5.2 is rotation invariant, so the eigenbasis recursion is exact: O(K d).
        e = eig._eigen_form(problem)
        losses = [eig._diagonal_exact(e, 1.0 / x, lr) for x in (b, constant)]
        gd = eig._diagonal_exact(e, jnp.zeros_like(constant), lr)
    else:
        losses = [exact_expected_loss(problem, x, lr=lr) for x in (b, constant)]
        gd = exact_gd_loss(problem, lr=lr, steps=steps)
    return losses[0], losses[1], gd


def _one_config(builder, shared, cfg, rtol, atol, s: _Settings) -> SweepOutputs:
    problem = shared if builder is None else builder(**cfg["params"])
    dtype = problem.x0.dtype
    steps = s.steps
    lr = jnp.asarray(cfg["lr"], dtype)
    samples = jnp.asarray(cfg["samples"], dtype)
    lo = jnp.asarray(cfg["min_batch"], dtype)
    hi = jnp.asarray(cfg["max_batch"], dtype)
    hi = jnp.where(jnp.isinf(hi), samples, hi)  # unbounded: b_k <= samples is implied
    if isinstance(problem, LinearRegressionData) and not problem.replace:
        hi = jnp.minimum(hi, problem.num_examples)
    lr_ok = jnp.isfinite(lr) & (lr > 0)
    integral = (samples == jnp.round(samples)) & (lo == jnp.round(lo)) & (hi == jnp.round(hi))
    budget_ok = (
        jnp.isfinite(samples) & jnp.isfinite(lo) & integral & (lo >= 1) & (lo <= hi)
        & (samples >= steps * lo) & (samples <= steps * hi)
    )
    # Replace bad inputs by harmless ones so that no loop (ODE, bisection, integer fix-up) runs
    # away and no eqx.error_if fires for the whole vmapped batch; the status says what happened.
    lr = jnp.where(lr_ok, lr, 1.0 / steps)
    lo = jnp.where(budget_ok, lo, 1.0)
    hi = jnp.where(budget_ok, hi, 1.0)
    samples = jnp.where(budget_ok, samples, float(steps))

    if s.path == "eigen":
        parts, result = eig._eigen_parts(problem, lr, steps, s.nodes, s.batch), jnp.asarray(0)
    else:
        parts, result = ex.first_order_solves(
            problem, lr, rtol, atol, s.solver, steps, s.max_steps, throw=False
        )
    solver_ok = result == diffrax.RESULTS.successful._value
    finite = (
        jnp.all(jnp.isfinite(parts.phi)) & jnp.isfinite(parts.base_loss)
        & jnp.isfinite(parts.correction)
    )
    phi_ok = solver_ok & finite
    parts = ex.FirstOrderParts(
        phi=jnp.where(phi_ok, parts.phi, 1.0),
        base_loss=jnp.where(phi_ok, parts.base_loss, 0.0),
        correction=jnp.where(phi_ok, parts.correction, 0.0),
        x_final=parts.x_final,
    )
    # Same allocation as optimal_schedule(method="closed_form"): relaxed and exact integer optima.
    # It is piecewise constant in phi (zero gradient); stopping the gradient keeps the integer
    # loops out of reverse mode, so derivatives of the losses hold the schedule fixed (for the
    # relaxed optimum that is the envelope theorem).
    beta, b = ctl._first_order_allocation(problem, jax.lax.stop_gradient(parts), samples, lo, hi)
    res = ctl._finish(problem, parts, lr, beta, b, samples, 0, "closed_form")
    constant_loss = res.base_loss + lr * (res.correction + res.constant_objective)
    noisy = res.objective > 0
    gain = res.constant_objective / jnp.where(noisy, res.objective, 1.0)

    exact = {}
    exact_bad = jnp.asarray(False)
    if s.exact:
        constant = jnp.full(steps, samples / steps, dtype)
        e_opt, e_const, e_gd = _exact_losses(problem, b.astype(dtype), constant, lr, steps, s.path)
        excess = e_opt - e_gd
        exact_gain = (e_const - e_gd) / jnp.where(excess > 0, excess, 1.0)
        exact = {"exact_loss": e_opt, "exact_constant_loss": e_const, "exact_gd_loss": e_gd,
                     "exact_gain": exact_gain}
        exact_bad = ~jnp.all(jnp.isfinite(jnp.stack(list(exact.values()))))
        noisy = noisy & (excess > 0)

    status = _first_failure(
        (~lr_ok, SweepStatus.INVALID_LR),
        (~budget_ok, SweepStatus.INFEASIBLE_BUDGET),
        (~solver_ok, SweepStatus.SOLVER_FAILED),
        (~finite, SweepStatus.NONFINITE_SENSITIVITY),
        (exact_bad, SweepStatus.NONFINITE_EXACT),
        (~noisy, SweepStatus.NO_NOISE_TERM),
    )
    good = status == SweepStatus.OK

    def clean(x):
        return jnp.where(good, x, jnp.zeros_like(x))

    return SweepOutputs(
        batch_sizes=clean(res.batch_sizes),
        beta=clean(res.beta),
        phi=clean(res.phi),
        predicted_loss=clean(res.predicted_loss),
        constant_loss=clean(constant_loss),
        base_loss=clean(res.base_loss),
        correction=clean(res.correction),
        objective=clean(res.objective),
        relaxed_objective=clean(res.relaxed_objective),
        constant_objective=clean(res.constant_objective),
        gain=clean(gain),
        status=status,
        solver_result=jnp.asarray(result),
        **{k: clean(v) for k, v in exact.items()},
    )


@eqx.filter_jit
def _sharded_core(builder, shared, batch, rtol, atol, settings: _Settings, mesh: Mesh):
    TRACE_COUNTS["sweep"] += 1
    dynamic, static = eqx.partition(shared, eqx.is_array)

    def local(dynamic, batch, rtol, atol):
        problem = eqx.combine(dynamic, static)
        s = settings._replace(batch=batch["lr"].shape[0])
        return jax.vmap(lambda c: _one_config(builder, problem, c, rtol, atol, s))(batch)

    spec = PartitionSpec(_AXIS)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), spec, PartitionSpec(), PartitionSpec()),
        out_specs=spec,
        # Each device runs its own while loops; no replication checks across them are needed.
        check_vma=False,
    )
    return run(dynamic, batch, rtol, atol)


# ------------------------------------------------------------------------------------------------
# validation shared by sweep_core and sweep


def _mesh(devices) -> Mesh:
    devs = jax.devices() if devices is None else list(devices)
    if not devs:
        raise ValueError("devices: need at least one device")
    return Mesh(np.asarray(devs), (_AXIS,))


def _resolve_path(problem, path: str) -> str:
    if path not in ("auto", "eigen", "dense"):
        raise ValueError(f"path: must be 'auto', 'eigen' or 'dense', got {path!r}")
    supported = eig._supports_eigen(problem)
    if path == "eigen" and not supported:
        raise ValueError(
            "path: 'eigen' needs DiagonalGaussianRegression, GaussianLinearRegression or "
            f"LinearRegressionData, got {type(problem).__name__}"
        )
    if path == "auto":
        return "eigen" if supported else "dense"
    return path


def _probe_problem(problem, builder, params: Mapping[str, np.ndarray]):
    """The problem of the first configuration (abstractly, no computation), to learn its type."""
    if builder is None:
        return problem
    first = {k: jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v))
             for k, v in params.items()}
    try:
        return jax.eval_shape(lambda p: builder(**p), first)
    except TypeError as e:
        raise ValueError(f"problem: the builder does not accept the parameters ({e})") from None


def _split_problem(problem):
    if isinstance(problem, AbstractProblem):
        return problem, None
    if callable(problem):
        return None, problem
    raise ValueError(
        "problem: expected a jaxsched problem or a callable building one from the configuration "
        f"parameters, got {type(problem).__name__}"
    )


def _settings(probe, *, steps, path, exact, nodes, rtol, atol, solver, max_steps):
    steps = ex.check_steps(steps)
    path = _resolve_path(probe, path)
    quadratic = isinstance(
        probe, (DiagonalGaussianRegression, GaussianLinearRegression, LinearRegressionData)
    )
    if exact is None:
        exact = quadratic
    if exact and not quadratic:
        raise ValueError(
            f"exact: exact losses need a quadratic problem, got {type(probe).__name__}"
        )
    if max_steps is None:
        max_steps = ex._max_steps(steps)
    elif isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps: must be a Python int >= 1, got {max_steps!r}")
    dtype = probe.x0.dtype
    rtol, atol = ex._tolerances(dtype, rtol, atol)
    settings = _Settings(steps, path, bool(exact), eig._check_nodes(nodes), int(max_steps),
                         ex._default_solver(solver))
    return settings, rtol, atol


# ------------------------------------------------------------------------------------------------
# the functional core


def sweep_core(
    problem,
    *,
    lr,
    samples,
    steps: int,
    min_batch=1,
    max_batch=np.inf,
    params: Mapping[str, Any] | None = None,
    path: str = "auto",
    exact: bool | None = None,
    nodes: int = 8,
    rtol=None,
    atol=None,
    solver=None,
    max_steps: int | None = None,
    devices=None,
) -> SweepOutputs:
    """Optimal schedules of many configurations in one jit-compiled, vmapped, sharded call.

    The pure function behind :func:`sweep` (no chunks, files or host-side checks): it is traced
    once per ``(steps, path, exact, nodes, problem structure, number of configurations)``, can be
    called inside ``jax.jit`` and differentiated (``jax.grad`` of ``predicted_loss`` with respect
    to ``lr`` or problem parameters, the schedule held fixed: it is piecewise constant).

    For each configuration ``c``: ``phi`` (eigen or dense path, see the module docstring), the
    relaxed and exact integer optima of ``sum_k phi_k w(b_k)`` under ``sum_k b_k = samples`` and
    the bounds (theory 4), the predicted losses of the optimum and of the constant real schedule
    ``samples / steps``, and the exact losses for quadratic problems (theory 5.2, 5.3).

    Args:
        problem: a problem shared by all configurations, or a callable ``builder(**params_c)``
            returning the problem of configuration ``c`` (traced; reuse the same function object so
            that a second call does not recompile).
        lr, samples, min_batch, max_batch: arrays broadcast to ``(n,)``; ``max_batch = inf`` means
            unbounded. ``n`` must be a multiple of the number of devices.
        steps: number of steps (Python int; a shape).
        params: ``name -> (n, ...)`` arrays passed to the builder.
        path: ``"eigen"`` (quadratic problems), ``"dense"`` (any problem; ``O(d^3)`` per
            right-hand side) or ``"auto"`` (eigen when possible).
        exact: compute exact losses (default: for quadratic problems).
        nodes: Gauss-Legendre nodes per step (eigen path).
        rtol, atol, solver, max_steps: ODE options of the dense path (defaults as
            :func:`jaxsched.sensitivity`).
        devices: devices of the mesh (default ``jax.devices()``).

    Returns:
        :class:`SweepOutputs`; failed configurations have a non-zero ``status`` and zeros.

    Raises:
        ValueError: naming the argument, for a bad problem/builder, ``steps``, ``path``, ``exact``
            on a non-quadratic problem, mismatched lengths, or ``n`` not a multiple of the
            device count.
    """
    shared, builder = _split_problem(problem)
    params = {} if params is None else dict(params)
    if shared is not None and params:
        raise ValueError(
            f"params: {sorted(params)} need a problem builder (a callable), got a fixed problem"
        )
    probe = _probe_problem(shared, builder, params)
    settings, rtol, atol = _settings(probe, steps=steps, path=path, exact=exact, nodes=nodes,
                                     rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)
    lengths = {jnp.shape(v)[0] for v in params.values()}
    scalars = [jnp.asarray(x) for x in (lr, samples, min_batch, max_batch)]
    lengths |= {x.shape[0] for x in scalars if x.ndim == 1}
    if len(lengths) != 1:
        raise ValueError(f"lr: configuration arrays must share one length, got {sorted(lengths)}")
    n = lengths.pop()
    dtype = probe.x0.dtype
    lr_, samples_, lo_, hi_ = (jnp.broadcast_to(x.astype(dtype), (n,)) for x in scalars)
    mesh = _mesh(devices)
    if n % mesh.size:
        raise ValueError(f"lr: {n} configurations is not a multiple of {mesh.size} devices")
    batch = {"lr": lr_, "samples": samples_, "min_batch": lo_, "max_batch": hi_, "params": params}
    return _sharded_core(builder, shared, batch, rtol, atol, settings, mesh)


# ------------------------------------------------------------------------------------------------
# configurations


@dataclasses.dataclass(frozen=True)
class Configurations:
    """A flat list of configurations, from :func:`grid` (with grid coordinates) or
    :func:`configurations` (a list).

    Attributes:
        columns: ``name -> array`` with leading axis ``n`` (``lr``, ``samples``, optional
            ``min_batch``, ``max_batch``, ``steps``; any other name is a problem parameter).
        axes: for a grid, ``name -> values`` of each axis (in grid order); else ``None``.
        coords: for a grid, ``name -> (n,)`` index of each configuration along each axis.
    """

    columns: dict[str, np.ndarray]
    axes: dict[str, np.ndarray] | None = None
    coords: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    @property
    def shape(self) -> tuple[int, ...]:
        """Grid shape (``(n,)`` for a list)."""
        if self.axes is None:
            return (len(self),)
        return tuple(len(v) for v in self.axes.values())


def _column(name: str, values) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: values must be numbers or numeric arrays") from None
    if arr.ndim == 0:
        arr = arr[None]
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: needs at least one value")
    return arr


def grid(**axes) -> Configurations:
    """The Cartesian product of named axes, in C order (the last axis varies fastest).

    ``grid(lr=[0.01, 0.02], samples=[800, 1600], noise_var=[0.1, 1.0])`` gives 8 configurations.
    Values of an axis may be scalars or equal-shape arrays (a spectrum, a subset of indices): the
    configuration then carries the array and the table its index.

    Raises:
        ValueError: naming the axis, for an empty or non-numeric axis, or no axes.
    """
    if not axes:
        raise ValueError("axes: need at least one axis")
    values = {k: _column(k, v) for k, v in axes.items()}
    idx = np.indices([len(v) for v in values.values()]).reshape(len(values), -1)
    columns = {k: v[i] for (k, v), i in zip(values.items(), idx, strict=True)}
    coords = dict(zip(values, idx, strict=True))
    return Configurations(columns, values, coords)


def configurations(**columns) -> Configurations:
    """A list of configurations from equal-length columns (no grid).

    Raises:
        ValueError: naming the column, for mismatched lengths or non-numeric values.
    """
    if not columns:
        raise ValueError("columns: need at least one column")
    cols = {k: _column(k, v) for k, v in columns.items()}
    lengths = {k: v.shape[0] for k, v in cols.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns: must share one length, got {lengths}")
    return Configurations(cols)


def _as_configurations(configs) -> Configurations:
    if isinstance(configs, Configurations):
        return configs
    if isinstance(configs, Mapping):
        return configurations(**configs)
    raise ValueError(
        "configs: expected grid(...), configurations(...) or a mapping of columns, got "
        f"{type(configs).__name__}"
    )


def _budget_problem(N: float, K: int, lo: float, hi: float) -> str:
    """Why a budget is infeasible, in words (empty when it is feasible)."""
    if not all(np.isfinite([N, lo])) or any(v != round(v) for v in (N, lo)) or (
        np.isfinite(hi) and hi != round(hi)
    ):
        return "samples, min_batch and max_batch must be integers"
    if lo < 1:
        return f"min_batch {lo:g} < 1"
    if lo > hi:
        return f"min_batch {lo:g} > max_batch {hi:g}"
    if N < K * lo:
        return f"samples {N:g} < steps * min_batch = {K * lo:g}"
    if N > K * hi:
        return f"samples {N:g} > steps * max_batch = {K * hi:g}"
    return ""


def _host_checks(cols: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]):
    """Per-configuration status and detail from concrete values (the core repeats the budget
    checks, so a configuration that slips through is still caught)."""
    n = len(cols["lr"])
    status = np.zeros(n, np.int64)
    detail = np.full(n, "", dtype=object)
    lr, N, lo, hi, K = (cols[k] for k in ("lr", "samples", "min_batch", "max_batch", "steps"))
    for name, v in params.items():
        bad = ~np.all(np.isfinite(v.reshape(n, -1)), axis=1) & (status == 0)
        status[bad] = SweepStatus.INVALID_PARAMETER
        detail[bad] = name
    bad_lr = ~(np.isfinite(lr) & (lr > 0)) & (status == 0)
    status[bad_lr] = SweepStatus.INVALID_LR
    detail[bad_lr] = [f"got {v:g}" for v in lr[bad_lr]]
    for i in np.flatnonzero(status == 0):
        why = _budget_problem(float(N[i]), int(K[i]), float(lo[i]), float(hi[i]))
        if why:
            status[i] = SweepStatus.INFEASIBLE_BUDGET
            detail[i] = why
    return status, detail


# ------------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Results of :func:`sweep`, one row per configuration (host-side NumPy arrays: a table with
    strings, not a pytree).

    Attributes:
        configs: the :class:`Configurations`.
        steps: ``(n,)`` steps of each configuration.
        outputs: ``name -> array``: ``batch_sizes``, ``beta``, ``phi`` as ``(n, max_steps)``
            (entries past a configuration's ``steps`` are 0) and the scalar outputs of
            :class:`SweepOutputs` as ``(n,)``. Failed rows hold zeros, never NaN.
        status: ``(n,)`` :class:`SweepStatus` codes; ``reason``: ``(n,)`` text ("" when ok).
    """

    configs: Configurations
    steps: np.ndarray
    outputs: dict[str, np.ndarray]
    status: np.ndarray
    reason: np.ndarray

    @property
    def ok(self) -> np.ndarray:
        return self.status == SweepStatus.OK

    def __len__(self) -> int:
        return len(self.status)

    def __getattr__(self, name):
        outputs = self.__dict__.get("outputs", {})
        if name in outputs:
            return outputs[name]
        raise AttributeError(name)

    def on_grid(self, name: str) -> np.ndarray:
        """Output ``name`` reshaped to the grid (``configs.shape`` plus any trailing axes)."""
        arr = self.outputs[name]
        return arr.reshape(self.configs.shape + arr.shape[1:])

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything as flat NumPy arrays (the content of ``results.npz``)."""
        out = {f"config_{k}": v for k, v in self.configs.columns.items()}
        if self.configs.axes is not None:
            out.update({f"axis_{k}": v for k, v in self.configs.axes.items()})
            out.update({f"coord_{k}": v for k, v in self.configs.coords.items()})
        out.update(self.outputs)
        out.update(steps=self.steps, status=self.status, reason=self.reason.astype(str))
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per configuration: scalar configuration values (array-valued ones by their
        grid index), status, reason, scalar outputs (empty for failed rows) and the batch sizes
        as a space-separated string."""
        cols = self.configs.columns
        rows = []
        for i in range(len(self)):
            row: dict[str, Any] = {"index": i}
            for k, v in cols.items():
                if v.ndim == 1:
                    row[k] = v[i].item()
                elif self.configs.coords is not None:
                    row[f"{k}_index"] = int(self.configs.coords[k][i])
            row["steps"] = int(self.steps[i])
            row["ok"] = bool(self.ok[i])
            row["status"] = int(self.status[i])
            row["reason"] = str(self.reason[i])
            for k, v in self.outputs.items():
                if v.ndim == 1:
                    row[k] = v[i].item() if self.ok[i] else ""
            b = self.outputs["batch_sizes"][i, : self.steps[i]]
            row["batch_sizes"] = " ".join(map(str, b.tolist())) if self.ok[i] else ""
            rows.append(row)
        return rows

    def to_csv(self, path=None) -> str:
        """The table as CSV (written atomically to ``path`` when given); returns the text."""
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
        if path is not None:
            _atomic_write(os.fspath(path), lambda f: f.write(text.encode()))
        return text

    def save(self, path) -> None:
        """All arrays to an ``.npz`` file (atomically); :func:`load_results` reads it back."""
        _atomic_write(os.fspath(path), lambda f: np.savez(f, **self.arrays()))


def load_results(path) -> SweepResult:
    """Read a :class:`SweepResult` back from :meth:`SweepResult.save`'s ``.npz``."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    cols = {k[7:]: v for k, v in data.items() if k.startswith("config_")}
    axes = {k[5:]: v for k, v in data.items() if k.startswith("axis_")} or None
    coords = {k[6:]: v for k, v in data.items() if k.startswith("coord_")} or None
    skip = ("config_", "axis_", "coord_")
    outputs = {k: v for k, v in data.items()
               if not k.startswith(skip) and k not in ("steps", "status", "reason")}
    return SweepResult(Configurations(cols, axes, coords), data["steps"], outputs,
                       data["status"], data["reason"].astype(object))


# ------------------------------------------------------------------------------------------------
# files


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, then ``os.replace``: a reader (or a
    rerun after a crash) sees the old file or the complete new one, never a partial one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fingerprint(problem, builder, cfg: Configurations, settings_key: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings_key, sort_keys=True).encode())
    for k in sorted(cfg.columns):
        h.update(k.encode())
        h.update(np.ascontiguousarray(cfg.columns[k]).tobytes())
    if builder is not None:
        code = getattr(builder, "__code__", None)
        h.update(f"{getattr(builder, '__module__', '')}.{getattr(builder, '__qualname__', '')}"
                 .encode())
        if code is not None:
            h.update(code.co_code)
    if problem is not None:
        leaves, _treedef = jax.tree_util.tree_flatten(problem)
        h.update(type(problem).__name__.encode())
        for leaf in leaves:
            if eqx.is_array(leaf):
                h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def _chunk_name(steps: int, j: int) -> str:
    return f"chunk-s{steps}-{j:05d}.npz"


def _load_chunk(path: str, expected_index: np.ndarray) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None
    if "index" not in data or not np.array_equal(data["index"], expected_index):
        return None
    return data


# ------------------------------------------------------------------------------------------------
# the driver


def sweep(
    problem,
    configs,
    *,
    steps: int | None = None,
    path: str = "auto",
    exact: bool | None = None,
    chunk_size: int | None = None,
    results_dir=None,
    progress: bool | None = None,
    devices=None,
    nodes: int = 8,
    rtol=None,
    atol=None,
    solver=None,
    max_steps: int | None = None,
    callback: Callable[[str, int, int], None] | None = None,
) -> SweepResult:
    """Optimal schedules over a grid or list of configurations: one compiled, vmapped call per
    horizon, sharded over all devices, in chunks that resume from disk.

    Each configuration has ``lr`` and ``samples`` (required), ``min_batch`` (default 1),
    ``max_batch`` (default unbounded, ``inf``), ``steps`` (or the ``steps`` argument) and problem
    parameters (every other column) for the builder. Configurations are grouped by ``steps`` (a
    shape): one trace per distinct value; within a group all chunks have one padded size.

    Args:
        problem: a problem shared by all configurations, or ``builder(**params) -> problem``
            called on each configuration's parameters (inside the trace: use ``jnp`` and keep the
            same function object to avoid recompiling).
        configs: :func:`grid`, :func:`configurations` or a mapping of equal-length columns.
        steps: default number of steps when ``configs`` has no ``steps`` column.
        path, exact, nodes, rtol, atol, solver, max_steps: see :func:`sweep_core`.
        chunk_size: configurations per chunk (default: one chunk per horizon, or 1024 with
            ``results_dir``). Chunk membership does not depend on the device count, so a sweep
            can resume on another machine.
        results_dir: folder for resumable results (created if missing). It must be empty or
            hold the same sweep (same configurations, settings and problem).
        progress: show a tqdm progress bar (default: when there is more than one chunk).
        devices: devices of the mesh (default all of ``jax.devices()``).
        callback: called as ``callback(chunk_name, done, total)`` after each finished chunk.

    Returns:
        A :class:`SweepResult`; also written to ``results_dir`` as ``results.npz`` and
        ``results.csv``.

    Raises:
        ValueError: naming the argument, for missing ``lr``/``samples``/``steps``, bad
            ``chunk_size``, a problem/builder mismatch, or a ``results_dir`` holding another sweep.
    """
    cfg = _as_configurations(configs)
    shared, builder = _split_problem(problem)
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
        cols["steps"] = np.full(n, float(ex.check_steps(steps)))
    cols.setdefault("min_batch", np.ones(n))
    cols.setdefault("max_batch", np.full(n, np.inf))
    cfg = Configurations(cols, cfg.axes, cfg.coords)  # completed columns are what is stored
    step_values = cols["steps"]
    if not np.all((step_values == np.round(step_values)) & (step_values >= 1)):
        raise ValueError("configs: 'steps' must hold integers >= 1")
    params = {k: v for k, v in cols.items() if k not in _RESERVED}
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
    if chunk_size is None and results_dir is not None:
        chunk_size = 1024

    host_status, host_detail = _host_checks(cols, params)
    valid = np.flatnonzero(host_status == 0)
    probe = _probe_problem(shared, builder, params)
    mesh = _mesh(devices)
    ndev = mesh.size
    groups = list(dict.fromkeys(int(k) for k in step_values))  # first-appearance order

    settings_by_steps = {}
    for K in groups:
        settings_by_steps[K] = _settings(probe, steps=K, path=path, exact=exact, nodes=nodes,
                                         rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)
    first = settings_by_steps[groups[0]][0]
    key = {"version": _FORMAT_VERSION, "path": first.path, "exact": first.exact, "nodes": first.nodes,
               "chunk_size": chunk_size, "max_steps": None if max_steps is None else int(max_steps),
               "rtol": None if rtol is None else float(rtol),
               "atol": None if atol is None else float(atol), "solver": type(first.solver).__name__}

    # Chunk layout: per horizon, consecutive configuration indices.
    layout = []
    for K in groups:
        members = np.flatnonzero(step_values == K)
        size = len(members) if chunk_size is None else chunk_size
        for j, start in enumerate(range(0, len(members), size)):
            layout.append((K, _chunk_name(K, j), members[start:start + size], size))

    folder = None
    if results_dir is not None:
        folder = os.fspath(results_dir)
        os.makedirs(folder, exist_ok=True)
        _prepare_folder(folder, _fingerprint(shared, builder, cfg, key), cfg, key)

    finished: dict[str, dict[str, np.ndarray]] = {}
    if folder is not None:
        for _, name, members, _ in layout:
            data = _load_chunk(os.path.join(folder, name), members)
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
        for K, name, members, size in layout:
            if name in finished:
                continue
            data = _run_chunk(shared, builder, cols, params, members, size, valid, ndev, mesh,
                              settings_by_steps[K])
            CHUNK_COUNTS[name if folder is None else os.path.join(folder, name)] += 1
            if folder is not None:
                _atomic_write(os.path.join(folder, name), lambda f, d=data: np.savez(f, **d))
            finished[name] = data
            done += 1
            if bar is not None:
                bar.update(len(members))
            if callback is not None:
                callback(name, done, len(layout))
    finally:
        if bar is not None:
            bar.close()

    result = _assemble(cfg, cols, layout, finished, host_status, host_detail)
    if folder is not None:
        result.save(os.path.join(folder, "results.npz"))
        result.to_csv(os.path.join(folder, "results.csv"))
    return result


def _prepare_folder(folder: str, fingerprint: str, cfg: Configurations, key: dict) -> None:
    manifest_path = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") != fingerprint:
            raise ValueError(
                f"results_dir: {folder!r} holds a different sweep (configurations, settings or "
                "problem changed); use a new folder"
            )
        return
    stray = [x for x in os.listdir(folder) if x.startswith("chunk-")]
    if stray:
        raise ValueError(f"results_dir: {folder!r} holds chunks but no manifest; use a new folder")
    arrays = {f"config_{k}": v for k, v in cfg.columns.items()}
    if cfg.axes is not None:
        arrays.update({f"axis_{k}": v for k, v in cfg.axes.items()})
        arrays.update({f"coord_{k}": v for k, v in cfg.coords.items()})
    _atomic_write(os.path.join(folder, "configs.npz"), lambda f: np.savez(f, **arrays))
    manifest = {"fingerprint": fingerprint, "settings": key, "n": len(cfg)}
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    _atomic_write(manifest_path, lambda f: f.write(text))


def _run_chunk(shared, builder, cols, params, members, size, valid, ndev, mesh, settings_triple):
    """Compute one chunk: pad to one size per horizon (a multiple of the device count), replace
    host-rejected rows by a valid configuration, call the sharded core, keep the real rows."""
    settings, rtol, atol = settings_triple
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
        "lr": cols["lr"][take], "samples": cols["samples"][take], "min_batch": cols["min_batch"][take],
        "max_batch": cols["max_batch"][take], "params": {k: v[take] for k, v in params.items()},
    }
    batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(_AXIS)))
    res = _sharded_core(builder, shared, batch, rtol, atol, settings, mesh)
    for k, v in _module_items(res):
        if v is not None:
            out[k] = np.asarray(v)[:n_real]
    return out


def _module_items(m: eqx.Module):
    return [(f.name, getattr(m, f.name)) for f in dataclasses.fields(m)]


def _assemble(cfg, cols, layout, finished, host_status, host_detail) -> SweepResult:
    n = len(cfg)
    steps = cols["steps"].astype(np.int64)
    kmax = int(steps.max())
    status = host_status.copy()
    solver_result = np.zeros(n, np.int64)
    outputs: dict[str, np.ndarray] = {}
    for _, name, members, _ in layout:
        data = finished[name]
        computed = "status" in data
        for k, v in data.items():
            if k in ("index", "status", "solver_result"):
                continue
            if k not in outputs:
                shape = (n, kmax) if k in _STEP_OUTPUTS else (n,)
                outputs[k] = np.zeros(shape, v.dtype)
            if k in _STEP_OUTPUTS:
                outputs[k][members, : v.shape[1]] = v
            else:
                outputs[k][members] = v
        if computed:
            core = data["status"]
            status[members] = np.where(host_status[members] != 0, host_status[members], core)
            solver_result[members] = data["solver_result"]
    failed = status != SweepStatus.OK
    for v in outputs.values():
        v[failed] = 0  # host-rejected rows were computed on a stand-in configuration
    if not outputs:  # nothing was computed at all
        outputs = {k: np.zeros((n, kmax) if k in _STEP_OUTPUTS else (n,))
                   for k in _STEP_OUTPUTS + _SCALAR_OUTPUTS}
    reason = np.array([_reason(int(s), int(r), str(d))
                       for s, r, d in zip(status, solver_result, host_detail, strict=True)], dtype=object)
    return SweepResult(cfg, steps, outputs, status, reason)


def load_sweep(results_dir) -> SweepResult:
    """The results of a (possibly unfinished) sweep from its folder: ``results.npz`` when the sweep
    finished, else the finished chunks (unfinished configurations get the status
    ``-1``, reason ``"not computed yet"``).

    Raises:
        ValueError: naming ``results_dir`` when it holds no sweep.
    """
    folder = os.fspath(results_dir)
    final = os.path.join(folder, "results.npz")
    if os.path.exists(final):
        return load_results(final)
    cfg_path = os.path.join(folder, "configs.npz")
    if not os.path.exists(cfg_path):
        raise ValueError(f"results_dir: no sweep in {folder!r}")
    with np.load(cfg_path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    cols = {k[7:]: v for k, v in data.items() if k.startswith("config_")}
    axes = {k[5:]: v for k, v in data.items() if k.startswith("axis_")} or None
    coords = {k[6:]: v for k, v in data.items() if k.startswith("coord_")} or None
    cfg = Configurations(cols, axes, coords)
    n = len(cfg)
    host_status, host_detail = _host_checks(
        cols, {k: v for k, v in cols.items() if k not in _RESERVED}
    )
    layout, finished = [], {}
    pending = np.ones(n, bool)
    for name in sorted(os.listdir(folder)):
        if name.startswith("chunk-") and name.endswith(".npz"):
            with np.load(os.path.join(folder, name), allow_pickle=False) as z:
                chunk = {k: z[k] for k in z.files}
            layout.append((0, name, chunk["index"], 0))
            finished[name] = chunk
            pending[chunk["index"]] = False
    result = _assemble(cfg, cols, layout, finished, host_status, host_detail)
    status = np.where(pending, -1, result.status)
    reason = np.where(pending, "not computed yet", result.reason).astype(object)
    return dataclasses.replace(result, status=status, reason=reason)

