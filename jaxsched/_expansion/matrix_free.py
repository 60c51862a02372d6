"""Matrix-free sensitivity ``phi(t) = tr(Lam(t) Sigma(x(t)))`` for large models (theory 4).

Derivation. Let ``Phi_{t->T}`` be the gradient-flow map (``x' = -grad f``) from time ``t`` to ``T``
and ``V_t(y) = F(Phi_{t->T}(y))`` the terminal loss as a function of the state at time ``t``. Then

    Lam(t) = (1/2) hess V_t(x(t)).

Proof: with ``J(s, t) = d Phi_{t->s} / dy`` (``dJ/ds = -H(x(s)) J``) and ``a(s) = J(T, s)^T grad F``,
differentiating ``F(Phi(x + e g))`` twice in ``e`` gives

    g^T hess V_t g = w(T)^T hess F w(T) + grad F . z(T)
                   = w(T)^T hess F w(T) - int_t^T D3f(x(s))[a(s), w(s), w(s)] ds,

    w' = -H(x) w,                       w(t) = g,
    z' = -H(x) z - D3f(x)[w, w, .],     z(t) = 0,

and the right-hand side, as a function of ``t``, solves ``Lam' = H Lam + Lam H + (1/2) D3f[a]``
with ``Lam(T) = (1/2) hess F`` (the backward system of theory 4; note the *minus* sign in front of
the integral: the source term is integrated backward from ``T``). The pair ``(w, z)`` is the
second-order Taylor expansion in ``e`` of the flow started at ``x(t) + e g``, and its right-hand
side is the second-order Taylor expansion of ``e -> grad f(x + e w + e^2 z / 2)``: two nested
forward-mode derivatives of the gradient (``H w`` and ``H z + D3f[w, w, .]`` at once). No adjoint
``a(s)``, no backward pass and no ``d x d`` matrix is needed.

With ``Sigma = (1/n) sum_i g~_i g~_i^T`` (``g~_i = g_i - gbar`` centred per-example gradients, the
centring by the exact full gradient),

    phi(t) = (1/n) sum_i q_i(t),
    q_i(t) = g~_i^T Lam(t) g~_i = (1/2) [w_i(T)^T hess F w_i(T) + grad F . z_i(T)].

Per step, ``phi_k = int_{kh}^{(k+1)h} phi(t) dt`` is a quadrature over nodes: ``nodes_per_panel``
Gauss–Legendre nodes in each panel; each step's integral is the exact integral of the panel's
interpolating polynomial over that step. With ``steps_per_panel=1`` every step is a panel
(Gauss–Legendre, error ``O(h^(2q+1))``); coarser panels of ``steps_per_panel`` steps, graded down to
single steps near ``T`` where ``phi`` has a boundary layer, trade accuracy for speed.

Subsampling: with ``num_examples = m < n`` the same sample of examples is used at every node (so
the errors are smooth in ``t`` and the schedule's shape is stable), and ``phi_k`` gets an unbiased
estimate with a standard error:

- ``sampling="importance"`` (default): ``m`` i.i.d. draws with probabilities
  ``p_i = 1/(2n) + s_i / (2 sum_j s_j)``, ``s_i`` the squared norm of the centred gradient of example
  ``i`` integrated along the path (one cheap extra pass, per-example gradients only); estimator
  ``(1/m) sum_r q_{I_r k} / (n p_{I_r})``, standard error ``sd / sqrt(m)``. ``q_i`` scales with
  ``|g~_i|^2``, so this removes most of the variance when a few examples dominate -- on the
  breast-cancer data one example carries a third of ``phi``, and uniform samples of 25 out of 100
  gave intervals ``+- 2 SE`` that covered ``phi`` only about half of the time. The half-uniform
  mixture bounds the weights ``1/(n p_i) <= 2``.
- ``sampling="uniform"``: ``m`` examples without replacement, estimator ``(1/m) sum_{i in S} q_ik``,
  standard error ``sqrt((1 - m/n) s_k^2 / m)`` (finite-population correction). Unbiased, but its
  standard error is only trustworthy when no few examples dominate ``phi``.
"""

from __future__ import annotations

from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import _is_concrete
from .._solution import RESULTS, combine, finish, first_failure
from .._types import Array, Float, Int, Scalar, StepArray, Vector
from . import _common as cm
from .sensitivity import AbstractSensitivity, FirstOrderParts, _finish_parts

__all__ = [
    "MatrixFreeSensitivity",
    "MemoryStats",
    "NegativeSensitivityReport",
    "negative_sensitivity_report",
    "sensitivity_matrix_free",
]


class MemoryStats(NamedTuple):
    """Bytes of the buffers of a compiled computation, from XLA's memory analysis: ``argument``,
    ``output``, ``temp`` (the peak of live temporaries) and ``total``, their sum -- what the device
    holds at most while the computation runs (independent of the allocator, no sampling)."""

    argument: int
    output: int
    temp: int
    total: int


def _memory_stats(compiled) -> MemoryStats:
    # equinox wraps the jax Compiled object; the memory analysis lives on the inner one.
    m = compiled.compiled.memory_analysis()
    arg, out, temp = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                      int(m.temp_size_in_bytes))
    return MemoryStats(arg, out, temp, arg + out + temp)


class MatrixFreeSensitivity(eqx.Module):
    """Result of :func:`sensitivity_matrix_free`.

    Attributes:
        phi: ``(steps,)`` per-step sensitivities ``phi_k`` (exact, or the unbiased subsample estimate).
        stderr: ``(steps,)`` standard errors of ``phi`` (zeros when all examples are used).
        node_times: ``(nodes,)`` the times ``t_j`` where ``phi(t)`` was evaluated.
        phi_nodes: ``(nodes,)`` ``phi(t_j)`` (estimates when subsampling).
        contributions: ``(steps, m)`` one term per sampled example whose mean over the sample is
            ``phi_k``: the step integral ``q_ik`` of ``g~_i^T Lam(t) g~_i``, divided by ``n p_i``
            under importance sampling (for a bootstrap or other resampling).
        sample: ``(m,)`` the indices of the examples used.
        probabilities: ``(n,)`` the importance-sampling probabilities ``p_i`` (None otherwise).
        num_examples: how many examples were used (``n`` in exact mode).
        exact: whether all examples were used.
        sampling: ``"exact"``, ``"importance"`` or ``"uniform"``.
        memory: the compiled computation's :class:`MemoryStats` when ``memory_analysis=True``.
        result: a :class:`jaxsched.RESULTS` code (the first failed ODE solve, if any).
    """

    phi: StepArray
    stderr: StepArray
    node_times: Float[Array, " nodes"]
    phi_nodes: Float[Array, " nodes"]
    contributions: Float[Array, "steps m"]
    sample: Int[Array, " m"]
    probabilities: Float[Array, " n"] | None
    num_examples: int = eqx.field(static=True)
    exact: bool = eqx.field(static=True)
    sampling: str = eqx.field(static=True)
    memory: MemoryStats | None = eqx.field(static=True, default=None)
    result: RESULTS = eqx.field(default_factory=lambda: RESULTS.successful)


def _panel_sizes(steps: int, steps_per_panel: int) -> list[int]:
    """Panel lengths (in steps) summing to ``steps``: ``steps_per_panel`` in the bulk, graded
    ``..., 8, 4, 2, 1, 1`` towards the end of the horizon.

    ``phi(t)`` has a boundary layer of width ``~ 1 / (2 lambda_max)`` before ``T``: there
    ``Lam(t) ~ e^{-H (T - t)} hess F e^{-H (T - t)} / 2`` has not yet contracted the stiff
    directions, and ``phi`` rises steeply over the last few steps. A polynomial on a wide panel
    misses it (measured on a digits MLP, d = 310, 20 steps, 5-step panels with 2 nodes: 28% error
    relative to the largest ``phi_k`` without grading, 0.6% with it, 0.1% with 3 nodes); the
    graded panels cost ``O(log steps_per_panel)`` extra panels, all near ``T`` where the solves are
    short. (Grading towards ``t = 0`` as well did not reduce the error measurably, at the price of
    the longest solves, so it is not done.)"""
    s = steps_per_panel
    if s == 1:
        return [1] * steps
    grade = [1, 1]  # then 2, 4, 8, ... while shorter than the bulk panels
    while grade[-1] * 2 < s:
        grade.append(grade[-1] * 2)
    grade = [g for g in grade if g < s]
    while grade and sum(grade) > steps:
        grade.pop()
    middle = steps - sum(grade)
    bulk = [s] * (middle // s) + ([middle % s] if middle % s else [])
    return bulk + grade[::-1]


def _panel_quadrature(steps: int, steps_per_panel: int, nodes_per_panel: int):
    """Nodes ``tau_j`` (in units of steps) and weights ``W[k, j]`` with
    ``int_k^{k+1} p(tau) dtau = sum_j W[k, j] p(tau_j)`` for the interpolating polynomial ``p`` of
    each panel (exact for polynomials of degree ``< nodes_per_panel`` on each panel); with one step
    per panel this is Gauss–Legendre on every step."""
    q = nodes_per_panel
    xi, _ = np.polynomial.legendre.leggauss(q)
    # Coefficients of the Lagrange basis in the Legendre basis: columns of inv(V).
    coef = np.linalg.inv(np.polynomial.legendre.legvander(xi, q - 1))
    # Antiderivative of each Legendre basis polynomial, to integrate over sub-intervals exactly.
    anti = [np.polynomial.legendre.legint(np.eye(q)[j]) for j in range(q)]
    sizes = _panel_sizes(steps, steps_per_panel)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    nodes = np.zeros(len(sizes) * q)
    W = np.zeros((steps, len(sizes) * q))
    for p, (p0, size) in enumerate(zip(starts, sizes, strict=True)):
        half = 0.5 * size
        nodes[p * q:(p + 1) * q] = p0 + half * (xi + 1.0)
        for k in range(p0, p0 + size):
            lo, hi = (k - p0) / half - 1.0, (k + 1 - p0) / half - 1.0
            # integral over [lo, hi] of each Legendre polynomial P_l, l < q
            ints = np.array([np.polynomial.legendre.legval(hi, anti[l])
                             - np.polynomial.legendre.legval(lo, anti[l]) for l in range(q)])
            W[k, p * q:(p + 1) * q] = half * (ints @ coef)
    return nodes, W


def _jet2(grad_fn, x: Vector, w: Vector, z: Vector) -> tuple[Vector, Vector]:
    """``(H w, H z + D3f[w, w, .])``: the first two Taylor coefficients of
    ``e -> grad f(x + e w + e^2 z / 2)``, by two nested forward-mode derivatives."""
    def d1(e):
        return jax.jvp(lambda s: grad_fn(x + s * w + 0.5 * s * s * z), (e,), (jnp.ones_like(e),))[1]

    e0 = jnp.zeros((), x.dtype)
    return jax.jvp(d1, (e0,), (jnp.ones_like(e0),))


# Time is in step units (docs/theory.md §8): sigma = t / lr, so every field carries the factor lr and
# the node times are fixed numbers; gradients in lr are then those of ordinary array leaves.
@cm.vector_field
def _second_variation_field(t, y, args):
    problem, lr = args
    x, W, Z = y
    HW, S = jax.vmap(_jet2, in_axes=(None, None, 0, 0))(problem.gradient, x, W, Z)
    return (-lr * problem.gradient(x), -lr * HW, -lr * S)


@cm.vector_field
def _flow_field(t, x, args):
    problem, lr = args
    return -lr * problem.gradient(x)


def _solve(field, y0, t0, t1, dt0, args, solver, rtol, atol, max_steps):
    # An explicit first step (the controller adapts it at once) saves the initial step-size
    # heuristic, i.e. one more trace and compilation of the expensive vector field.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        t0=t0,
        t1=t1,
        dt0=jnp.minimum(dt0, t1 - t0),
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,  # the outcome is returned as a code (no host callback in the core)
    )
    return jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys), RESULTS.promote(sol.result)


@eqx.filter_jit
def _matrix_free_core(problem, lr, rtol, atol, tau, index_chunks, mask_chunks, solver,
                      steps, max_steps):
    dtype = problem.x0.dtype
    T = jnp.asarray(steps, dtype)
    times = tau
    dt0 = jnp.asarray(0.25, dtype)
    args = (problem, lr)

    def node_value(x, t):
        """``q_i(t)`` for every sampled example ``i``, pushed forward chunk by chunk."""
        gbar = problem.gradient(x)

        def chunk(inp):
            idx, mask = inp
            W0 = (problem.per_example_gradients(x, idx) - gbar) * mask[:, None]
            (xT, WT, ZT), result = _solve(_second_variation_field, (x, W0, jnp.zeros_like(W0)), t, T,
                                dt0, args, solver, rtol, atol, max_steps)
            gF = problem.terminal_gradient(xT)
            HFW = jax.vmap(lambda w: jax.jvp(problem.terminal_gradient, (xT,), (w,))[1])(WT)
            return 0.5 * (jnp.sum(WT * HFW, axis=1) + ZT @ gF) * mask, result

        q, results = jax.lax.map(chunk, (index_chunks, mask_chunks))
        return q.reshape(-1), first_failure(results)

    def scan_node(carry, t):
        t_prev, x_prev, result = carry
        # The path is integrated node to node, so only one state vector is ever stored.
        x, path_result = _solve(_flow_field, x_prev, t_prev, t, dt0, args, solver, rtol, atol,
                                max_steps)
        q, node_result = node_value(x, t)
        return (t, x, combine(result, path_result, node_result)), q

    init = (jnp.zeros((), dtype), problem.x0, RESULTS.successful)
    (_, _, result), q_nodes = jax.lax.scan(scan_node, init, times)
    # (nodes, padded examples) and the first failure of all the solves
    return q_nodes, result


@eqx.filter_jit
def _importance_core(problem, lr, rtol, atol, tau, node_weights, solver, max_steps, chunk):
    """``s_i = sum_j omega_j |g_i(x(t_j)) - gbar(x(t_j))|^2``: each example's centred squared
    gradient norm integrated along the path with the nodes' quadrature weights ``omega_j``.
    Per-example gradients are formed ``problem.chunk_size`` at a time: memory O(d * chunk)."""
    dtype = problem.x0.dtype
    n, c = problem.num_examples, min(chunk, problem.num_examples)
    k = -(-n // c)
    idx = jnp.minimum(jnp.arange(k * c), n - 1).reshape(k, c)  # padding repeats the last example
    dt0 = jnp.asarray(0.25, dtype)
    args = (problem, lr)

    def scan_node(carry, inp):
        t_prev, x_prev, acc = carry
        t, omega = inp
        x, _ = _solve(_flow_field, x_prev, t_prev, t, dt0, args, solver, rtol, atol, max_steps)
        gbar = problem.gradient(x)
        sq = jax.lax.map(
            lambda i: jnp.sum((problem.per_example_gradients(x, i) - gbar) ** 2, axis=1), idx)
        return (t, x, acc + omega * sq.reshape(-1)[:n]), None

    init = (jnp.zeros((), dtype), problem.x0, jnp.zeros(n, dtype))
    (_, _, acc), _ = jax.lax.scan(scan_node, init, (tau, node_weights))
    return acc


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: must be {bound}, got {value}")
    return int(value)


def _positive(name: str, value, dtype) -> Scalar:
    try:
        arr = jnp.asarray(value, dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {value!r}") from None
    if arr.ndim != 0:
        raise ValueError(f"{name}: must be a scalar, got shape {arr.shape}")
    if _is_concrete(arr) and not (np.isfinite(float(arr)) and float(arr) > 0):
        raise ValueError(f"{name}: must be a finite number > 0, got {float(arr)}")
    return arr


class _Prepared(NamedTuple):
    core_args: tuple
    weights: Array  # (steps, nodes) quadrature weights in units of steps
    tau: Array
    lr: Array
    m: int
    n: int
    mode: str  # "exact", "uniform" or "importance"
    sample: Array  # (m,) example indices
    ratios: Array  # (m,) 1 / (n p_i) under importance sampling, else ones
    probabilities: Array | None  # (n,) sampling probabilities under importance sampling


def _prepare(problem, lr, steps, num_examples, chunk_size, key, nodes_per_panel, steps_per_panel,
             rtol, atol, solver, max_steps, sampling) -> _Prepared:
    """Validate the arguments of :func:`sensitivity_matrix_free`, draw the sample and build the
    core's inputs."""
    if not problem.is_finite_data:
        raise ValueError(
            f"problem: the matrix-free path needs per-example gradients (a finite-data problem such "
            f"as DataProblem), got {type(problem).__name__}"
        )
    if sampling not in ("importance", "uniform"):
        raise ValueError(f"sampling: must be 'importance' or 'uniform', got {sampling!r}")
    dtype = problem.x0.dtype
    n = problem.num_examples
    steps = _check_int("steps", steps, 1)
    m = n if num_examples is None else _check_int("num_examples", num_examples, 2, n)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    nodes_per_panel = _check_int("nodes_per_panel", nodes_per_panel, 1, 32)
    steps_per_panel = _check_int("steps_per_panel", steps_per_panel, 1)
    max_steps = _check_int("max_steps", max_steps, 1)
    lr = _positive("lr", lr, dtype)
    f64 = jnp.dtype(dtype) == jnp.float64
    rtol = _positive("rtol", (1e-9 if f64 else 1e-5) if rtol is None else rtol, dtype)
    atol = _positive("atol", (1e-12 if f64 else 1e-7) if atol is None else atol, dtype)
    solver = diffrax.Tsit5() if solver is None else solver
    tau_np, weights_np = _panel_quadrature(steps, steps_per_panel, nodes_per_panel)
    tau = jnp.asarray(tau_np, dtype)
    probabilities = None
    ratios = jnp.ones(m, dtype)
    if m == n:
        mode, indices = "exact", jnp.arange(n)
    else:
        if key is None:
            raise ValueError("key: a jax.random key is required when num_examples < n")
        mode = sampling
        if sampling == "uniform":
            indices = jax.random.choice(key, n, (m,), replace=False)
        else:
            omega = jnp.asarray(weights_np.sum(axis=0), dtype) * lr
            s = _importance_core(problem, lr, rtol, atol, tau, omega, solver, max_steps, chunk_size)
            # Defensive mixture: half uniform, so 1 / (n p_i) <= 2 whatever the norms are.
            total = jnp.sum(s)
            probabilities = 0.5 / n + 0.5 * jnp.where(total > 0, s / total, 1.0 / n)
            indices = jax.random.choice(key, n, (m,), replace=True, p=probabilities)
            ratios = 1.0 / (n * probabilities[indices])
    c = min(chunk_size, m)
    num_chunks = -(-m // c)
    pad = num_chunks * c - m
    index_chunks = jnp.concatenate([indices, jnp.zeros(pad, indices.dtype)]).reshape(num_chunks, c)
    mask_chunks = jnp.concatenate([jnp.ones(m, dtype), jnp.zeros(pad, dtype)]).reshape(
        num_chunks, c)
    core_args = (problem, lr, rtol, atol, tau, index_chunks, mask_chunks, solver, steps, max_steps)
    return _Prepared(core_args, jnp.asarray(weights_np, dtype), tau, lr, m, n, mode, indices,
                     ratios, probabilities)


def sensitivity_matrix_free(
    problem,
    *,
    lr,
    steps: int,
    num_examples: int | None = None,
    chunk_size: int = 16,
    key: Array | None = None,
    nodes_per_panel: int = 4,
    steps_per_panel: int = 1,
    rtol=None,
    atol=None,
    solver: diffrax.AbstractSolver | None = None,
    max_steps: int = 16384,
    sampling: str = "importance",
    memory_analysis: bool = False,
    throw: bool = True,
) -> MatrixFreeSensitivity:
    """Per-step sensitivities ``phi_k`` (theory 4) without forming any ``d x d`` matrix.

    ``phi(t) = (1/n) sum_i g~_i^T Lam(t) g~_i`` with ``g~_i`` the centred per-example gradients at
    ``x(t)`` and ``g^T Lam(t) g`` from the second variation of the gradient flow from ``t`` to ``T``
    (see the module docstring): for each quadrature node, the centred gradients of a chunk of
    examples are pushed to ``T`` by an adaptive diffrax solve of ``w' = -H w``,
    ``z' = -H z - D3f[w, w]`` using forward-mode Hessian-vector products only.

    Cost: ``nodes * chunks`` ODE solves, each step costing ``chunk_size`` second-order
    forward-mode gradients of the full loss, i.e. ``O(nodes * m * n * d * solver steps)`` for ``m``
    sampled examples. ``nodes = ceil(steps / steps_per_panel) * nodes_per_panel``.

    Memory: ``O(d * chunk_size)`` -- the ODE state ``(x, W, Z)`` holds ``(2 chunk_size + 1) d``
    numbers (times the solver's fixed number of stages), plus the activations of ``chunk_size``
    simultaneous forward-mode passes over one chunk of ``problem.chunk_size`` examples, plus
    ``nodes * m`` scalars of results. Importance sampling adds one pass along the path holding
    ``problem.chunk_size`` per-example gradients at a time. Never ``d^2``. ``memory_analysis=True``
    reports the main computation's compiled buffers.

    Args:
        problem: a :class:`DataProblem` (per-example gradients are needed).
        lr: learning rate ``h > 0``; the horizon is ``T = steps * h``.
        steps: number of SGD steps ``K``.
        num_examples: ``m``, the number of examples used (default: all ``n``, exact). With
            ``2 <= m < n`` a sample gives an unbiased estimate and its standard error.
        chunk_size: how many per-example gradient vectors are pushed forward together.
        key: a ``jax.random`` key; required when ``num_examples < n``.
        nodes_per_panel: Gauss–Legendre nodes per panel (accuracy order in each panel).
        steps_per_panel: steps per panel; 1 gives per-step Gauss–Legendre. Larger values evaluate
            ``phi(t)`` on a coarser grid (graded to single steps near ``T``) and integrate its
            interpolating polynomial over each step: fewer ODE solves, with the error of polynomial
            interpolation over a panel (no longer exact to solver tolerance).
        rtol, atol: diffrax step-size tolerances (default 1e-9/1e-12 in float64, 1e-5/1e-7 in
            float32).
        solver: a diffrax ODE solver (default ``Tsit5``).
        max_steps: the maximum number of solver steps of one solve.
        sampling: ``"importance"`` (default) or ``"uniform"`` subsampling (module docstring).
        memory_analysis: compile ahead of time and record XLA's memory analysis of the compiled
            computation in ``result.memory`` (same single compilation, not cached across calls).
        throw: raise :class:`jaxsched.SolveError` (after the call) when an ODE solve failed
            (default); with ``throw=False`` the outcome is in ``result``.

    Returns:
        A :class:`MatrixFreeSensitivity` with ``phi``, ``stderr``, ``node_times``, ``phi_nodes``
        (and ``memory`` when asked).

    Raises:
        ValueError: naming the argument, for a problem that is not a ``DataProblem``, ``lr <= 0``,
            bad integers, an unknown ``sampling``, or a missing ``key`` when subsampling.
    """
    prep = _prepare(problem, lr, steps, num_examples, chunk_size, key, nodes_per_panel,
                    steps_per_panel, rtol, atol, solver, max_steps, sampling)
    m = prep.m
    memory = None
    if memory_analysis:
        compiled = _matrix_free_core.lower(*prep.core_args).compile()
        memory = _memory_stats(compiled)
        q_nodes, result = compiled(*prep.core_args)
    else:
        q_nodes, result = _matrix_free_core(*prep.core_args)
    out = _finish(prep, q_nodes[:, :m], memory, result)
    return finish(result, throw, out)


def _finish(prep: _Prepared, q_nodes, memory, result=RESULTS.successful) -> MatrixFreeSensitivity:
    """Per-step estimates and standard errors from the per-sample node values ``q_i(t_j)``."""
    m, n = prep.m, prep.n
    q_nodes = q_nodes * prep.ratios  # importance weights 1 / (n p_i); ones otherwise
    q_steps = prep.lr * (prep.weights @ q_nodes)  # (steps, m): per-sample per-step integrals
    phi = jnp.mean(q_steps, axis=1)
    if prep.mode == "exact":
        stderr = jnp.zeros_like(phi)
    elif prep.mode == "uniform":  # without replacement: finite-population correction
        stderr = jnp.sqrt((1.0 - m / n) * jnp.var(q_steps, axis=1, ddof=1) / m)
    else:  # i.i.d. draws with replacement
        stderr = jnp.std(q_steps, axis=1, ddof=1) / jnp.sqrt(m)
    return MatrixFreeSensitivity(
        phi=phi,
        stderr=stderr,
        node_times=prep.lr * prep.tau,
        phi_nodes=jnp.mean(q_nodes, axis=1),
        contributions=q_steps,
        sample=prep.sample,
        probabilities=prep.probabilities,
        num_examples=m,
        exact=prep.mode == "exact",
        sampling=prep.mode,
        memory=memory,
        result=result,
    )


class NegativeSensitivityReport(NamedTuple):
    """Where noise does not hurt to first order (``phi_k <= 0``, theory 4).

    Attributes:
        steps: indices ``k`` with ``phi_k <= 0``.
        share_of_steps: their fraction of all steps.
        share_of_mass: ``sum_{phi_k <= 0} |phi_k| / sum_k |phi_k|``.
        batch_sizes: the schedule's batch sizes at those steps (all ``min_batch`` for the optimum).
        at_min_batch: whether every such step is at the schedule's smallest batch size.
    """

    steps: Int[np.ndarray, " m"]
    share_of_steps: float
    share_of_mass: float
    batch_sizes: np.ndarray
    at_min_batch: bool


def negative_sensitivity_report(phi, batch_sizes=None) -> NegativeSensitivityReport:
    """Summarise the steps where the sensitivity is not positive.

    ``phi_k`` can be negative only through the third-derivative term (theory 4); there the optimal
    schedule uses the smallest allowed batch. This reports where and how much.

    Args:
        phi: ``(steps,)`` per-step sensitivities (e.g. ``optimal_schedule(...).phi``).
        batch_sizes: optional ``(steps,)`` schedule to inspect at those steps.

    Returns:
        A :class:`NegativeSensitivityReport`.

    Raises:
        ValueError: for a non 1-D or non-finite ``phi`` or a ``batch_sizes`` of another length.
    """
    p = np.asarray(phi, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"phi: must be a non-empty 1-D array, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("phi: contains NaN or infinite values")
    neg = np.flatnonzero(p <= 0)
    total = float(np.sum(np.abs(p)))
    mass = float(np.sum(np.abs(p[neg])) / total) if total > 0 else 0.0
    if batch_sizes is None:
        b = np.zeros(0)
        at_min = True
    else:
        bs = np.asarray(batch_sizes)
        if bs.shape != p.shape:
            raise ValueError(f"batch_sizes: expected shape {p.shape} to match phi, got {bs.shape}")
        b = bs[neg]
        at_min = bool(np.all(b == bs.min())) if neg.size else True
    return NegativeSensitivityReport(
        steps=neg, share_of_steps=neg.size / p.size, share_of_mass=mass, batch_sizes=b,
        at_min_batch=at_min,
    )


# ------------------------------------------------------------------------------------------------
# the method object of the one sensitivity entry


@cm.vector_field
def _flow_correction_field(sigma, y, args):
    problem, units = args
    x, mc = y
    s = units.s[0]
    g = problem.gradient(x)
    # Hessian-vector products only: O(d) memory.
    return (-s * g, -s * problem.hvp(x, mc) - (0.5 * units.drift_factor * s * s) * problem.hvp(x, g))


@eqx.filter_jit
def _base_and_drift(problem, units, steps, rtol, atol, solver, max_steps):
    """``F(x_T)`` and the drift term ``grad F . mc_T (+ lag)`` by one forward solve in step units."""
    dtype = problem.x0.dtype
    x0 = problem.x0
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_flow_correction_field), solver, t0=jnp.zeros((), dtype),
        t1=jnp.asarray(steps, dtype), dt0=None, y0=(x0, jnp.zeros_like(x0)), args=(problem, units),
        saveat=diffrax.SaveAt(t1=True), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps, throw=False)
    xT, mcT = (leaf[-1] for leaf in sol.ys)
    gF = problem.terminal_gradient(xT)
    drift = gF @ mcT + units.lag * (gF @ problem.gradient(xT))
    return problem.terminal_value(xT), drift, xT, RESULTS.promote(sol.result)


class MatrixFree(AbstractSensitivity):
    """The matrix-free sensitivity (module docstring): ``phi`` from the second variation of the
    gradient flow with forward-mode Hessian-vector products, never a ``d x d`` matrix; memory
    ``O(d * chunk_size)``. With ``num_examples < n`` an unbiased subsample estimate, whose standard
    error is ``FirstOrderParts.phi_stderr``. For finite-data problems (per-example gradients) and a
    constant learning rate (momentum allowed).

    Args:
        num_examples: examples used (default all: exact to solver tolerance).
        chunk_size: per-example gradient vectors pushed forward together.
        key: a ``jax.random`` key, required when ``num_examples < n``.
        nodes_per_panel, steps_per_panel, max_steps, sampling: as in
            :func:`jaxsched.sensitivity_matrix_free`.
    """

    num_examples: int | None = eqx.field(static=True, default=None)
    chunk_size: int = eqx.field(static=True, default=16)
    key: Array | None = None
    nodes_per_panel: int = eqx.field(static=True, default=4)
    steps_per_panel: int = eqx.field(static=True, default=1)
    max_steps: int = eqx.field(static=True, default=16384)
    sampling: str = eqx.field(static=True, default="importance")

    def check(self, problem, optimizer) -> None:
        if not problem.is_finite_data:
            raise ValueError(
                "method: the matrix-free sensitivity needs a finite-data problem with per-example "
                f"gradients (e.g. js.DataProblem), got {type(problem).__name__}")
        if not optimizer.constant_lr:
            raise ValueError("optimizer: the matrix-free sensitivity needs a constant learning rate")

    def parts(self, problem, units, steps, rtol, atol, solver):
        raise NotImplementedError("MatrixFree computes its parts on the host side (compute)")

    def compute(self, problem, units, steps, rtol, atol, solver, throw):
        h = units.s[0]
        mf = sensitivity_matrix_free(
            problem, lr=h, steps=steps, num_examples=self.num_examples, chunk_size=self.chunk_size,
            key=self.key, nodes_per_panel=self.nodes_per_panel, steps_per_panel=self.steps_per_panel,
            rtol=rtol, atol=atol, solver=solver, max_steps=self.max_steps, sampling=self.sampling,
            throw=False)
        base, drift, xT, result = _base_and_drift(problem, units, steps, rtol, atol, solver,
                                                  self.max_steps)
        parts = FirstOrderParts(phi=mf.phi, base_loss=base, correction=drift / units.mean_step,
                                step_sizes=units.s, phi_stderr=mf.stderr,
                                result=combine(mf.result, result), x_final=xT)
        return _finish_parts(parts, throw, units)
