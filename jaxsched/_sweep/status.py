"""Status of a swept configuration: the readable :class:`SweepStatus` categories of earlier versions,
each mapped onto a :class:`jaxsched.RESULTS` code (the codes every solve entry reports)."""

from __future__ import annotations

import numpy as np

from .._solution import RESULTS

__all__ = ["KEEPS_NUMBERS", "KEEPS_SOLVER_CODE", "RESULT_OF_STATUS", "SweepStatus", "reason", "to_results"]


class SweepStatus:
    """Status categories of a configuration (``SweepResult.status``); 0 means success.

    Each maps onto a :class:`jaxsched.RESULTS` code (``SweepResult.result``): ``INVALID_LR`` and
    ``INVALID_PARAMETER`` to ``invalid_value``, ``INFEASIBLE_BUDGET`` to ``infeasible_budget``,
    ``SOLVER_FAILED`` to the ODE solver's own code (e.g. ``max_steps_reached``),
    ``NONFINITE_SENSITIVITY`` to ``nonfinite_sensitivity``, ``NONFINITE_EXACT`` to
    ``nonfinite_loss``, ``GD_DIVERGES`` to ``gd_diverges`` and ``NO_NOISE_TERM`` to
    ``invalid_value``.

    Adam / RMSprop sweeps (``optimizer=``, docs/theory.md §9) add ``NONFINITE_MODEL`` (the moment
    model's loss, its optimum or its linearisation not finite: ``nonfinite_loss``),
    ``OPTIMIZER_FAILED`` (L-BFGS through the model failed: its own code is kept, as for
    ``SOLVER_FAILED``), ``MAX_ITERATIONS`` (L-BFGS stopped at ``max_iter``:
    ``max_iterations_reached``; the only status that keeps its numbers, see
    :data:`KEEPS_NUMBERS`) and ``NO_EXCESS_LOSS`` (the optimum's predicted loss is not above
    ``loss_floor``, so the gain is undefined: ``invalid_value``) and ``INVALID_OPTIMIZER`` (a
    swept optimizer field, e.g. ``b2``, refused by the optimizer's constructor: ``invalid_value``).
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
    NONFINITE_MODEL = 9
    OPTIMIZER_FAILED = 10
    MAX_ITERATIONS = 11
    NO_EXCESS_LOSS = 12
    INVALID_OPTIMIZER = 13


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
    SweepStatus.NONFINITE_MODEL: "moment model's predicted loss or its optimum not finite",
    SweepStatus.OPTIMIZER_FAILED: "L-BFGS through the moment model failed",
    SweepStatus.MAX_ITERATIONS: (
        "L-BFGS through the moment model stopped at max_iter before its tolerance; raise max_iter"
    ),
    SweepStatus.NO_EXCESS_LOSS: (
        "predicted loss of the optimum <= loss_floor: the excess-loss gain is undefined"
    ),
    SweepStatus.INVALID_OPTIMIZER: "optimizer: a swept field is outside its range",
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
    SweepStatus.NONFINITE_MODEL: RESULTS.nonfinite_loss,
    SweepStatus.MAX_ITERATIONS: RESULTS.max_iterations_reached,
    SweepStatus.NO_EXCESS_LOSS: RESULTS.invalid_value,
    SweepStatus.INVALID_OPTIMIZER: RESULTS.invalid_value,
}

#: Statuses whose configurations keep their numbers. ``MAX_ITERATIONS``: the schedule is L-BFGS's
#: last iterate, made integer with the exact budget, as :func:`jaxsched.adaptive_optimal_schedule`
#: returns it with ``result = max_iterations_reached`` (valid, not at the tolerance). Every other
#: non-zero status has zeros.
KEEPS_NUMBERS = (SweepStatus.OK, SweepStatus.MAX_ITERATIONS)

#: Statuses whose ``RESULTS`` code is the failing solver's own (kept in ``solver_result``), with
#: the prefix of their reason.
KEEPS_SOLVER_CODE = {SweepStatus.SOLVER_FAILED: "ODE solver failed: ",
                     SweepStatus.OPTIMIZER_FAILED: "L-BFGS through the moment model failed: "}


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
    failed = np.isin(status, list(KEEPS_SOLVER_CODE))
    out[failed] = np.asarray(solver_result)[failed]
    return out


def reason(status: int, solver_result: int, detail: str = "") -> str:
    """The readable reason of a status (empty for success)."""
    if status in KEEPS_SOLVER_CODE:
        messages = RESULTS._index_to_message
        msg = messages[solver_result] if 0 < solver_result < len(messages) else "unknown result"
        return f"{KEEPS_SOLVER_CODE[status]}{msg}"
    base = _REASONS.get(int(status), f"unknown status {status}")
    if status == SweepStatus.INFEASIBLE_BUDGET and not detail:
        detail = "found inside the core: without replacement a batch is at most num_examples"
    return f"{base} ({detail})" if detail else base
