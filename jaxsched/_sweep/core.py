"""The traced per-configuration work of a sweep and :func:`sweep_core`, the pure function that runs
it vmapped and sharded over many configurations (theory 4 for the schedule, 5 for exact losses).

- **One compiled call per horizon.** ``steps`` is a shape (phi has ``steps`` entries), so the
  configurations are grouped by ``steps`` and each group is one trace; everything else (``lr``,
  budget, bounds, problem parameters) is an array leaf and never recompiles.
- **Sharding.** The configuration axis is split over a 1-D ``jax.sharding.Mesh`` of all devices
  with ``jax.shard_map``: each device runs the core on its own slice (its ODE loops stop
  independently). The same code runs on one CPU, several GPUs or a TPU slice.
- **Failures are results.** Infeasible budgets, bad learning rates, learning rates where gradient
  descent diverges, non-finite parameters, ODE solver failures (diffrax with ``throw=False``, the
  result code kept), non-finite sensitivities or exact losses are reported per configuration as a
  :class:`SweepStatus` (and a :class:`jaxsched.RESULTS` code); their numbers are 0 (never NaN) and
  the other configurations are untouched.
- **Two paths to phi.** ``"eigen"`` for quadratic problems, in the eigenbasis of the Hessian
  (:func:`jaxsched.eigen_first_order_parts`: ``O(d)`` per time point for Gaussian features, exact
  sums of exponentials or quadrature for a finite data set); ``"dense"``, the diffrax adjoint
  system of theory 4 for any problem (``O(d^3)`` per right-hand side).
- **No batched factorisations on CPU.** When a builder makes a problem per configuration, its
  eigendecompositions and least-squares solves are batched over configurations. jaxlib's CPU
  kernels for batched LAPACK calls split the batch over XLA's intra-op thread pool and block the
  calling pool thread until the pieces finish; two such calls that XLA runs concurrently (the
  eigendecomposition and the least-squares solve of one problem are independent) can occupy every
  pool thread and wait on each other forever (a 2-core machine hangs at 0% CPU). On CPU the
  configurations of a builder are therefore mapped sequentially (``jax.lax.map``: each
  factorisation is unbatched); other backends and fixed problems are vmapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from .._control import optimal as ctl
from .._expansion import _common as cm, adjoint as adj, eigen as eig
from .._misc import check_steps
from .._optimizer import SGD
from .._problem.base import AbstractProblem
from .._problem.exact import exact_expected_loss, exact_gd_loss
from .results import SweepOutputs
from .status import RESULT_OF_STATUS, SweepStatus

__all__ = ["sweep_core"]

AXIS = "config"


class Settings(NamedTuple):
    """Static settings of a sweep core: changing one recompiles."""

    steps: int
    path: str
    exact: bool
    nodes: int
    max_steps: int
    solver: Any
    batch: int = 1  # configurations per device (bounds the eigen path's memory)


# ------------------------------------------------------------------------------------------------
# The calls into the expansion layer (one place, so that they can be rewired as one).


def _first_order(problem, lr, steps: int, s: Settings, rtol, atol):
    """``(parts, solver_result, lam_max)`` of one configuration: the first-order parts (theory 4),
    the ODE solver's result code (0 on the eigen path) and the largest Hessian eigenvalue at ``x0``
    (gradient descent diverges where ``lr * lam_max >= 2``, the rule of ``jaxsched optimize``)."""
    units = cm.step_units(SGD(lr), steps, problem.x0.dtype)
    if s.path == "eigen":
        parts = eig.eigen_parts(problem, units, steps, s.nodes, s.batch)
        lam_max = jnp.max(problem.eigen_form().lam)  # the same eigh: XLA computes it once
        return parts, jnp.asarray(0), lam_max
    parts = adj.first_order_solves(problem, units, rtol, atol, s.solver, steps, s.max_steps,
                                   throw=False)
    hess = problem.hessian(problem.x0)
    lam_max = jnp.linalg.eigvalsh(0.5 * (hess + hess.T))[-1]
    return parts, parts.result._value, lam_max


def _exact_losses(problem, b, constant, lr, steps, path):
    """Exact expected losses (theory 5.2 / 5.3) of the schedule ``b``, of ``constant`` and of plain
    gradient descent."""
    gaussian_features = problem.is_quadratic and problem.is_online
    if gaussian_features and path == "eigen":
        # docs/theory.md §5.2 is rotation invariant, so the eigenbasis recursion is exact: O(K d).
        e = eig._eigen_form(problem)
        losses = [eig._diagonal_exact(e, 1.0 / x, lr) for x in (b, constant)]
        gd = eig._diagonal_exact(e, jnp.zeros_like(constant), lr)
    else:
        losses = [exact_expected_loss(problem, x, lr=lr, throw=False) for x in (b, constant)]
        gd = exact_gd_loss(problem, lr=lr, steps=steps)
    return losses[0], losses[1], gd


def _batch_cap(problem, hi):
    """``hi`` capped at the number of examples when the problem samples without replacement."""
    cap = problem.batch_cap()
    return hi if cap is None else jnp.minimum(hi, cap)


# ------------------------------------------------------------------------------------------------
# one configuration (traced)


def _first_failure(*pairs):
    """The code of the first ``(failed, code)`` pair that failed, else ``SweepStatus.OK``."""
    status = jnp.asarray(SweepStatus.OK)
    for failed, code in reversed(pairs):
        status = jnp.where(failed, code, status)
    return status


def checked_inputs(problem, cfg, steps: int, dtype):
    """``(lr, samples, lo, hi, lr_ok, budget_ok)`` of one configuration (traced): the budget and
    the bounds (``max_batch = inf`` is ``samples``, capped at the problem's batch cap) with bad
    values replaced by harmless ones, and whether the learning rate and the budget were valid."""
    lr = jnp.asarray(cfg["lr"], dtype)
    samples = jnp.asarray(cfg["samples"], dtype)
    lo = jnp.asarray(cfg["min_batch"], dtype)
    hi = jnp.asarray(cfg["max_batch"], dtype)
    hi = jnp.where(jnp.isinf(hi), samples, hi)  # unbounded: b_k <= samples is implied
    hi = _batch_cap(problem, hi)
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
    return lr, samples, lo, hi, lr_ok, budget_ok


def _one_config(builder, shared, cfg, rtol, atol, s: Settings) -> SweepOutputs:
    problem = shared if builder is None else builder(**cfg["params"])
    dtype = problem.x0.dtype
    steps = s.steps
    lr, samples, lo, hi, lr_ok, budget_ok = checked_inputs(problem, cfg, steps, dtype)

    parts, result, lam_max = _first_order(problem, lr, steps, s, rtol, atol)
    gd_ok = lr * lam_max < 2.0
    solver_ok = result == diffrax.RESULTS.successful._value
    finite = (
        jnp.all(jnp.isfinite(parts.phi)) & jnp.isfinite(parts.base_loss)
        & jnp.isfinite(parts.correction)
    )
    phi_ok = solver_ok & finite
    parts = eqx.tree_at(
        lambda q: (q.phi, q.base_loss, q.correction), parts,
        (jnp.where(phi_ok, parts.phi, 1.0), jnp.where(phi_ok, parts.base_loss, 0.0),
         jnp.where(phi_ok, parts.correction, 0.0)))
    # Same allocation as optimal_schedule(method="closed_form"): relaxed and exact integer optima.
    # It is piecewise constant in phi (zero gradient); stopping the gradient keeps the integer
    # loops out of reverse mode, so derivatives of the losses hold the schedule fixed (for the
    # relaxed optimum that is the envelope theorem).
    budget = ctl._Budget(samples=samples, lo=lo, hi=hi, floor=jnp.full(steps, lo))
    beta, b = ctl._first_order_allocation(problem, jax.lax.stop_gradient(parts), budget)
    res = ctl._finish(problem, parts, budget, beta, b, 0, "closed_form")
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
        (~gd_ok, SweepStatus.GD_DIVERGES),
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
        result=jnp.where(status == SweepStatus.SOLVER_FAILED, result,
                         jnp.asarray(RESULT_OF_STATUS)[status]),
        **{k: clean(v) for k, v in exact.items()},
    )


@eqx.filter_jit
def _sharded_core(builder, shared, batch, rtol, atol, settings: Settings, mesh: Mesh):
    dynamic, static = eqx.partition(shared, eqx.is_array)
    # See the module docstring: batched factorisations on CPU can deadlock XLA's thread pool.
    sequential = builder is not None and mesh.devices.flat[0].platform == "cpu"

    def local(dynamic, batch, rtol, atol):
        problem = eqx.combine(dynamic, static)
        s = settings._replace(batch=1 if sequential else batch["lr"].shape[0])

        def one(c):
            return _one_config(builder, problem, c, rtol, atol, s)

        return jax.lax.map(one, batch) if sequential else jax.vmap(one)(batch)

    spec = PartitionSpec(AXIS)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), spec, PartitionSpec(), PartitionSpec()),
        out_specs=spec,
        # Each device runs its own while loops; no replication checks across them are needed.
        check_vma=False,
    )
    return run(dynamic, batch, rtol, atol)


def mesh_of(devices) -> Mesh:
    devs = jax.devices() if devices is None else list(devices)
    if not devs:
        raise ValueError("devices: need at least one device")
    return Mesh(np.asarray(devs), (AXIS,))


def _resolve_path(problem, path: str) -> str:
    if path not in ("auto", "eigen", "dense"):
        raise ValueError(f"path: must be 'auto', 'eigen' or 'dense', got {path!r}")
    supported = eig._supports_eigen(problem)
    if path == "eigen" and not supported:
        raise ValueError(
            "path: 'eigen' needs a quadratic problem (DiagonalGaussianRegression, "
            f"GaussianLinearRegression or LinearRegressionData), got {type(problem).__name__}"
        )
    if path == "auto":
        return "eigen" if supported else "dense"
    return path


def resolve_sensitivity(sensitivity, path: str, nodes: int) -> tuple[str, int]:
    """``sensitivity=`` (as in :func:`jaxsched.optimal_schedule`) as the sweep's ``(path, nodes)``:
    ``js.Eigenbasis(nodes)`` / ``"eigen"``, ``js.DenseAdjoint()`` / ``"dense"``, ``"auto"``; ``None``
    keeps ``path``. The matrix-free method draws its subsample on the host, so it cannot run inside
    the vmapped sweep core and is refused."""
    if sensitivity is None:
        return path, nodes
    if isinstance(sensitivity, str):
        if sensitivity not in ("auto", "eigen", "dense"):
            raise ValueError(f"sensitivity: must be 'auto', 'eigen', 'dense', js.Eigenbasis() or "
                             f"js.DenseAdjoint() in a sweep, got {sensitivity!r}")
        return sensitivity, nodes
    if isinstance(sensitivity, eig.Eigenbasis):
        return "eigen", sensitivity.nodes
    if isinstance(sensitivity, adj.DenseAdjoint):
        return "dense", nodes
    raise ValueError(
        "sensitivity: a sweep runs js.Eigenbasis() or js.DenseAdjoint() inside one vmapped call; "
        f"{type(sensitivity).__name__} computes on the host (use js.optimal_schedule per setting)")


def probe_problem(problem, builder, params: Mapping[str, np.ndarray]):
    """The problem of the first configuration (abstractly, no computation), to learn its type."""
    if builder is None:
        return problem
    first = {k: jax.ShapeDtypeStruct(jnp.shape(v)[1:], jnp.result_type(v))
             for k, v in params.items()}
    try:
        return jax.eval_shape(lambda p: builder(**p), first)
    except TypeError as e:
        raise ValueError(f"problem: the builder does not accept the parameters ({e})") from None


def split_problem(problem):
    if isinstance(problem, AbstractProblem):
        return problem, None
    if callable(problem):
        return None, problem
    raise ValueError(
        "problem: expected a jaxsched problem or a callable building one from the configuration "
        f"parameters, got {type(problem).__name__}"
    )


def settings_for(probe, *, steps, path, exact, nodes, rtol, atol, solver, max_steps):
    steps = check_steps(steps)
    path = _resolve_path(probe, path)
    quadratic = bool(probe.is_quadratic)
    if exact is None:
        exact = quadratic
    if exact and not quadratic:
        raise ValueError(
            f"exact: exact losses need a quadratic problem, got {type(probe).__name__}"
        )
    if max_steps is None:
        max_steps = cm.max_solver_steps(steps)
    elif isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps: must be a Python int >= 1, got {max_steps!r}")
    dtype = probe.x0.dtype
    rtol, atol = cm.tolerances(dtype, rtol, atol)
    settings = Settings(steps, path, bool(exact), eig._check_nodes(nodes), int(max_steps),
                         cm.default_solver(solver))
    return settings, rtol, atol



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
    sensitivity=None,
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
        sensitivity: ``js.Eigenbasis(nodes=)``, ``js.DenseAdjoint()`` or ``"auto"``/``"eigen"``/
            ``"dense"``, as in :func:`jaxsched.optimal_schedule` (overrides ``path`` and ``nodes``).
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
    shared, builder = split_problem(problem)
    params = {} if params is None else dict(params)
    if shared is not None and params:
        raise ValueError(
            f"params: {sorted(params)} need a problem builder (a callable), got a fixed problem"
        )
    probe = probe_problem(shared, builder, params)
    path, nodes = resolve_sensitivity(sensitivity, path, nodes)
    settings, rtol, atol = settings_for(probe, steps=steps, path=path, exact=exact, nodes=nodes,
                                     rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)
    lengths = {jnp.shape(v)[0] for v in params.values()}
    scalars = [jnp.asarray(x) for x in (lr, samples, min_batch, max_batch)]
    lengths |= {x.shape[0] for x in scalars if x.ndim == 1}
    if len(lengths) != 1:
        raise ValueError(f"lr: configuration arrays must share one length, got {sorted(lengths)}")
    n = lengths.pop()
    dtype = probe.x0.dtype
    lr_, samples_, lo_, hi_ = (jnp.broadcast_to(x.astype(dtype), (n,)) for x in scalars)
    mesh = mesh_of(devices)
    if n % mesh.size:
        raise ValueError(f"lr: {n} configurations is not a multiple of {mesh.size} devices")
    batch = {"lr": lr_, "samples": samples_, "min_batch": lo_, "max_batch": hi_, "params": params}
    return _sharded_core(builder, shared, batch, rtol, atol, settings, mesh)
