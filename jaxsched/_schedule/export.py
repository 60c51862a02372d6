"""Exports of an optimal batch schedule to the formats training frameworks read (docs/theory.md
§4.3; the formats are described in docs/exports.md).

A framework accepts only a restricted family of schedules: a few stages whose batch sizes divide
into micro-batches on every data-parallel rank (Megatron-LM), stages that change only by integer
factors (OLMo-core), or a linear ramp (MaxText). Each export here is the minimiser of the
first-order objective ``sum_k phi_k / b_k`` over that family, with the sample budget met exactly,
so that its objective next to the unconstrained optimum's says what the format costs. NumPy, run
once on the host (nothing here is jitted).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import numpy as np

from .._control.stages import compress_stages
from .batch_schedule import BatchSchedule

__all__ = ["FORMATS", "BatchSchedule", "ScheduleExport", "export_schedule", "schedule_json"]

#: The export formats, in the spelling of ``jaxsched export --format``.
FORMATS = ("megatron", "olmo-core", "maxtext", "csv", "stages-json")

# Backpointer memory (bytes) allowed to the integer-factor stage programme; its candidate levels
# are thinned until steps x stages x levels x (budget / multiple + 1) fits.
_FACTOR_DP_BYTES = 64_000_000
# Linear-ramp candidates (start, increment, end) evaluated at once times the stages they have.
_RAMP_WORK = 4_000_000


@dataclasses.dataclass(frozen=True)
class ScheduleExport:
    """One export: the artefact for the framework and the schedule it makes the framework run.

    A plain frozen dataclass rather than an equinox module: it holds host-side text and NumPy
    tables, never enters a trace.

    Attributes:
        format: one of :data:`FORMATS`.
        text: the artefact, ready to paste or write to a file (command-line arguments, JSON, YAML
            lines or CSV, by format).
        settings: the format's parameters as a dict (what ``text`` encodes).
        batch_sizes: ``(steps,)`` NumPy int64, the per-step schedule the framework will run.
        objective: ``sum_k phi_k / b_k`` of ``batch_sizes`` (theory §4).
        optimum_objective: the same for the unconstrained optimum of the input.
        predicted_loss: the expansion's ``E F(x_K)`` for ``batch_sizes``, or ``None`` when the input
            has no learning rate or no predicted loss.
        optimum_predicted_loss: the input's predicted loss of the unconstrained optimum, or ``None``.
        constraints: a one-line description of the constraints met.
    """

    format: str
    text: str
    settings: dict
    batch_sizes: np.ndarray
    objective: float
    optimum_objective: float
    predicted_loss: float | None
    optimum_predicted_loss: float | None
    constraints: str

    @property
    def relative_cost(self) -> float:
        """``objective / optimum_objective - 1``: the fraction of the noise term the format adds."""
        return self.objective / self.optimum_objective - 1.0


# ------------------------------------------------------------------------------------------------
# input: the SCHEDULE.json record
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    phi: np.ndarray
    optimum: np.ndarray
    samples: int
    min_batch: int
    max_batch: int | None
    lr: float | None
    predicted: float | None


def _json_int(record: Mapping, key: str, minimum: int, *, optional: bool = False) -> int | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"schedule: {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"schedule: {key!r} must be >= {minimum}, got {value}")
    return value


def _json_float(record: Mapping, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"schedule: {key!r} must be a finite number or null, got {value!r}")
    return float(value)


def _read_spec(schedule: Mapping) -> _Spec:
    if not isinstance(schedule, Mapping):
        raise ValueError(
            f"schedule: expected the SCHEDULE.json object (a mapping), got {type(schedule).__name__}"
        )
    steps = _json_int(schedule, "steps", 1)
    samples = _json_int(schedule, "samples", 1)
    lo = _json_int(schedule, "min_batch", 1, optional=True) or 1
    hi = _json_int(schedule, "max_batch", lo, optional=True)
    phi = schedule.get("phi")
    if not isinstance(phi, list) or len(phi) != steps:
        raise ValueError(f"schedule: 'phi' must be a list of {steps} numbers (one per step)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in phi):
        raise ValueError("schedule: 'phi' must contain only numbers")
    phi = np.asarray(phi, dtype=float)
    if not np.all(np.isfinite(phi)):
        raise ValueError("schedule: 'phi' contains non-finite values")
    optimal = (
        (schedule.get("schedules") or {}).get("optimal")
        if isinstance(schedule.get("schedules"), Mapping)
        else None
    )
    if not isinstance(optimal, Mapping):
        raise ValueError("schedule: missing 'schedules.optimal'")
    b = optimal.get("batch_sizes")
    if not isinstance(b, list) or len(b) != steps:
        raise ValueError(f"schedule: 'schedules.optimal.batch_sizes' must be a list of {steps} integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in b):
        raise ValueError("schedule: 'schedules.optimal.batch_sizes' must contain only integers")
    b = np.asarray(b, dtype=np.int64)
    if np.any(b < lo) or (hi is not None and np.any(b > hi)):
        raise ValueError("schedule: 'schedules.optimal.batch_sizes' lies outside [min_batch, max_batch]")
    if int(b.sum()) != samples:
        raise ValueError(
            f"schedule: 'schedules.optimal.batch_sizes' sums to {int(b.sum())}, not samples = {samples}"
        )
    lr = _json_float(schedule, "lr")
    if lr is not None and lr <= 0:
        raise ValueError(f"schedule: 'lr' must be > 0, got {lr}")
    return _Spec(phi, b, samples, lo, hi, lr, _json_float(optimal, "predicted_loss"))


def schedule_json(
    optimal, *, lr: float, samples: int, min_batch: int = 1, max_batch: int | None = None
) -> dict:
    """The SCHEDULE.json record of an optimal schedule: the keys that ``jaxsched export`` and
    :func:`export_schedule` read, in the layout ``jaxsched optimize`` writes.

    Args:
        optimal: the result of :func:`jaxsched.optimal_schedule` (uses its ``batch_sizes``, ``phi``
            and ``predicted_loss``).
        lr: the learning rate it was computed for.
        samples: its sample budget.
        min_batch, max_batch: the bounds it was computed with.

    Returns:
        A JSON-serialisable dict with ``lr``, ``steps``, ``samples``, ``min_batch``, ``max_batch``,
        ``phi`` and ``schedules.optimal.{batch_sizes, predicted_loss}``.
    """
    b = [int(v) for v in np.asarray(optimal.batch_sizes)]
    predicted = float(np.asarray(optimal.predicted_loss))
    return {
        "lr": float(lr),
        "steps": len(b),
        "samples": int(samples),
        "min_batch": int(min_batch),
        "max_batch": None if max_batch is None else int(max_batch),
        "schedules": {
            "optimal": {"batch_sizes": b, "predicted_loss": predicted if math.isfinite(predicted) else None}
        },
        "phi": [float(v) for v in np.asarray(optimal.phi)],
    }


# ------------------------------------------------------------------------------------------------
# integer-factor stages (OLMo-core)
# ------------------------------------------------------------------------------------------------
def _smooth_numbers(top: int, primes: tuple[int, ...]) -> list[int]:
    out = {1}
    for p in primes:
        for v in sorted(out):
            while v * p <= top:
                v *= p
                out.add(v)
    return sorted(out)


def _factor_levels(c_lo: int, c_top: int, ref_lo: float, ref_hi: float, room: int) -> np.ndarray:
    """Candidate stage levels (in units of the multiple): all integers in the range when they fit,
    else the 3-smooth ones ``2^a 3^b``, else powers of two; the range is ``[c_lo, c_top]`` cut to
    a factor 4 around the unconstrained optimum's ``[ref_lo, ref_hi]``."""
    lo = max(c_lo, int(math.floor(ref_lo / 4)))
    hi = min(c_top, max(lo, int(math.ceil(ref_hi * 4))))
    for primes in ((), (2, 3), (2,)):
        levels = range(lo, hi + 1) if not primes else [v for v in _smooth_numbers(hi, primes) if v >= lo]
        levels = sorted(set(levels) | {lo, hi})  # the ends keep extreme budgets feasible
        if len(levels) <= min(room, 120):
            return np.asarray(levels, dtype=np.int64)
    return np.asarray(levels[: max(room, 2)], dtype=np.int64)


def _factor_stage_dp(phi, M, m, levels, S):
    """Exact minimum of ``sum_k phi_k / (m c_k)`` over schedules of at most ``S`` constant stages
    at the given levels, consecutive levels differing by an integer factor, an increase to level
    ``c`` only where the samples consumed so far are a multiple of ``c`` (OLMo-core applies an
    increase once the data position is aligned to the new batch), and ``sum_k c_k = M``.

    Dynamic programme over the steps with state (stage, level, budget used); backpointers int8.
    Returns ``(value, c per step)`` or ``(inf, None)``.
    """
    K, J, Q = len(phi), len(levels), M + 1
    q = np.arange(Q)
    ratio_ok = (levels[:, None] % levels[None, :] == 0) | (levels[None, :] % levels[:, None] == 0)
    np.fill_diagonal(ratio_ok, False)
    up_from = [np.flatnonzero(ratio_ok[j] & (levels < levels[j])) for j in range(J)]
    down_from = [np.flatnonzero(ratio_ok[j] & (levels > levels[j])) for j in range(J)]
    aligned = q[None, :] % levels[:, None] == 0  # consumed-so-far multiple of the new level
    back = np.empty((K, S, J, Q), dtype=np.int8)  # -1 stay, >= 0 previous level, -2 start
    cur = np.full((S, J, Q), np.inf)
    for k in range(K):
        new = np.full((S, J, Q), np.inf)
        src = np.full((S, J, Q), -1, dtype=np.int8)
        for j in range(J):
            c = int(levels[j])
            if c > M:
                continue
            cost = phi[k] / (m * c)
            if k == 0:
                new[0, j, c] = cost
                src[0, j, c] = -2
                continue
            before = np.full((S, Q), np.inf)
            before[:, c:] = cur[:, j, : Q - c]
            arg = np.full((S, Q), -1, dtype=np.int8)
            for group, need_align in ((up_from[j], True), (down_from[j], False)):
                for jp in group:
                    cand = np.full((S, Q), np.inf)
                    cand[1:, c:] = cur[:-1, jp, : Q - c]
                    if need_align:
                        cand[:, c:] = np.where(aligned[j, : Q - c], cand[:, c:], np.inf)
                    better = cand < before
                    before = np.where(better, cand, before)
                    arg = np.where(better, jp, arg)
            new[:, j, :] = before + cost
            src[:, j, :] = arg
        cur = new
        back[k] = src
    flat = np.argmin(cur[:, :, M])
    s, j = np.unravel_index(flat, (S, J))
    if not np.isfinite(cur[s, j, M]):
        return np.inf, None
    value, c_steps, budget = float(cur[s, j, M]), np.empty(K, dtype=np.int64), M
    for k in range(K - 1, -1, -1):
        c_steps[k] = levels[j]
        came = int(back[k, s, j, budget])
        budget -= int(levels[j])
        if came >= 0:
            s, j = s - 1, came
    return value, c_steps


def _olmo_fit(spec: _Spec, m: int, S: int) -> np.ndarray:
    K, N = spec.phi.size, spec.samples
    M = N // m
    c_lo = -(-spec.min_batch // m)
    c_hi = M if spec.max_batch is None else spec.max_batch // m
    c_top = min(c_hi, M - (K - 1) * c_lo)
    if c_lo > c_top:
        raise ValueError(_infeasible(spec, m, "integer-factor stages"))
    room = max(2, _FACTOR_DP_BYTES // (K * S * (M + 1)))
    levels = _factor_levels(c_lo, c_top, spec.optimum.min() / m, spec.optimum.max() / m, room)
    _, c = _factor_stage_dp(spec.phi, M, m, levels, S)
    if c is None:
        raise ValueError(
            f"stages: no schedule of at most {S} stages with integer-factor changes between batch "
            f"sizes that are multiples of {m} meets the budget of {N} samples in {K} steps exactly"
        )
    return m * c


# ------------------------------------------------------------------------------------------------
# linear ramps (MaxText)
# ------------------------------------------------------------------------------------------------
def ramp_batch_sizes(start: int, increment: int, end: int, rampup_samples: int, steps: int) -> np.ndarray:
    """Per-step global batch sizes of a linear ramp in MaxText's semantics: start at ``start``;
    after each step add its batch to a counter, and once the counter reaches
    ``rampup_samples / n`` (``n = (end - start) / increment`` increments) raise the batch by
    ``increment`` (at most to ``end``) and reset the counter. Stage ``j`` (batch
    ``start + j increment``) therefore lasts ``max(1, ceil(rampup_samples / (n B_j)))`` steps.

    Args:
        start, increment, end: global batch sizes, ``0 < start < end``, ``increment`` dividing
            ``end - start``.
        rampup_samples: MaxText's ``global_rampup_samples``, ``>= 0``.
        steps: number of steps.

    Returns:
        NumPy int64 array of shape ``(steps,)``.

    Raises:
        ValueError: naming the argument that breaks the conditions above.
    """
    if not 0 < start < end:
        raise ValueError(f"start: need 0 < start < end, got start = {start}, end = {end}")
    if increment <= 0 or (end - start) % increment:
        raise ValueError(f"increment: must be > 0 and divide end - start = {end - start}, got {increment}")
    if rampup_samples < 0:
        raise ValueError(f"rampup_samples: must be >= 0, got {rampup_samples}")
    n = (end - start) // increment
    levels = start + increment * np.arange(n, dtype=np.int64)
    lengths = np.maximum(1, -(-rampup_samples // (n * levels)))
    b = np.concatenate([np.repeat(levels, lengths), np.full(steps, end, dtype=np.int64)])
    return b[:steps]


def _ramp_candidates(c_lo, c_top, M, K):
    """(start, increment, end) in units of the multiple, with ``(end - start) / increment``
    increments; start and end on a grid of at most 48 values each when the range is larger."""

    def grid(a, b):
        if b - a + 1 <= 48:
            return np.arange(a, b + 1)
        return np.unique(np.round(np.geomspace(a, b, 48)).astype(np.int64))

    out = []
    for e in grid(c_lo + 1, c_top):
        for s in grid(c_lo, e - 1):
            if s >= e:
                continue
            d = e - s
            for i in range(1, d + 1):
                if d % i == 0:
                    out.append((s, i, e))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def _ramp_eval(cands, R, K, prefix):
    """Totals (units of the multiple) and objectives (``sum phi / c``) of the ramps ``cands`` with
    rampup budgets ``R`` (same units), vectorised; stages padded to the longest ramp."""
    s, i, e = cands.T
    n = (e - s) // i
    jmax = int(n.max())
    j = np.arange(jmax)[None, :]
    valid = j < n[:, None]
    lev = s[:, None] + i[:, None] * j
    lengths = np.where(valid, np.maximum(1, -(-R[:, None] // np.maximum(n[:, None] * lev, 1))), 0)
    ends = np.minimum(np.cumsum(lengths, axis=1), K)
    starts = np.concatenate([np.zeros((len(s), 1), dtype=np.int64), ends[:, :-1]], axis=1)
    ramp_end = ends[:, -1]
    total = np.sum((ends - starts) * lev, axis=1) + (K - ramp_end) * e
    obj = np.sum(np.where(valid, (prefix[ends] - prefix[starts]) / lev, 0.0), axis=1)
    obj = obj + (prefix[K] - prefix[ramp_end]) / e
    return total, obj


def _maxtext_fit(spec: _Spec, m: int) -> tuple[np.ndarray, dict]:
    """Best linear ramp (in units of ``m``) with the exact budget, or the constant schedule."""
    phi, K, N = spec.phi, spec.phi.size, spec.samples
    M = N // m
    prefix = np.concatenate([[0.0], np.cumsum(phi)])
    c_lo = -(-spec.min_batch // m)
    c_hi = M if spec.max_batch is None else spec.max_batch // m
    c_top = min(c_hi, M - (K - 1) * c_lo, max(c_lo + 1, int(math.ceil(2 * spec.optimum.max() / m))))
    best = (np.inf, None)
    if M % K == 0 and c_lo <= M // K <= c_hi:
        c = M // K
        best = (float(prefix[K]) / (m * c), {"start": c, "increment": 0, "end": c, "rampup": 0})
    cands = _ramp_candidates(c_lo, c_top, M, K) if c_top > c_lo else np.zeros((0, 3), np.int64)
    n_stages = (cands[:, 2] - cands[:, 0]) // np.maximum(cands[:, 1], 1)
    order = np.argsort(n_stages, kind="stable")
    chunk_rows = []
    start = 0
    while start < len(order):  # chunks of similar stage counts keep the padding small
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * n_stages[order[stop]] <= _RAMP_WORK:
            stop += 1
        chunk_rows.append(order[start:stop])
        start = stop
    for rows in chunk_rows:
        cand = cands[rows]
        n = (cand[:, 2] - cand[:, 0]) // cand[:, 1]
        # total(R) is non-increasing in R: bisect for the smallest R with total <= M.
        lo_r = np.zeros(len(cand), dtype=np.int64)
        hi_r = n * cand[:, 2] * K + 1
        for _ in range(int(np.ceil(np.log2(hi_r.max() + 1))) + 1):
            mid = (lo_r + hi_r) // 2
            tot, _ = _ramp_eval(cand, mid, K, prefix)
            lo_r, hi_r = np.where(tot <= M, lo_r, mid + 1), np.where(tot <= M, mid, hi_r)
        tot, obj = _ramp_eval(cand, hi_r, K, prefix)
        ok = tot == M
        if ok.any():
            r = int(np.flatnonzero(ok)[np.argmin(obj[ok])])
            if obj[r] / m < best[0]:
                s, i, e = (int(v) for v in cand[r])
                best = (float(obj[r]) / m, {"start": s, "increment": i, "end": e, "rampup": int(hi_r[r])})
    if best[1] is None:
        raise ValueError(_infeasible(spec, m, "linear ramps (or a constant batch)"))
    p = best[1]
    if p["increment"] == 0:
        return np.full(K, m * p["start"], dtype=np.int64), p
    b = ramp_batch_sizes(m * p["start"], m * p["increment"], m * p["end"], m * p["rampup"], K)
    return b, p


def _infeasible(spec: _Spec, m: int, family: str) -> str:
    return (
        f"samples: no schedule among {family} with batch sizes that are multiples of {m} in "
        f"[{spec.min_batch}, {spec.max_batch if spec.max_batch is not None else 'inf'}] meets the "
        f"budget of {spec.samples} samples in {spec.phi.size} steps exactly"
    )


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def _suffixed(value: int) -> str:
    """Megatron's K/M/B/T suffixes (1e3 ... 1e12), used only where the value is an exact multiple."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= scale and value % scale == 0:
            return f"{value // scale}{suffix}"
    return str(value)


def _megatron_text(stages, tokens_per_sample, micro_batch, samples):
    unit = 1 if tokens_per_sample is None else tokens_per_sample
    pairs = " ".join(f"{_suffixed(st['samples_consumed'] * unit)}:{st['batch_size']}" for st in stages)
    args = [
        f'--step-batch-size-schedule "{pairs}"',
        f"--train-samples {samples}",
        f"--micro-batch-size {micro_batch}",
    ]
    if tokens_per_sample is not None:
        args.append(f"--seq-length {tokens_per_sample}")
    return pairs, " ".join(args)


def _csv_text(b: np.ndarray) -> str:
    before = np.concatenate([[0], np.cumsum(b)[:-1]])
    rows = ["step,batch_size,samples_consumed"] + [
        f"{k},{int(v)},{int(c)}" for k, (v, c) in enumerate(zip(b, before, strict=True))
    ]
    return "\n".join(rows) + "\n"


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# entry
# ------------------------------------------------------------------------------------------------
def export_schedule(
    schedule: Mapping,
    *,
    format: str,
    stages: int = 4,
    micro_batch: int = 1,
    data_parallel: int = 1,
    tokens_per_sample: int | None = None,
    duration_unit: str = "tokens",
) -> ScheduleExport:
    """The best schedule a training framework can run, in that framework's format.

    Each format restricts the schedule; the export minimises the first-order objective
    ``sum_k phi_k / b_k`` (docs/theory.md §4.2–4.3) over the restricted family, with the budget
    ``sum_k b_k = samples`` met exactly and every batch a multiple of
    ``micro_batch * data_parallel`` within ``[min_batch, max_batch]`` of the input:

    - ``"megatron"``: at most ``stages`` constant stages (:func:`jaxsched.compress_stages`), as
      Megatron-LM's ``--step-batch-size-schedule "0:B0 T1:B1 ..."`` (thresholds: samples consumed
      when the stage starts, or tokens with ``tokens_per_sample``; K/M/B/T suffixes where exact);
    - ``"olmo-core"``: at most ``stages`` stages, consecutive batch sizes differing by an integer
      factor, an increase only where the samples consumed are a multiple of the new batch; as the
      ``batch_sizes`` (tokens) and ``schedule`` (durations in ``duration_unit``, ``"tokens"`` or
      ``"steps"``) of OLMo-core's ``BatchSizeSchedulerCallback``, with the learning-rate factors
      ``sqrt(B_s / B_0)`` that callback applies to Adam-type optimizers. The stage levels searched
      are all multiples in range when few, else those of the form ``2^a 3^b`` (or ``2^a``), times
      the multiple, within a factor 4 of the optimum's range: exact over those levels;
    - ``"maxtext"``: a linear ramp in MaxText's semantics (:func:`ramp_batch_sizes`) or a constant
      batch, as its ``per_device_batch_size_start/_increment``, ``per_device_batch_size`` and
      ``global_rampup_samples`` settings with ``data_parallel`` devices; the best ramp over the
      ramp parameters (start and end on a grid of at most 48 values each when the range is wider);
    - ``"csv"``, ``"stages-json"``: no restriction beyond the multiple (the input's optimum itself
      when its batches are multiples already, else the integer optimum in units of the multiple),
      as ``step,batch_size,samples_consumed`` rows or a JSON list of stages.

    Args:
        schedule: the SCHEDULE.json record (as ``jaxsched optimize`` writes it, or
            :func:`schedule_json`): ``steps``, ``samples``, ``phi``,
            ``schedules.optimal.batch_sizes``, optionally ``min_batch``, ``max_batch``, ``lr`` and
            ``schedules.optimal.predicted_loss``.
        format: one of :data:`FORMATS`.
        stages: the most stages allowed (``megatron``, ``olmo-core``), ``>= 1``.
        micro_batch: micro-batch size per data-parallel rank, ``>= 1``.
        data_parallel: number of data-parallel ranks (MaxText: devices), ``>= 1``.
        tokens_per_sample: tokens in one sample (sequence length): Megatron thresholds in tokens;
            required for ``olmo-core``, whose batch sizes are in tokens.
        duration_unit: ``"tokens"`` or ``"steps"``, the unit of OLMo-core's durations.

    Returns:
        A :class:`ScheduleExport`.

    Raises:
        ValueError: naming the argument: a malformed ``schedule``; an unknown ``format``; a budget
            that ``micro_batch * data_parallel`` does not divide, or that no schedule of the
            format meets exactly (``samples``/``stages``); bad counts.
    """
    if format not in FORMATS:
        raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {format!r}")
    spec = _read_spec(schedule)
    S = _check_count("stages", stages, 1)
    mb = _check_count("micro_batch", micro_batch, 1)
    dp = _check_count("data_parallel", data_parallel, 1)
    tps = None if tokens_per_sample is None else _check_count("tokens_per_sample", tokens_per_sample, 1)
    if duration_unit not in ("tokens", "steps"):
        raise ValueError(f"duration_unit: must be 'tokens' or 'steps', got {duration_unit!r}")
    if format == "olmo-core" and tps is None:
        raise ValueError("tokens_per_sample: required for olmo-core (its batch sizes are in tokens)")
    m = mb * dp
    K, N = spec.phi.size, spec.samples
    if N % m:
        raise ValueError(
            f"micro_batch: micro_batch x data_parallel = {m} does not divide the budget of {N} "
            f"samples, so no schedule of such batch sizes meets it exactly"
        )
    kw = {"min_batch": spec.min_batch, "max_batch": spec.max_batch}
    if format == "megatron":
        try:
            b = compress_stages(spec.phi, N, stages=S, multiple_of=m, **kw)[0]
        except ValueError as e:
            raise ValueError(f"samples: {str(e).partition(': ')[2]}") from None
        constraints = f"at most {S} stages, batch sizes multiples of {mb} x {dp} = {m}"
    elif format == "olmo-core":
        b = _olmo_fit(spec, m, S)
        constraints = f"at most {S} stages, integer-factor changes, batch sizes multiples of {m}"
    elif format == "maxtext":
        b, ramp = _maxtext_fit(spec, m)
        constraints = f"linear ramp, per-device batch sizes multiples of {mb} on {dp} devices"
    else:
        if np.all(spec.optimum % m == 0):
            b = spec.optimum.copy()
        else:
            b = compress_stages(spec.phi, N, stages=K, multiple_of=m, **kw)[0]
        constraints = f"batch sizes multiples of {m}"
    b = np.asarray(b, dtype=np.int64)
    table = BatchSchedule(b).stages()

    if format == "megatron":
        pairs, text = _megatron_text(table, tps, mb, N)
        settings = {"step_batch_size_schedule": pairs, "train_samples": N, "micro_batch_size": mb}
        if tps is not None:
            settings["seq_length"] = tps
    elif format == "olmo-core":
        unit = duration_unit
        settings = {
            "batch_sizes": [st["batch_size"] * tps for st in table],
            "schedule": [
                {
                    "value": st["samples_consumed"] * tps if unit == "tokens" else st["first_step"],
                    "unit": unit,
                }
                for st in table
            ],
            "lr_factors": [math.sqrt(st["batch_size"] / table[0]["batch_size"]) for st in table],
            "tokens_per_sample": tps,
        }
        text = json.dumps(settings, indent=1) + "\n"
    elif format == "maxtext":
        if ramp["increment"] == 0:
            settings = {"enable_rampup_batch_size": False, "per_device_batch_size": mb * ramp["start"]}
        else:
            settings = {
                "enable_rampup_batch_size": True,
                "per_device_batch_size_start": mb * ramp["start"],
                "per_device_batch_size_increment": mb * ramp["increment"],
                "per_device_batch_size": mb * ramp["end"],
                "global_rampup_samples": m * ramp["rampup"],
            }
        settings["steps"] = K
        text = "".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in settings.items())
        text = f"# MaxText config for {dp} devices (global batch = per-device batch x {dp})\n" + text
    elif format == "csv":
        settings, text = {"steps": K, "samples": N}, _csv_text(b)
    else:
        settings = {"steps": K, "samples": N, "stages": table}
        text = json.dumps(settings, indent=1) + "\n"

    objective = float(np.sum(spec.phi / b))
    optimum = float(np.sum(spec.phi / spec.optimum))
    have_loss = spec.lr is not None and spec.predicted is not None
    predicted = spec.predicted + spec.lr * (objective - optimum) if have_loss else None
    return ScheduleExport(
        format=format,
        text=text,
        settings=settings,
        batch_sizes=b,
        objective=objective,
        optimum_objective=optimum,
        predicted_loss=predicted,
        optimum_predicted_loss=spec.predicted if have_loss else None,
        constraints=constraints,
    )
