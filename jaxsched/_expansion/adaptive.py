"""The moment model of Adam and RMSprop (docs/theory.md §9): the discrete recursion of §9.2 (the
reference) and its continuous form of §9.3 integrated with diffrax.

For Adam and RMSprop the batch size moves the preconditioner, hence the O(1) mean path, and the
expected loss is not affine in ``1/b`` (§9.1): the SGD expansion and its square-root rule do not
apply. The model tracks the means ``x̄, m̄, v̄`` and the covariance ``P`` of the fluctuations of
``(x, m, v)`` through the linearised optimizer and predicts ``E F(x_K) ≈ F(x̄_K) +
tr(hess F(x̄_K) P_xx) / 2`` (level "L1"). Everything is differentiable in the batch sizes, the
learning rate(s), ``b1``, ``b2``, ``eps`` and the problem's leaves.

Two covariance structures: ``"full"`` (``P`` is ``3d x 3d``; ``O(d^3)`` per step; the tested one)
and ``"diagonal"`` (experimental: ``Sigma`` and ``H`` reduced to their diagonals, one ``3 x 3`` block
per coordinate, ``O(d)`` per step beyond the problem's own derivatives).
"""

from __future__ import annotations

import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import _is_concrete, as_batch_sizes
from .._optimizer import AbstractAdaptiveOptimizer
from .._problem.base import check_problem
from .._solution import RESULTS
from .._types import Array, Float, Int, Scalar, Vector
from . import _common as cm

__all__ = ["AdaptiveExpansion", "MODELS", "UntestedRangeWarning", "adaptive_expansion",
           "adaptive_expected_loss", "mean_path_response"]

MODELS = ("discrete", "continuous")
COVARIANCES = ("full", "diagonal")

#: The range in which §9's checks were made: the model warns outside it.
TESTED_MAX_DIM = 10
TESTED_MAX_LR = 0.04


class UntestedRangeWarning(UserWarning):
    """The Adam/RMSprop moment model is used outside the range it was checked in (docs/theory.md
    §9: convex problems, ``d <= 10`` with the full covariance, ``lr <= 0.04``)."""


class AdaptiveExpansion(eqx.Module):
    """The moment model's prediction and state at the end of the run (docs/theory.md §9).

    Attributes:
        predicted_loss: ``F(x̄_K) + tr(hess F(x̄_K) P_xx) / 2``.
        base_loss: ``F(x̄_K)``, the loss of the model's mean path.
        noise_term: ``tr(hess F(x̄_K) P_xx) / 2``.
        x_final, m_final, v_final: the means at the end (``m``/``v`` as the optimizer stores them
            for the discrete model; bias-corrected ``m̂``/``v̂`` for the continuous one).
        P_final: the fluctuation covariance: ``(3d, 3d)`` in the order ``(x, m, v)`` for the full
            model, ``(d, 3, 3)`` per coordinate for the diagonal one.
        num_steps: the optimizer's steps (discrete) or diffrax's solver steps (continuous).
        result: a :class:`jaxsched.RESULTS` code.
        model: ``"discrete"`` or ``"continuous"``; level: ``"L1"``; covariance: ``"full"`` or
            ``"diagonal"``.
    """

    predicted_loss: Scalar
    base_loss: Scalar
    noise_term: Scalar
    x_final: Vector
    m_final: Vector
    v_final: Vector
    P_final: Array
    num_steps: Int[Array, ""]
    result: RESULTS
    model: str = eqx.field(static=True, default="discrete")
    level: str = eqx.field(static=True, default="L1")
    covariance: str = eqx.field(static=True, default="full")


class _Run(eqx.Module):
    """The per-step inputs of the model: learning rate ``h``, noise weight ``w = w(b)``, bias
    corrections ``c1, c2`` (all ``(K,)``) and the optimizer's ``b1, b2, eps``."""

    h: Float[Array, " steps"]
    w: Float[Array, " steps"]
    c1: Float[Array, " steps"]
    c2: Float[Array, " steps"]
    b1: Scalar
    b2: Scalar
    eps: Scalar
    has_m: bool = eqx.field(static=True, default=True)


def _run_inputs(problem, batch_sizes, opt: AbstractAdaptiveOptimizer) -> _Run:
    steps = batch_sizes.shape[0]
    dtype = problem.x0.dtype
    c1, c2 = opt.bias_corrections(steps)
    return _Run(h=opt.step_sizes(steps).astype(dtype), w=problem.noise_weight(batch_sizes.astype(dtype)),
                c1=c1.astype(dtype), c2=c2.astype(dtype), b1=opt.b1.astype(dtype),
                b2=opt.b2.astype(dtype), eps=opt.eps.astype(dtype), has_m=opt.has_first_moment)


def _phi(m, v, c1, c2, eps):
    """The update direction ``(m / c1) / (sqrt(v / c2) + eps)`` (elementwise)."""
    return (m / c1) / (jnp.sqrt(v / c2) + eps)


def _phi_and_partials(m, v, c1, c2, eps):
    """``phi`` and its elementwise partial derivatives in ``m`` and ``v``."""
    one = jnp.ones_like(m)
    u, dm = jax.jvp(lambda mm: _phi(mm, v, c1, c2, eps), (m,), (one,))
    _, dv = jax.jvp(lambda vv: _phi(m, vv, c1, c2, eps), (v,), (one,))
    return u, dm, dv


def _diag_sigma(problem, x):
    return jnp.diagonal(problem.covariance(x))


# ------------------------------------------------------------------------------------------------
# The discrete recursion (docs/theory.md §9.2)
# ------------------------------------------------------------------------------------------------
def _full_step(problem, run: _Run, carry, inp):
    x, m, v, P = carry
    h, w, c1, c2 = inp
    b1, b2 = run.b1, run.b2
    d = x.shape[0]
    g = problem.gradient(x)
    H = problem.hessian(x)
    Q = w * problem.covariance(x)
    q = jnp.diagonal(Q)
    JS = w * jax.jacfwd(lambda z: _diag_sigma(problem, z))(x)
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * (g * g + q)
    u, dm, dv = _phi_and_partials(m1, v1, c1, c2, run.eps)
    x1 = x - h * u
    eye, zero = jnp.eye(d, dtype=x.dtype), jnp.zeros((d, d), x.dtype)
    A1 = jnp.block([[eye, zero, zero],
                    [(1 - b1) * H, b1 * eye, zero],
                    [(1 - b2) * (2 * g[:, None] * H + JS), zero, b2 * eye]])
    Pxx = P[:d, :d]
    n_mm = (1 - b1) ** 2 * Q
    n_mv = 2 * (1 - b1) * (1 - b2) * Q * g[None, :]
    n_vv = (1 - b2) ** 2 * (4 * (jnp.outer(g, g) + H @ Pxx @ H) * Q + 2 * Q * Q)
    Nz = jnp.block([[zero, zero, zero], [zero, n_mm, n_mv], [zero, n_mv.T, n_vv]])
    A2 = jnp.block([[eye, -h * jnp.diag(dm), -h * jnp.diag(dv)],
                    [zero, eye, zero], [zero, zero, eye]])
    P1 = A2 @ (A1 @ P @ A1.T + Nz) @ A2.T
    return (x1, m1, v1, 0.5 * (P1 + P1.T)), None


def _diagonal_step(problem, run: _Run, carry, inp):
    x, m, v, P = carry  # P: (d, 3, 3), one block (x_i, m_i, v_i) per coordinate
    h, w, c1, c2 = inp
    b1, b2 = run.b1, run.b2
    g = problem.gradient(x)
    Hd = jnp.diagonal(problem.hessian(x))
    q = w * _diag_sigma(problem, x)
    jd = w * jnp.diagonal(jax.jacfwd(lambda z: _diag_sigma(problem, z))(x))
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * (g * g + q)
    u, dm, dv = _phi_and_partials(m1, v1, c1, c2, run.eps)
    x1 = x - h * u
    one, zero = jnp.ones_like(x), jnp.zeros_like(x)
    A1 = jnp.stack([jnp.stack([one, zero, zero], -1),
                    jnp.stack([(1 - b1) * Hd, b1 * one, zero], -1),
                    jnp.stack([(1 - b2) * (2 * g * Hd + jd), zero, b2 * one], -1)], -2)
    pxx = P[:, 0, 0]
    n_mm = (1 - b1) ** 2 * q
    n_mv = 2 * (1 - b1) * (1 - b2) * q * g
    n_vv = (1 - b2) ** 2 * (4 * (g * g + Hd * Hd * pxx) * q + 2 * q * q)
    Nz = jnp.stack([jnp.stack([zero, zero, zero], -1), jnp.stack([zero, n_mm, n_mv], -1),
                    jnp.stack([zero, n_mv, n_vv], -1)], -2)
    A2 = jnp.stack([jnp.stack([one, -h * dm, -h * dv], -1), jnp.stack([zero, one, zero], -1),
                    jnp.stack([zero, zero, one], -1)], -2)
    P1 = A2 @ (A1 @ P @ jnp.swapaxes(A1, -1, -2) + Nz) @ jnp.swapaxes(A2, -1, -2)
    return (x1, m1, v1, P1), None


def _finish(problem, x, m, v, P, num_steps, result, model, covariance) -> AdaptiveExpansion:
    HF = problem.terminal_hessian(x)
    d = x.shape[0]
    if covariance == "full":
        noise = 0.5 * jnp.sum(HF * P[:d, :d])
    else:
        noise = 0.5 * jnp.sum(jnp.diagonal(HF) * P[:, 0, 0])
    base = problem.terminal_value(x)
    return AdaptiveExpansion(predicted_loss=base + noise, base_loss=base, noise_term=noise,
                             x_final=x, m_final=m, v_final=v, P_final=P,
                             num_steps=jnp.asarray(num_steps), result=result, model=model,
                             covariance=covariance)


def _initial_covariance(d, dtype, covariance):
    return jnp.zeros((3 * d, 3 * d) if covariance == "full" else (d, 3, 3), dtype)


def _discrete(problem, run: _Run, covariance: str) -> AdaptiveExpansion:
    x0 = problem.x0
    d = x0.shape[0]
    body = _full_step if covariance == "full" else _diagonal_step
    init = (x0, jnp.zeros_like(x0), jnp.zeros_like(x0), _initial_covariance(d, x0.dtype, covariance))
    (x, m, v, P), _ = jax.lax.scan(lambda c, i: body(problem, run, c, i), init,
                                   (run.h, run.w, run.c1, run.c2))
    return _finish(problem, x, m, v, P, run.h.shape[0], RESULTS.successful, "discrete", covariance)


def mean_path_response(problem, batch_sizes, optimizer: AbstractAdaptiveOptimizer):
    """The model's mean path and its linear response to gradient noise (for a control variate).

    Runs the mean recursion of docs/theory.md §9.2 with a perturbation ``xi_k`` added to the
    gradient of step ``k`` (in ``m`` and in ``v``) and differentiates ``F(x̄_K)`` in it at 0.

    Returns:
        ``(xbar, gbar, coef)``, each ``(K, d)``: the mean path's point at the start of each step,
        ``grad f`` there, and ``dF(x̄_K) / d xi_k``.
    """
    run = _run_inputs(problem, batch_sizes, optimizer)
    x0 = problem.x0

    def final(xis):
        def step(carry, inp):
            x, m, v = carry
            xi, h, w, c1, c2 = inp
            g = problem.gradient(x)
            ge = g + xi
            m1 = run.b1 * m + (1 - run.b1) * ge
            v1 = run.b2 * v + (1 - run.b2) * (ge * ge + w * _diag_sigma(problem, x))
            return (x - h * _phi(m1, v1, c1, c2, run.eps), m1, v1), (x, g)

        (x, _, _), (xs, gs) = jax.lax.scan(step, (x0, jnp.zeros_like(x0), jnp.zeros_like(x0)),
                                           (xis, run.h, run.w, run.c1, run.c2))
        return problem.terminal_value(x), (xs, gs)

    zeros = jnp.zeros((batch_sizes.shape[0], x0.shape[0]), x0.dtype)
    coef, (xs, gs) = jax.grad(final, has_aux=True)(zeros)
    return xs, gs, coef


# ------------------------------------------------------------------------------------------------
# The continuous form (docs/theory.md §9.3), in step units
# ------------------------------------------------------------------------------------------------
def _alpha(run: _Run, k):
    """Weights of the new gradient in the bias-corrected moments at step ``k`` (0-based):
    ``alpha_i = (1 - b_i) c_i(k-1) / c_i(k)``... written as ``1 - b_i c_i(k-1)/c_i(k)``."""
    prev1 = jnp.where(k > 0, run.c1[jnp.maximum(k - 1, 0)], 0.0)
    prev2 = jnp.where(k > 0, run.c2[jnp.maximum(k - 1, 0)], 0.0)
    bias = run.c2[0] < 1  # without bias correction c = 1 always: the weight is 1 - b
    a1 = jnp.where(bias, 1 - run.b1 * prev1 / run.c1[k], 1 - run.b1)
    a2 = jnp.where(bias, 1 - run.b2 * prev2 / run.c2[k], 1 - run.b2)
    return a1, a2


@cm.vector_field
def _continuous_field(sigma, y, args):
    problem, run, jump_ts, covariance = args
    x, m, v, P = y
    steps = run.h.shape[0]
    # step k covers [k, k+1]; the state there is (x_k, m̂_{k+1}, v̂_{k+1}), relaxing towards the
    # gradients of step k+1 (0-based) at the discrete map's per-step rate -log(1 - alpha).
    k = jnp.searchsorted(jump_ts, sigma, side="right")
    kn = jnp.minimum(k + 1, steps - 1)
    h, w = run.h[k], run.w[kn]
    a1, a2 = _alpha(run, kn)
    r1, r2 = -jnp.log1p(-jnp.minimum(a1, 1 - 1e-15)), -jnp.log1p(-a2)
    d = x.shape[0]

    def field(z):
        xx, mm, vv = z[:d], z[d:2 * d], z[2 * d:]
        g = problem.gradient(xx)
        mm_eff = mm if run.has_m else g
        dx = -h * mm_eff / (jnp.sqrt(vv) + run.eps)
        dm = r1 * (g - mm) if run.has_m else jnp.zeros_like(mm)
        dv = r2 * (g * g + w * _diag_sigma(problem, xx) - vv)
        return jnp.concatenate([dx, dm, dv])

    z = jnp.concatenate([x, m, v])
    dz, A = field(z), jax.jacfwd(field)(z)
    g = problem.gradient(x)
    Q = w * problem.covariance(x)
    H = problem.hessian(x)
    # per-step noise of (m̂, v̂) (the blocks of Nz with the bias-corrected weights alpha), and of x
    # directly when m is the gradient itself (RMSprop)
    am = a1 if run.has_m else jnp.zeros_like(a1)
    n_mm = am**2 * Q
    n_mv = 2 * am * a2 * Q * g[None, :]
    n_vv = a2**2 * (4 * (jnp.outer(g, g) + H @ P[:d, :d] @ H) * Q + 2 * Q * Q)
    zero = jnp.zeros((d, d), x.dtype)
    if run.has_m:
        D = jnp.block([[zero, zero, zero], [zero, n_mm, n_mv], [zero, n_mv.T, n_vv]])
    else:
        s = -h / (jnp.sqrt(v) + run.eps)  # dx = s * xi
        n_xx = s[:, None] * Q * s[None, :]
        n_xv = s[:, None] * (2 * a2 * Q * g[None, :])
        D = jnp.block([[n_xx, zero, n_xv], [zero, zero, zero], [n_xv.T, zero, n_vv]])
    AP = A @ P
    return (dz[:d], dz[d:2 * d], dz[2 * d:], AP + AP.T + D)


def _continuous(problem, run: _Run, covariance: str, rtol, atol, solver, throw):
    if covariance != "full":
        raise ValueError("covariance: the continuous form implements the full covariance only; use "
                         "model='discrete' with covariance='diagonal'")
    steps = run.h.shape[0]
    x0 = problem.x0
    dtype = x0.dtype
    d = x0.shape[0]
    g0 = problem.gradient(x0)
    a1, a2 = _alpha(run, 0)
    m0 = (a1 * g0) if run.has_m else jnp.zeros_like(g0)
    v0 = a2 * (g0 * g0 + run.w[0] * _diag_sigma(problem, x0))
    # the first step's noise enters (m̂_1, v̂_1) before the flow starts
    Q = run.w[0] * problem.covariance(x0)
    zero = jnp.zeros((d, d), dtype)
    am = a1 if run.has_m else 0.0
    n_mv = 2 * am * a2 * Q * g0[None, :]
    n_vv = a2**2 * (4 * jnp.outer(g0, g0) * Q + 2 * Q * Q)
    if run.has_m:
        P0 = jnp.block([[zero, zero, zero], [zero, am**2 * Q, n_mv], [zero, n_mv.T, n_vv]])
    else:
        P0 = jnp.block([[zero, zero, zero], [zero, zero, zero], [zero, zero, n_vv]])
    jump_ts = cm.integer_times(1, steps - 1, dtype) if steps > 1 else jnp.zeros((0,), dtype)
    max_steps = cm.max_solver_steps(steps)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_continuous_field), solver, t0=jnp.zeros((), dtype),
        t1=jnp.asarray(steps, dtype), dt0=None, y0=(x0, m0, v0, P0),
        args=(problem, run, jump_ts, covariance), saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=cm.controller(rtol, atol, jump_ts=jump_ts if steps > 1 else None),
        adjoint=cm.checkpointed(max_steps, 9 * d * d + 3 * d, jnp.dtype(dtype).itemsize),
        max_steps=max_steps, throw=throw)
    x, m, v, P = (leaf[-1] for leaf in sol.ys)
    return _finish(problem, x, m, v, P, sol.stats["num_steps"], RESULTS.promote(sol.result),
                   "continuous", covariance)


@eqx.filter_jit
def _model_core(problem, batch_sizes, opt, model, covariance, rtol, atol, solver, throw):
    run = _run_inputs(problem, batch_sizes, opt)
    if model == "discrete":
        return _discrete(problem, run, covariance)
    return _continuous(problem, run, covariance, rtol, atol, solver, throw)


# ------------------------------------------------------------------------------------------------
# Public entry
# ------------------------------------------------------------------------------------------------
def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: must be one of {choices}, got {value!r}")
    return value


def warn_untested_range(problem, optimizer, covariance: str, stacklevel: int = 3) -> None:
    """Warn (:class:`UntestedRangeWarning`) when the model is used outside the range of docs/theory.md
    §9's checks: ``d > 10`` with the full covariance, any learning rate above 0.04, a Hessian with
    a negative eigenvalue at ``x0`` (a non-convex problem), or the experimental diagonal
    covariance. Silent for traced values."""
    d = problem.dim
    reasons = []
    if covariance == "full" and d > TESTED_MAX_DIM:
        reasons.append(f"d = {d} > {TESTED_MAX_DIM} with the full covariance (O(d^3) per step; "
                       "consider covariance='diagonal')")
    if covariance == "diagonal":
        reasons.append("the diagonal covariance is experimental (its error is not established)")
    if _is_concrete(optimizer.lr):
        lr_max = float(np.max(np.asarray(optimizer.lr)))
        if lr_max > TESTED_MAX_LR:
            reasons.append(f"lr = {lr_max:g} > {TESTED_MAX_LR}")
    if not problem.is_quadratic and d <= TESTED_MAX_DIM and _is_concrete(problem):
        lam_min = float(np.linalg.eigvalsh(np.asarray(problem.hessian(problem.x0)))[0])
        if lam_min < 0:
            reasons.append(f"the Hessian at x0 has a negative eigenvalue ({lam_min:.3g}): non-convex")
    if reasons:
        warnings.warn("Adam/RMSprop moment model outside its tested range (docs/theory.md §9): "
                      + "; ".join(reasons), UntestedRangeWarning, stacklevel=stacklevel)


def _check_no_lr(lr):
    if lr is not None:
        raise ValueError("lr: give either lr= or optimizer=, not both (the optimizer holds its lr)")


def _check_optimizer(optimizer):
    if not isinstance(optimizer, AbstractAdaptiveOptimizer):
        raise ValueError(f"optimizer: expected js.Adam or js.RMSprop, got {type(optimizer).__name__}")


def adaptive_expansion(problem, batch_sizes, *, optimizer, lr=None, model: str = "discrete",
                       covariance: str = "full", rtol=None, atol=None, solver=None,
                       throw: bool = True) -> AdaptiveExpansion:
    """The moment model of Adam / RMSprop for a batch schedule (docs/theory.md §9).

    Args:
        problem: a jaxsched problem (``gradient``, ``hessian``, ``covariance`` by autodiff or
            closed forms).
        batch_sizes: ``(K,)`` batch sizes ``b_k > 0`` (real values allowed: the model is
            differentiable in them).
        optimizer: :class:`jaxsched.Adam` or :class:`jaxsched.RMSprop`.
        model: ``"discrete"`` (default; the recursion of §9.2 as a ``lax.scan``, exact in ``b1``,
            ``b2``, ``eps`` and the bias correction: the reference) or ``"continuous"`` (the ODE of
            §9.3 with diffrax, in step units, the bias correction as per-step rates; it omits the
            O(h) modified-equation drift of the mean).
        covariance: ``"full"`` (default) or ``"diagonal"`` (experimental, for large models).
        rtol, atol, solver: diffrax options of the continuous form (see
            :func:`jaxsched.expansion`).
        throw: raise when the continuous solve fails (default).
        lr: must be ``None`` (the optimizer holds its learning rate); accepted so that
            ``expansion(..., optimizer=js.Adam(...))`` forwards here unchanged.

    Returns:
        An :class:`AdaptiveExpansion` (level ``"L1"``).

    Raises:
        ValueError: naming the argument, for a non-adaptive ``optimizer``, bad ``batch_sizes``, an
            unknown ``model`` / ``covariance``, an lr schedule whose length is not ``K``, or the
            diagonal covariance with the continuous form.

    Warns:
        UntestedRangeWarning: outside the tested range (see :func:`warn_untested_range`).
    """
    check_problem(problem)
    _check_optimizer(optimizer)
    _check_no_lr(lr)
    model = _check_choice("model", model, MODELS)
    covariance = _check_choice("covariance", covariance, COVARIANCES)
    b = as_batch_sizes(batch_sizes)
    dtype = problem.x0.dtype
    opt = optimizer.astype(dtype)
    opt.step_sizes(b.shape[0])  # a ValueError naming lr on a length mismatch
    if model == "continuous" and covariance != "full":
        raise ValueError("covariance: the continuous form implements the full covariance only")
    warn_untested_range(problem, opt, covariance)
    rtol, atol = cm.tolerances(dtype, rtol, atol)
    return _model_core(problem, b, opt, model, covariance, rtol, atol, cm.default_solver(solver),
                       throw)


def adaptive_expected_loss(problem, batch_sizes, *, optimizer, lr=None, model: str = "discrete",
                           covariance: str = "full", rtol=None, atol=None, solver=None,
                           throw: bool = True) -> Scalar:
    """The model's ``E F(x_K)`` (docs/theory.md §9); see :func:`adaptive_expansion`."""
    return adaptive_expansion(problem, batch_sizes, optimizer=optimizer, lr=lr, model=model,
                              covariance=covariance, rtol=rtol, atol=atol, solver=solver,
                              throw=throw).predicted_loss
