"""Status of a swept configuration: the readable :class:`SweepStatus` categories of earlier versions,
each mapped onto a :class:`jaxsched.RESULTS` code (the codes every solve entry reports)."""

from __future__ import annotations

import numpy as np

from .._solution import RESULTS

__all__ = ["RESULT_OF_STATUS", "SweepStatus", "reason", "to_results"]


class SweepStatus:
    """Status categories of a configuration (``SweepResult.status``); 0 means success.

    Each maps onto a :class:`jaxsched.RESULTS` code (``SweepResult.result``): ``INVALID_LR`` and
    ``INVALID_PARAMETER`` to ``invalid_value``, ``INFEASIBLE_BUDGET`` to ``infeasible_budget``,
    ``SOLVER_FAILED`` to the ODE solver's own code (e.g. ``max_steps_reached``),
    ``NONFINITE_SENSITIVITY`` to ``nonfinite_sensitivity``, ``NONFINITE_EXACT`` to
    ``nonfinite_loss``, ``GD_DIVERGES`` to ``gd_diverges`` and ``NO_NOISE_TERM`` to
    ``invalid_value``.
    """

    OK = 0
    INVALID_LR = 1
    INFEASIBLE_BUDGET = 2
    INVALID_PARAMETER = 3
    SOLVER_FAILED = 4
    NONFINITE_SENSITIVITY = 5
    NONFINITE_EXACT = 6
    NO_NOISE_TERM = 7
    GD_DIVERGES = 8


_REASONS = {
    SweepStatus.OK: "",
    SweepStatus.INVALID_LR: "lr: must be finite and > 0",
    SweepStatus.INFEASIBLE_BUDGET: "samples: infeasible budget for steps and the bounds",
    SweepStatus.INVALID_PARAMETER: "problem parameter not finite",
    SweepStatus.SOLVER_FAILED: "ODE solver failed",
    SweepStatus.NONFINITE_SENSITIVITY: "sensitivity phi or base loss not finite",
    SweepStatus.NONFINITE_EXACT: "exact SGD recursion not finite (lr beyond the stability limit?)",
    SweepStatus.NO_NOISE_TERM: "noise term of the optimal schedule <= 0: the gain is undefined",
    SweepStatus.GD_DIVERGES: (
        "lr: gradient descent diverges (lr x largest Hessian eigenvalue >= 2); use a smaller lr"
    ),
}

_TO_RESULTS = {
    SweepStatus.OK: RESULTS.successful,
    SweepStatus.INVALID_LR: RESULTS.invalid_value,
    SweepStatus.INFEASIBLE_BUDGET: RESULTS.infeasible_budget,
    SweepStatus.INVALID_PARAMETER: RESULTS.invalid_value,
    SweepStatus.NONFINITE_SENSITIVITY: RESULTS.nonfinite_sensitivity,
    SweepStatus.NONFINITE_EXACT: RESULTS.nonfinite_loss,
    SweepStatus.NO_NOISE_TERM: RESULTS.invalid_value,
    SweepStatus.GD_DIVERGES: RESULTS.gd_diverges,
}


#: ``RESULTS`` code of each status category, indexed by the category (traced lookups use it).
RESULT_OF_STATUS = np.asarray(
    [int(_TO_RESULTS.get(k, RESULTS.internal_error)._value) for k in range(len(_REASONS))], np.int64
)


def to_results(status: np.ndarray, solver_result: np.ndarray) -> np.ndarray:
    """``RESULTS`` integer codes of status categories (a solver failure keeps the solver's code;
    ``-1``, not computed yet, stays ``-1``)."""
    status = np.asarray(status)
    out = np.full(status.shape, -1, np.int64)
    for code, item in _TO_RESULTS.items():
        out[status == code] = int(item._value)
    failed = status == SweepStatus.SOLVER_FAILED
    out[failed] = np.asarray(solver_result)[failed]
    return out


def reason(status: int, solver_result: int, detail: str = "") -> str:
    """The readable reason of a status (empty for success)."""
    if status == SweepStatus.SOLVER_FAILED:
        messages = RESULTS._index_to_message
        msg = messages[solver_result] if 0 < solver_result < len(messages) else "unknown result"
        return f"ODE solver failed: {msg}"
    base = _REASONS.get(int(status), f"unknown status {status}")
    if status == SweepStatus.INFEASIBLE_BUDGET and not detail:
        detail = "found inside the core: without replacement a batch is at most num_examples"
    return f"{base} ({detail})" if detail else base
