"""The traced per-configuration work of an Adam / RMSprop sweep (docs/theory.md §9).

There is no sensitivity ``phi`` for an adaptive optimizer (§9.1): each configuration's schedule is
found as :func:`jaxsched.adaptive_optimal_schedule` finds it, by L-BFGS through the discrete moment
model of §9.2 (full covariance) over a block parametrisation, then the exact integer optimum of
the model linearised in ``1/b`` at the real optimum. The same traced code
(:func:`jaxsched._control.adaptive._block_optimum`) runs here vmapped over the configurations of
one ``steps`` group (one compile per group) and sharded like the SGD core (:mod:`.core`).

Per configuration the swept ``lr`` replaces the optimizer's learning rate, and columns named after
the optimizer's other scalar fields (``b1``, ``b2``, ``eps`` for :class:`jaxsched.Adam`; ``decay``,
``eps`` for :class:`jaxsched.RMSprop`) replace those fields; everything else comes from the
optimizer passed in.

The parametrisation is chosen per ``steps`` group (a static choice, one trace): the softmax one of
``adaptive_optimal_schedule(max_batch=None)`` when no configuration of the group has a finite
``max_batch`` and the problem has no batch cap, else the sigmoid one with each configuration's
bound (an unbounded configuration of a bounded group then gets ``max_batch = samples``, which
cannot bind: the same optimum, reached along another path of L-BFGS).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from .._control import adaptive as ad, allocation as alloc
from .._expansion.adaptive import _model_core
from .._solution import RESULTS
from . import core
from .results import SweepOutputs
from .status import KEEPS_NUMBERS, KEEPS_SOLVER_CODE, RESULT_OF_STATUS, SweepStatus

__all__ = ["AdaptiveSettings", "optimizer_columns", "sharded_adaptive_core"]

#: The moment model a sweep uses (docs/theory.md §9.2): the tested reference.
MODEL = "discrete"
COVARIANCE = "full"


class AdaptiveSettings(NamedTuple):
    """Static settings of the adaptive core: changing one recompiles."""

    steps: int
    length: int  # block length (steps // blocks)
    bounded: bool  # sigmoid parametrisation with per-configuration max_batch (else softmax)
    max_iter: int
    gtol: float


def optimizer_columns(optimizer) -> tuple[str, ...]:
    """Names of the optimizer's scalar array fields other than ``lr``: the columns a sweep may
    vary (``b1``, ``b2``, ``eps`` for Adam; ``decay``, ``eps`` for RMSprop)."""
    names = []
    for f in dataclasses.fields(optimizer):
        value = getattr(optimizer, f.name)
        if f.name != "lr" and eqx.is_array(value) and value.ndim == 0:
            names.append(f.name)
    return tuple(names)


def check_optimizer_columns(optimizer, cols, names, status, detail) -> None:
    """Host checks of the optimizer's columns, in place: a value the optimizer's own constructor
    refuses (``b2`` outside ``(0, 1)``, a negative ``eps``, ...) gives its configurations
    ``INVALID_OPTIMIZER`` with the constructor's message. Each distinct value is checked once, with
    the optimizer's other fields as passed in."""
    fields = {f.name: getattr(optimizer, f.name) for f in dataclasses.fields(optimizer)}
    for name in names:
        column = cols[name]
        for value in np.unique(column):
            try:
                type(optimizer)(**{**fields, name: float(value)})
            except ValueError as e:
                bad = (column == value) | (np.isnan(value) & np.isnan(column))
                bad &= status == 0
                status[bad] = SweepStatus.INVALID_OPTIMIZER
                detail[bad] = str(e)


class _NoTicks(eqx.Module):
    """The live side of a progress meter that never ticks: no host callback per L-BFGS iteration
    inside the vmapped, sharded loop (the sweep's own bar counts chunks)."""

    def callback(self, **kwargs) -> None:
        del kwargs


def _with_columns(opt, lr, values: dict):
    """The optimizer with ``lr`` and the swept fields replaced (array leaves: no recompile)."""
    names = ("lr", *values)
    new = (lr, *(jnp.asarray(v, lr.dtype) for v in values.values()))
    return eqx.tree_at(lambda o: tuple(getattr(o, n) for n in names), opt, new)


def _one_adaptive(builder, shared, opt, cfg, s: AdaptiveSettings) -> SweepOutputs:
    problem = shared if builder is None else builder(**cfg["params"])
    dtype = problem.x0.dtype
    steps = s.steps
    lr, samples, lo, hi, lr_ok, budget_ok = core.checked_inputs(problem, cfg, steps, dtype)
    given = {k: jnp.asarray(v, dtype) for k, v in cfg["optimizer"].items()}
    opt_ok = jnp.all(jnp.isfinite(jnp.stack([lr, *given.values()])))
    base = opt.astype(dtype)
    # A bad field (caught on the host, repeated here) is replaced by the optimizer's own value so
    # that the model and L-BFGS run on something sane; the status says what happened.
    safe = {k: jnp.where(jnp.isfinite(v), v, getattr(base, k)) for k, v in given.items()}
    opt = _with_columns(base, lr, safe)

    def loss(b):
        return _model_core(problem, b, opt, MODEL, COVARIANCE, None, None, None, False)

    beta, phi_seen, iterations, lb = ad._block_optimum(
        loss, steps, s.length, samples, lo, hi if s.bounded else None, dtype, s.max_iter,
        jnp.asarray(s.gtol, dtype), _NoTicks())
    seen_ok = jnp.all(jnp.isfinite(phi_seen)) & jnp.all(jnp.isfinite(beta))
    weights = jnp.where(seen_ok, jnp.maximum(phi_seen, 0.0), jnp.ones_like(phi_seen))
    # The integer step of adaptive_optimal_schedule; `hi` is `samples` for an unbounded
    # configuration, which no batch can exceed, so the optimum is the same as with no bound.
    b = alloc.integer_allocation(weights, samples, min_batch=lo, max_batch=hi)
    final = loss(b.astype(dtype))
    relaxed = loss(beta)
    constant = loss(jnp.full(steps, samples / steps, dtype))
    floor = jnp.asarray(cfg["loss_floor"], dtype)
    excess = final.predicted_loss - floor
    gain = (constant.predicted_loss - floor) / jnp.where(excess > 0, excess, 1.0)
    numbers = jnp.stack([final.predicted_loss, relaxed.predicted_loss, constant.predicted_loss,
                         final.noise_term, constant.noise_term, final.base_loss, floor])
    finite = seen_ok & jnp.all(jnp.isfinite(numbers))
    capped = lb == RESULTS.max_iterations_reached
    failed = (lb != RESULTS.successful) & ~capped

    status = core._first_failure(
        (~lr_ok, SweepStatus.INVALID_LR),
        (~budget_ok, SweepStatus.INFEASIBLE_BUDGET),
        (~opt_ok, SweepStatus.INVALID_OPTIMIZER),
        (~finite, SweepStatus.NONFINITE_MODEL),
        (failed, SweepStatus.OPTIMIZER_FAILED),
        (~(excess > 0), SweepStatus.NO_EXCESS_LOSS),
        (capped, SweepStatus.MAX_ITERATIONS),
    )
    good = jnp.isin(status, jnp.asarray(KEEPS_NUMBERS))

    def clean(x):
        return jnp.where(good, x, jnp.zeros_like(x))

    code = jnp.asarray(lb._value)
    keeps = jnp.isin(status, jnp.asarray(list(KEEPS_SOLVER_CODE)))
    return SweepOutputs(
        batch_sizes=clean(b),
        beta=clean(beta),
        predicted_loss=clean(final.predicted_loss),
        constant_loss=clean(constant.predicted_loss),
        base_loss=clean(final.base_loss),
        gain=clean(gain),
        status=status,
        solver_result=code,
        result=jnp.where(keeps, code, jnp.asarray(RESULT_OF_STATUS)[status]),
        relaxed_loss=clean(relaxed.predicted_loss),
        noise_term=clean(final.noise_term),
        constant_noise_term=clean(constant.noise_term),
        iterations=clean(jnp.asarray(iterations)),
    )


@eqx.filter_jit
def sharded_adaptive_core(builder, shared, optimizer, batch, settings: AdaptiveSettings,
                          mesh: Mesh) -> SweepOutputs:
    """The adaptive core over the configurations of ``batch``, sharded over ``mesh`` (sequential
    per device when a builder runs on CPU, for the reason in :mod:`.core`)."""
    dynamic, static = eqx.partition((shared, optimizer), eqx.is_array)
    sequential = builder is not None and mesh.devices.flat[0].platform == "cpu"

    def local(dynamic, batch):
        problem, opt = eqx.combine(dynamic, static)

        def one(c):
            return _one_adaptive(builder, problem, opt, c, settings)

        return jax.lax.map(one, batch) if sequential else jax.vmap(one)(batch)

    spec = PartitionSpec(core.AXIS)
    run = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec,
                        check_vma=False)
    return run(dynamic, batch)
