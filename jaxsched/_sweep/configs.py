"""Configurations of a sweep: :func:`grid` (a Cartesian product), :func:`configurations` (a list)
and the host-side checks of concrete values (budgets, learning rates, finite parameters) that give a
configuration its status before anything is traced."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from .status import SweepStatus

__all__ = ["Configurations", "configurations", "grid"]

#: Column names the sweep itself uses; every other column is a problem parameter.
RESERVED = ("lr", "samples", "min_batch", "max_batch", "steps")


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


def as_configurations(configs) -> Configurations:
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


def host_checks(cols: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray]):
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




def problem_params(cols: Mapping[str, np.ndarray], also_reserved=()) -> dict[str, np.ndarray]:
    """The problem-parameter columns (every column the sweep does not reserve, nor
    ``also_reserved``: the optimizer's columns of an Adam / RMSprop sweep)."""
    return {k: v for k, v in cols.items() if k not in RESERVED and k not in also_reserved}
