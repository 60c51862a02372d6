"""Compression of a schedule to a few constant stages with an exact integer budget and batch
multiples (NumPy, not jitted): exact enumeration / dynamic programme / heuristic."""

from __future__ import annotations

import itertools
import math

import numpy as np

from .._types import ArrayLike, Float
from .allocation import (
    integer_optimum,
)

# --------------------------------------------------------------------------------------------
# export: compression to a few constant stages (NumPy)
# --------------------------------------------------------------------------------------------
# Up to this many candidate partitions, all are enumerated in order of a lower bound (exact);
# above it, stage boundaries come from the dynamic programme plus a local search.
_EXHAUSTIVE_PARTITIONS = 2000
# Branch-and-bound nodes per partition before giving up on proving optimality of the allocation.
_NODE_LIMIT = 20000
# Work (steps x states x budget) of the exact stage dynamic programme, run when within this
# (memory is one byte per unit); the heuristic's local version gets its own allowance.
_FULL_DP_WORK = 10_000_000
_LEVEL_DP_WORK = 40_000_000


def _py_int(name: str, value, minimum: int) -> int:
    v = np.asarray(value)
    if v.ndim != 0 or not np.isfinite(float(v)) or float(v) != round(float(v)):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    v = round(float(v))
    if v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    return v


class _StageAllocator:
    """Exact integer allocation for fixed stage boundaries: minimise
    ``sum_s Phi_s / (m c_s)`` s.t. ``sum_s L_s c_s = M``, ``c_lo <= c_s <= c_hi`` integers
    (batch ``m c_s`` on the ``L_s`` steps of stage ``s``). Depth-first branch and bound over the
    stages with a closed-form lower bound (the square-root rule for the remaining stages, only the
    lower bound active) and a gcd test on the remaining budget; the last two stages are solved
    in one vectorised pass.
    """

    def __init__(self, phi, M, c_lo, c_hi, m):
        self.prefix = np.concatenate([[0.0], np.cumsum(phi)])
        self.K, self.M, self.c_lo, self.c_hi, self.m = len(phi), M, c_lo, c_hi, m
        self.cache: dict[tuple, tuple[float, np.ndarray | None]] = {}

    def stages(self, cuts):
        edges = np.array([0, *cuts, self.K])
        return np.diff(self.prefix[edges]), np.diff(edges)

    def lower_bound(self, Phi, L):
        """Lower bound of the objective over all allocations for these stages."""
        return self._suffix_terms(Phi, L)[0](0, np.asarray(float(self.M)))

    def _suffix_terms(self, Phi, L):
        pos = Phi > 0
        root = np.where(pos, np.sqrt(np.where(pos, Phi, 0.0) * L), 0.0)
        a = np.concatenate([np.cumsum(root[::-1])[::-1], [0.0]])
        l_np = np.concatenate([np.cumsum(np.where(pos, 0, L)[::-1])[::-1], [0]])
        neg = np.concatenate([np.cumsum(np.where(pos, 0.0, Phi)[::-1])[::-1], [0.0]])
        m, c_lo = self.m, self.c_lo

        def bound(j, budget):
            free = budget - c_lo * l_np[j]
            with np.errstate(divide="ignore", invalid="ignore"):
                pos_part = np.where(free > 0, a[j] ** 2 / (m * free), np.inf)
            pos_part = np.where(a[j] > 0, pos_part, 0.0)
            return pos_part + neg[j] / (m * c_lo)

        return bound, a

    def evaluate(self, cuts, bound=np.inf):
        """(objective, batch sizes per step) of the best allocation, or (inf, None)."""
        key = tuple(int(c) for c in cuts)
        if key in self.cache:
            return self.cache[key]
        Phi, L = self.stages(key)
        c, val = self._branch_and_bound(Phi, L, bound)
        out = (np.inf, None) if c is None else (val, np.repeat(self.m * c, L))
        if c is not None or bound == np.inf:
            self.cache[key] = out
        return out

    def _branch_and_bound(self, Phi, L, bound):
        S, M, c_lo, c_hi, m = len(L), self.M, self.c_lo, self.c_hi, self.m
        lower, _ = self._suffix_terms(Phi, L)
        suffix_l = np.concatenate([np.cumsum(L[::-1])[::-1], [0]])
        suffix_gcd = [0] * (S + 1)
        for j in range(S - 1, -1, -1):
            suffix_gcd[j] = math.gcd(int(L[j]), suffix_gcd[j + 1])
        best = {"val": bound, "c": None, "nodes": 0}
        path: list[int] = []

        def better(val):
            return val < best["val"] - 1e-13 * abs(best["val"]) if np.isfinite(best["val"]) else True

        def rec(j, budget, acc):
            best["nodes"] += 1
            if best["nodes"] > _NODE_LIMIT:
                return
            if j == S - 1:
                if budget % L[j] == 0 and c_lo <= budget // L[j] <= c_hi:
                    val = acc + Phi[j] / (m * (budget // L[j]))
                    if better(val):
                        best.update(val=val, c=np.array([*path, budget // L[j]]))
                return
            rest = suffix_l[j + 1]
            c_min = max(c_lo, -(-(budget - c_hi * rest) // L[j]))
            c_max = min(c_hi, (budget - c_lo * rest) // L[j])
            if c_min > c_max:
                return
            cs = np.arange(c_min, c_max + 1)
            left = budget - L[j] * cs
            keep = left % suffix_gcd[j + 1] == 0
            cs, left = cs[keep], left[keep]
            part = acc + Phi[j] / (m * cs)
            if j == S - 2:  # the last stage is fixed by the budget: solve both at once
                c_last = left // L[-1]
                ok = (left % L[-1] == 0) & (c_last >= c_lo) & (c_last <= c_hi)
                if ok.any():
                    total = np.where(ok, part + Phi[-1] / (m * np.maximum(c_last, 1)), np.inf)
                    i = int(np.argmin(total))
                    if better(total[i]):
                        best.update(val=total[i], c=np.array([*path, cs[i], c_last[i]]))
                return
            lb = part + lower(j + 1, left)
            for i in np.argsort(lb, kind="stable"):
                if not better(lb[i]):
                    break
                path.append(int(cs[i]))
                rec(j + 1, int(left[i]), part[i])
                path.pop()

        rec(0, M, 0.0)
        return best["c"], best["val"]


def _dp_partitions(phi, stages):
    """For each stage count s <= stages, the boundaries minimising ``sum_s sqrt(Phi_s L_s)``,
    i.e. the relaxed objective ``(sum_s sqrt(Phi_s L_s))^2 / N`` (``Phi_s`` clipped at 0)."""
    K = len(phi)
    prefix = np.concatenate([[0.0], np.cumsum(phi)])
    cost = np.full((stages + 1, K + 1), np.inf)
    arg = np.zeros((stages + 1, K + 1), dtype=int)
    cost[0, 0] = 0.0
    for s in range(1, stages + 1):
        for k in range(s, K + 1):
            j = np.arange(s - 1, k)
            v = cost[s - 1, j] + np.sqrt(np.maximum(prefix[k] - prefix[j], 0.0) * (k - j))
            i = int(np.argmin(v))
            cost[s, k], arg[s, k] = v[i], j[i]
    out = []
    for s in range(1, stages + 1):
        cuts, k = [], K
        for t in range(s, 0, -1):
            k = arg[t, k]
            cuts.append(int(k))
        out.append(tuple(sorted(cuts)[1:]))  # drop the leading 0
    return out


def _relaxed_levels(Phi, L, N, lo, hi):
    """Real stage batch sizes minimising ``sum_s Phi_s / B_s`` s.t. ``sum_s L_s B_s = N``,
    ``lo <= B_s <= hi``: ``B_s = clip(x sqrt(Phi_s / L_s), lo, hi)`` (weighted square-root rule),
    ``x`` by bisection; stages with ``Phi_s <= 0`` get ``lo``."""
    w = np.sqrt(np.maximum(Phi, 0.0) / L)
    if not np.any(w > 0):
        return np.full(len(L), N / np.sum(L))
    a, b = np.log(lo / w.max()), np.log(hi / w[w > 0].min())
    for _ in range(200):
        mid = 0.5 * (a + b)
        if np.sum(L * np.clip(np.exp(mid) * w, lo, hi)) < N:
            a = mid
        else:
            b = mid
    return np.clip(np.exp(0.5 * (a + b)) * w, lo, hi)


def _stage_dp(phi, M, m, level_sets):
    """Exact minimum of ``sum_k phi_k / (m c_k)`` over schedules made of ``len(level_sets)``
    consecutive (possibly empty) constant stages, stage ``s`` at a level from ``level_sets[s]``,
    with ``sum_k c_k = M``. Returns ``(value, c per step)`` or ``(inf, None)``.

    A dynamic programme over the steps whose state is (stage, level, budget used so far): each
    step either stays in the current state or enters a later stage at any of its levels. Work
    and memory ``O(steps * states * M)`` with ``states = sum_s len(level_sets[s])``.
    """
    K = len(phi)
    S = len(level_sets)
    stage_of = np.concatenate([np.full(len(ls), s) for s, ls in enumerate(level_sets)])
    level = np.concatenate([np.asarray(ls, dtype=np.int64) for ls in level_sets])
    J, Q = len(level), M + 1
    q = np.arange(Q)
    before = q[None, :] - level[:, None]  # budget before adding this step's level
    valid = before >= 0
    before = np.clip(before, 0, Q - 1)
    rows = np.arange(J)[:, None]
    members = [np.flatnonzero(stage_of == s) for s in range(S)]
    src = np.empty((K, J, Q), dtype=np.int8 if J < 127 else np.int16)  # -2 start, -1 stay
    cur = np.full((J, Q), np.inf)
    for k in range(K):
        if k == 0:
            pre = np.full((J, Q), np.inf)
            pre[:, 0] = 0.0
            source = np.full((J, Q), -2)
        else:
            # Best state of each stage, then the best over all strictly earlier stages.
            run, run_arg = np.full(Q, np.inf), np.full(Q, -1)
            enter, enter_arg = np.empty((S, Q)), np.empty((S, Q), dtype=np.int64)
            for s in range(S):
                enter[s], enter_arg[s] = run, run_arg
                sub = cur[members[s]]
                i = np.argmin(sub, axis=0)
                best = sub[i, q]
                better = best < run
                run = np.where(better, best, run)
                run_arg = np.where(better, members[s][i], run_arg)
            cand, cand_arg = enter[stage_of], enter_arg[stage_of]
            take = cand < cur
            pre = np.where(take, cand, cur)
            source = np.where(take, cand_arg, -1)
        src[k] = source
        cur = np.where(valid, pre[rows, before], np.inf) + (phi[k] / (m * level))[:, None]
    j = int(np.argmin(cur[:, M]))
    if not np.isfinite(cur[j, M]):
        return np.inf, None
    value, c, budget = float(cur[j, M]), np.empty(K, dtype=np.int64), M
    for k in range(K - 1, -1, -1):
        c[k] = level[j]
        budget -= level[j]
        came = int(src[k, j, budget])
        if came >= 0:
            j = came
    return value, c


def _cuts_of(b):
    return tuple(int(i) + 1 for i in np.flatnonzero(np.diff(b)))


def _local_search(alloc, cuts, val, b, K):
    """Move single boundaries by +-1, +-2 while that improves the exact objective."""
    cuts = list(cuts)
    improved, passes = True, 0
    while improved and passes < 25:
        improved, passes = False, passes + 1
        for i in range(len(cuts)):
            for d in (-2, -1, 1, 2):
                new = list(cuts)
                new[i] += d
                edges = [0, *new, K]
                if any(e1 <= e0 for e0, e1 in itertools.pairwise(edges)):
                    continue
                v, nb = alloc.evaluate(new, bound=val)
                if nb is not None and v < val:
                    cuts, val, b, improved = new, v, nb, True
    return val, b


def _heuristic_stages(phi, N, M, m, c_lo, c_hi, S, alloc):
    """Boundaries from the relaxed dynamic programme; levels near its relaxed levels with the
    boundaries re-solved exactly (``_stage_dp``, within a work allowance); exact allocation on
    the boundaries found; then single-boundary moves. Returns (value, batch sizes) or
    (inf, None)."""
    K = len(phi)
    best_val, best_b, best_cuts = np.inf, None, None
    work = _LEVEL_DP_WORK
    dp = _dp_partitions(phi, S)
    for cuts in sorted(dp, key=lambda cu: alloc.lower_bound(*alloc.stages(cu))):
        tried = [cuts]
        Phi, L = alloc.stages(cuts)
        rel = _relaxed_levels(Phi, L, N, m * c_lo, m * c_hi) / m
        # With coarse multiples the budget is met at good levels only for particular
        # boundaries: keep the levels near the relaxed ones and let the boundaries move. First
        # the whole range of the relaxed levels for every stage, else a range around each.
        span = np.arange(max(c_lo, int(np.floor(rel.min())) - 1), min(c_hi, int(np.ceil(rel.max())) + 1) + 1)
        local = [np.arange(max(c_lo, int(np.floor(r)) - 1), min(c_hi, int(np.ceil(r)) + 1) + 1) for r in rel]
        for sets in ([span] * len(rel), local):
            cost = K * sum(len(x) for x in sets) * (M + 1)
            if cost <= work:
                work -= cost
                v, c = _stage_dp(phi, M, m, sets)
                if c is not None:
                    tried.append(_cuts_of(c))
                    if v < best_val:
                        best_val, best_b, best_cuts = v, m * c, _cuts_of(c)
                break
        for cand in tried:
            v, b = alloc.evaluate(cand)
            if b is not None and v < best_val:
                best_val, best_b, best_cuts = v, b, cand
    if best_b is not None:
        best_val, best_b = _local_search(alloc, best_cuts, best_val, best_b, K)
    return best_val, best_b


def compress_stages(
    phi: Float[ArrayLike, " steps"],
    samples: int,
    *,
    stages: int,
    multiple_of: int = 1,
    min_batch: int = 1,
    max_batch: int | None = None,
) -> tuple[np.ndarray, float, float]:
    """Best schedule with at most ``stages`` contiguous constant stages whose batch sizes are
    multiples of ``multiple_of``, exact budget: an export tool for training code that can only
    change the batch size a few times. NumPy, not jitted (run it once, outside any trace).

    Objective ``sum_k phi_k / b_k`` (theory 4); write ``b = m c`` with ``m = multiple_of`` and
    ``M = samples / m``. Three routes, the first that fits:

    1. exact dynamic programme over the steps with state (stage, level ``c``, budget used), when
       ``steps * stages * levels * (M + 1) <= 1e7`` (coarse multiples, moderate budgets);
    2. exact enumeration of all partitions into ``<= stages`` stages (when there are at most
       2000), in order of the lower bound ``(sum_s sqrt(Phi_s L_s))^2 / N`` (stage lengths
       ``L_s``, ``Phi_s`` the sum of phi over the stage; theory 4 applied to stages), each with
       its exact integer allocation (branch and bound over the multiples with weights ``L_s``),
       stopping when the bound exceeds the best found;
    3. otherwise a heuristic: boundaries from dynamic programming on that relaxed objective (one
       candidate per stage count), the route-1 programme restricted to levels near the
       candidate's relaxed levels (within a work allowance; with coarse multiples the budget is
       met at good levels only for particular boundaries), exact allocation on every set of
       boundaries found, then single boundaries moved while the exact objective improves.
       Measured against the exact routes on 12 random cases (30 and 60 steps, 3 stages,
       multiples 1/4/8): worst gap 0.8%, mean 0.06%.

    The branch and bound stops after 20000 nodes per partition (keeping the best found); not
    reached in the cases above. With ``stages >= steps`` every schedule of multiples is allowed
    and the answer is the exact integer optimum in units of ``multiple_of``.
    Cost: route 3 is ``O(stages * steps^2)`` for the boundary programme; for very long runs pool
    ``phi`` over blocks of steps first.

    Args:
        phi: per-step sensitivities, shape ``(steps,)``.
        samples: integer budget, a multiple of ``multiple_of``.
        stages: maximum number of constant stages, ``>= 1``.
        multiple_of: every batch size is a multiple of this, ``>= 1``.
        min_batch, max_batch: integer bounds on the batch sizes.

    Returns:
        ``(batch_sizes, objective, unconstrained_objective)``: NumPy int array ``(steps,)`` with
        ``sum == samples``; its ``sum phi / b``; and ``sum phi / b`` of ``integer_optimum`` with
        the same bounds (no stage or multiple constraint), a lower bound of ``objective``.

    Raises:
        ValueError: ``samples`` not a multiple of ``multiple_of``; no multiple of
            ``multiple_of`` in ``[min_batch, max_batch]``; infeasible budget; bad arguments;
            no schedule with these constraints meets the budget exactly.
    """
    phi = np.asarray(phi, dtype=float)
    if phi.ndim != 1 or phi.size < 1:
        raise ValueError(f"phi: must be a 1-D array of shape (steps,), got shape {phi.shape}")
    if not np.all(np.isfinite(phi)):
        raise ValueError("phi: contains NaN or infinite values")
    K = phi.size
    S = min(_py_int("stages", stages, 1), K)
    m = _py_int("multiple_of", multiple_of, 1)
    lo = _py_int("min_batch", min_batch, 1)
    hi = None if max_batch is None else _py_int("max_batch", max_batch, lo)
    N = _py_int("samples", samples, 1)
    if N % m:
        raise ValueError(f"samples: must be a multiple of multiple_of = {m}, got {N}")
    c_lo, c_hi = -(-lo // m), (N // m if hi is None else hi // m)
    if c_lo > c_hi:
        raise ValueError(f"multiple_of: no multiple of {m} lies in [min_batch, max_batch] = [{lo}, {hi}]")
    M = N // m
    if not K * c_lo <= M <= K * c_hi:
        raise ValueError(
            f"samples: with batch sizes multiples of {m} in [{m * c_lo}, "
            f"{m * c_hi}] the budget must lie in [{K * m * c_lo}, {K * m * c_hi}], "
            f"got {N}"
        )
    unconstrained = float(np.sum(phi / np.asarray(integer_optimum(phi, N, min_batch=lo, max_batch=hi))))

    if S == K:
        b = m * np.asarray(integer_optimum(phi, M, min_batch=c_lo, max_batch=c_hi))
        return b.astype(np.int64), float(np.sum(phi / b)), unconstrained

    alloc = _StageAllocator(phi, M, c_lo, c_hi, m)
    levels = np.arange(c_lo, min(c_hi, M - (K - 1) * c_lo) + 1)
    n_partitions = sum(math.comb(K - 1, s - 1) for s in range(1, S + 1))
    best_val, best_b = np.inf, None
    if K * S * len(levels) * (M + 1) <= _FULL_DP_WORK:
        # Exact: dynamic programme over steps x (stage, level, budget).
        best_val, c = _stage_dp(phi, M, m, [levels] * S)
        best_b = None if c is None else m * c
    elif n_partitions <= _EXHAUSTIVE_PARTITIONS:
        # Exact: every partition, in order of a lower bound, with its exact allocation.
        cands = [c for s in range(1, S + 1) for c in itertools.combinations(range(1, K), s - 1)]
        bounds = [alloc.lower_bound(*alloc.stages(c)) for c in cands]
        for i in np.argsort(bounds, kind="stable"):
            if bounds[i] >= best_val:
                break  # no remaining partition can beat the best found
            v, b = alloc.evaluate(cands[i], bound=best_val)
            if b is not None and v < best_val:
                best_val, best_b = v, b
    else:
        best_val, best_b = _heuristic_stages(phi, N, M, m, c_lo, c_hi, S, alloc)
    if best_b is None:
        raise ValueError(
            f"samples: no schedule with at most {S} stages of multiples of {m} in "
            f"[{m * c_lo}, {m * c_hi}] sums to exactly {N}"
        )
    best_b = best_b.astype(np.int64)
    return best_b, float(np.sum(phi / best_b)), unconstrained
