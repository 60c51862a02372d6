"""Ground truth for linear regression: exact discrete-time SGD moments (docs/theory.md §5.2, 5.3) and the
continuous-time closed forms for Gaussian features (docs/theory.md §5.1).

These are the independent references the expansion layer is checked against, so nothing here calls
the expansion code: the exact recursions propagate the first two moments of ``v = x - x_ref`` through
real minibatch SGD, and the closed forms integrate the eigen-decomposed sensitivity analytically.

Exact moments. For a quadratic loss every per-sample gradient is affine in ``v``,
``g_i(v) = A_i v + c_i``, so with ``mu = E v``, ``M = E v v^T`` and ``B = I - h S`` one SGD step
``v' = v - h g`` (``E[g | v] = S v + cbar``, ``Cov[g | v] = w Sigma(v)``) gives exactly

    mu' = B mu - h cbar
    M'  = B M B^T - h (B mu cbar^T + cbar mu^T B^T) + h^2 cbar cbar^T + h^2 w E[Sigma(v)],
    E f = tr(S M) / 2 + cbar . mu + const.

With ``cbar = 0`` (centring at the least-squares solution, or at ``x_star`` for Gaussian features)
this is docs/theory.md §5.2 / 5.3 verbatim; keeping ``cbar`` (a rounding-level vector) makes the recursion
exact for whatever centring point the least-squares solver returns, also in float32.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import _as_float_array, _is_concrete, exprel
from .._optimizer import AbstractOptimizer, as_optimizer
from .._types import Array, Float, Scalar, ScalarLike, StepArray, Vector
from .base import AbstractProblem, check_problem
from .linear import GaussianLinearRegression

__all__ = [
    "exact_expected_loss",
    "exact_gd_loss",
    "exact_loss_trajectory",
    "gaussian_correction",
    "gaussian_gd_loss",
    "gaussian_phi",
    "gaussian_sensitivity",
]


# ------------------------------------------------------------------------------------------------
# Input validation (concrete values only; under tracing the cores use eqx.error_if)
# ------------------------------------------------------------------------------------------------


def _check_quadratic(problem) -> None:
    check_problem(problem)
    if not problem.is_quadratic:
        raise ValueError(
            "problem: exact discrete moments need a quadratic problem (GaussianLinearRegression, "
            "DiagonalGaussianRegression or LinearRegressionData), "
            f"got {type(problem).__name__}"
        )


def _check_gaussian(problem) -> None:
    if not isinstance(problem, GaussianLinearRegression):
        raise ValueError(  # noqa: TRY004  (project convention: ValueError naming the argument)
            f"problem: closed forms need a GaussianLinearRegression, got {type(problem).__name__}"
        )


def _dtype(problem) -> jnp.dtype:
    return problem.x0.dtype


def _positive_scalar(name: str, value, dtype, *, allow_zero: bool = False) -> Scalar:
    """A scalar array of ``dtype``, refused (when concrete) unless finite and > 0 (or >= 0)."""
    arr = _as_float_array(name, value, ndim=0).astype(dtype)
    if _is_concrete(arr):
        val = float(arr)
        if val < 0 or (val == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name}: must be {bound}, got {val}")
    return arr


def _steps(value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(  # noqa: TRY004  (project convention: ValueError naming the argument)
            f"steps: must be a Python int, got {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(f"steps: must be >= {minimum}, got {value}")
    return int(value)


def _batch_sizes(problem, batch_sizes) -> StepArray:
    """Batch sizes as a 1-D float array of the problem's dtype. ``+inf`` is allowed and means an
    exact gradient (``w = 0``); NaN, ``-inf`` and entries ``<= 0`` are refused when concrete."""
    try:
        arr = jnp.asarray(batch_sizes)
    except TypeError as e:
        raise ValueError(f"batch_sizes: cannot be converted to an array ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"batch_sizes: expected a 1-D array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("batch_sizes: must not be empty")
    arr = arr.astype(_dtype(problem))
    if _is_concrete(arr):
        a = np.asarray(arr, dtype=np.float64)
        if np.any(np.isnan(a)):
            raise ValueError("batch_sizes: contains NaN")
        if np.any(a <= 0):
            raise ValueError(f"batch_sizes: entries must be > 0, got minimum {a.min()}")
        n = problem.batch_cap()
        if n is not None:
            finite = a[np.isfinite(a)]
            if finite.size and finite.max() > n:
                raise ValueError(
                    "batch_sizes: without replacement a batch cannot exceed the "
                    f"{n} examples, got {finite.max()}"
                )
    return arr


# ------------------------------------------------------------------------------------------------
# Exact discrete moments (docs/theory.md §5.2, 5.3)
# ------------------------------------------------------------------------------------------------


def _noise_weights(problem, batch_sizes: StepArray) -> StepArray:
    """``w_k`` of docs/theory.md §5.3 with ``b = +inf`` meaning ``w = 0``; the double ``where`` keeps the
    gradient finite where ``b`` is infinite."""
    infinite = jnp.isinf(batch_sizes)
    safe = jnp.where(infinite, jnp.ones_like(batch_sizes), batch_sizes)
    return jnp.where(infinite, jnp.zeros_like(batch_sizes), problem.noise_weight(safe))


def _update_coefficients(optimizer, dtype):
    """``(mu, alpha, beta)`` of the trace-form update (docs/theory.md §7): ``t' = mu t + g``,
    ``x' = x - s (alpha g + beta t)``; heavy ball ``(mu, 1, mu)``, Nesterov ``(mu, 1 + mu, mu^2)``."""
    mu = jnp.asarray(optimizer.momentum, dtype)
    if optimizer.nesterov:
        return mu, 1.0 + mu, mu * mu
    return mu, jnp.ones_like(mu), mu


def _guard(step_sizes: StepArray, momentum: Scalar, batch_sizes: StepArray):
    """Run-time value checks (``eqx.error_if``) for values that are traced."""
    step_sizes = eqx.error_if(
        step_sizes, jnp.any(~(step_sizes > 0)) | jnp.any(~jnp.isfinite(step_sizes)),
        "lr: must be > 0",
    )
    momentum = eqx.error_if(
        momentum, ~((momentum >= 0) & (momentum < 1)), "momentum: must satisfy 0 <= momentum < 1"
    )
    batch_sizes = eqx.error_if(
        batch_sizes, jnp.any(~(batch_sizes > 0)), "batch_sizes: entries must be > 0"
    )
    return step_sizes, momentum, batch_sizes


@eqx.filter_jit
def _trajectory_core(problem, batch_sizes: StepArray, step_sizes: StepArray
                     ) -> Float[Array, " steps+1"]:
    """Plain SGD, ``v' = v - s_k g_k`` (docs/theory.md §5.2, 5.3, with per-step rates ``s_k``)."""
    step_sizes, _, batch_sizes = _guard(step_sizes, jnp.zeros((), step_sizes.dtype), batch_sizes)
    model = problem.moment_model()
    S, cbar = model.hess, model.offset
    eye = jnp.eye(S.shape[0], dtype=S.dtype)

    def loss(mu, M):
        return 0.5 * jnp.vdot(S, M) + jnp.dot(cbar, mu) + model.const

    def step(carry, inp):
        mu, M = carry
        w, lr = inp
        B = eye - lr * S
        Bmu = B @ mu
        cross = jnp.outer(Bmu, cbar)
        M_new = (
            B @ M @ B.T
            - lr * (cross + cross.T)
            + lr**2 * (jnp.outer(cbar, cbar) + w * model.noise(mu, M))
        )
        M_new = 0.5 * (M_new + M_new.T)  # keep M exactly symmetric against rounding drift
        mu_new = Bmu - lr * cbar
        return (mu_new, M_new), loss(mu_new, M_new)

    mu0 = model.v0
    M0 = jnp.outer(mu0, mu0)
    w = _noise_weights(problem, batch_sizes)
    _, losses = jax.lax.scan(step, (mu0, M0), (w, step_sizes))
    return jnp.concatenate([loss(mu0, M0)[None], losses])


@eqx.filter_jit
def _momentum_core(problem, batch_sizes: StepArray, optimizer) -> Float[Array, " steps+1"]:
    """Heavy ball or Nesterov in the trace form, through the augmented state ``z = (v, t)``
    (docs/theory.md §7): ``z' = A z + c + B xi`` with ``E xi = 0``, ``Cov xi = w_k E Sigma(v)``, so

        m' = A m + c,    P' = A P A^T + A m c^T + c m^T A^T + c c^T + w_k B E[Sigma] B^T,

    with ``A = [[I - s alpha S, -s beta I], [S, mu I]]``, ``B = [-s alpha I; I]``,
    ``c = [-s alpha cbar; cbar]`` (``P`` the raw second moment, ``m`` the mean)."""
    model = problem.moment_model()
    S, cbar = model.hess, model.offset
    d = S.shape[0]
    steps = batch_sizes.shape[0]
    mu, alpha, beta = _update_coefficients(optimizer, S.dtype)
    step_sizes = optimizer.step_sizes(steps).astype(S.dtype)
    step_sizes, mu, batch_sizes = _guard(step_sizes, mu, batch_sizes)
    eye = jnp.eye(d, dtype=S.dtype)

    def loss(m, P):
        return 0.5 * jnp.vdot(S, P[:d, :d]) + jnp.dot(cbar, m[:d]) + model.const

    def step(carry, inp):
        m, P = carry
        w, s = inp
        A = jnp.block([[eye - s * alpha * S, -s * beta * eye], [S, mu * eye]])
        Bn = jnp.concatenate([-s * alpha * eye, eye])
        c = jnp.concatenate([-s * alpha * cbar, cbar])
        Am = A @ m
        cross = jnp.outer(Am, c)
        noise = model.noise(m[:d], P[:d, :d])
        P_new = A @ P @ A.T + cross + cross.T + jnp.outer(c, c) + w * (Bn @ noise @ Bn.T)
        P_new = 0.5 * (P_new + P_new.T)
        m_new = Am + c
        return (m_new, P_new), loss(m_new, P_new)

    m0 = jnp.concatenate([model.v0, jnp.zeros_like(model.v0)])
    P0 = jnp.outer(m0, m0)
    w = _noise_weights(problem, batch_sizes)
    _, losses = jax.lax.scan(step, (m0, P0), (w, step_sizes))
    return jnp.concatenate([loss(m0, P0)[None], losses])


def _run(problem, b: StepArray, lr, optimizer) -> Float[Array, " steps+1"]:
    """Dispatch on the two spellings: ``lr=`` is plain SGD at a constant rate (the ``d x d``
    recursion); ``optimizer=`` goes through the augmented ``2d x 2d`` recursion of docs/theory.md §7, which
    equals the plain one to rounding at momentum 0."""
    dtype = _dtype(problem)
    if optimizer is None:
        if lr is None:
            as_optimizer(None, None)  # raises the one message for "neither lr nor optimizer"
        h = _positive_scalar("lr", lr, dtype)
        return _trajectory_core(problem, b, jnp.broadcast_to(h, b.shape))
    opt = as_optimizer(optimizer, lr)
    opt.step_sizes(b.shape[0])  # a ValueError naming lr when the schedule's length is wrong
    opt = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), opt)
    return _momentum_core(problem, b, opt)


def exact_loss_trajectory(
    problem: AbstractProblem,
    batch_sizes: Float[Array, " steps"],
    *,
    lr: ScalarLike | None = None,
    optimizer: AbstractOptimizer | None = None,
) -> Float[Array, " steps+1"]:
    """Exact ``E f(x_k)``, ``k = 0..K``, of minibatch SGD on a quadratic problem (docs/theory.md §5.2, 5.3),
    optionally with heavy-ball or Nesterov momentum and a learning-rate schedule (docs/theory.md §7, 8).

    With ``lr=h``: plain SGD, ``x_{k+1} = x_k - h g_k``; ``mu_k = E v_k`` and ``M_k = E v_k v_k^T``
    propagate exactly with ``Cov[g_k | x_k] = w(b_k) Sigma(x_k)``, where ``w`` is
    ``problem.noise_weight`` (``1/b``, or ``(n-b)/(b(n-1))`` without replacement).

    With ``optimizer=js.SGD(lr, momentum=mu, nesterov=...)``: the trace form of optax/PyTorch,
    ``t_{k+1} = g_k + mu t_k``, ``x_{k+1} = x_k - s_k t_{k+1}`` (Nesterov
    ``x_{k+1} = x_k - s_k (g_k + mu t_{k+1})``), ``t_0 = 0``, with ``s_k`` the per-step rates
    (``lr`` a scalar or a ``(K,)`` schedule); the first two moments of the augmented state
    ``(v, t)`` propagate exactly (docs/theory.md §7). Momentum 0 gives plain SGD with the same rates.

    Real-valued batch sizes are allowed and the result is differentiable in them, in the rates and
    in the momentum; ``b = inf`` means an exact gradient.

    Args:
        problem: a ``GaussianLinearRegression``, ``DiagonalGaussianRegression`` or
            ``LinearRegressionData``.
        batch_sizes: ``(K,)`` positive batch sizes ``b_k`` (real or integer; ``+inf`` allowed).
        lr: learning rate ``h > 0`` (plain SGD); give this or ``optimizer``.
        optimizer: a ``js.SGD`` (momentum, Nesterov, lr schedule of length ``K``).

    Returns:
        ``(K + 1,)`` array of ``E f(x_k)`` in the problem's dtype.

    Raises:
        ValueError: ``problem`` not quadratic; neither or both of ``lr`` and ``optimizer``;
            ``lr <= 0``; an lr schedule whose length is not ``K``; ``batch_sizes`` not 1-D, empty,
            NaN or with entries ``<= 0`` (or ``> n`` without replacement). Value checks run on
            concrete inputs; under tracing ``eqx.error_if`` guards the rates, the momentum and
            the batch sizes.
    """
    _check_quadratic(problem)
    b = _batch_sizes(problem, batch_sizes)
    return _run(problem, b, lr, optimizer)


def exact_expected_loss(
    problem: AbstractProblem,
    batch_sizes: Float[Array, " steps"],
    *,
    lr: ScalarLike | None = None,
    optimizer: AbstractOptimizer | None = None,
    throw: bool = True,
) -> Scalar:
    """Exact ``E f(x_K)`` after ``K = len(batch_sizes)`` steps (docs/theory.md §5.2, 5.3, 7).

    See ``exact_loss_trajectory`` for arguments and errors; this returns its last entry. With
    ``throw=True`` (default) a loss that is not finite — SGD mean-square unstable for this learning
    rate and schedule (docs/theory.md §8) — raises instead of returning NaN/inf: eagerly a
    ``FloatingPointError`` saying what to change, under ``jit``/``vmap`` through ``eqx.error_if``.
    ``throw=False`` returns the number (the sweep reports it with a status).
    """
    loss = exact_loss_trajectory(problem, batch_sizes, lr=lr, optimizer=optimizer)[-1]
    if not throw:
        return loss
    message = ("the exact expected loss is not finite: SGD is mean-square unstable for this learning "
               "rate and schedule (use a smaller lr or larger batches; js.stability_batch gives the "
               "threshold)")
    if _is_concrete(loss):
        if not np.isfinite(float(loss)):
            raise FloatingPointError(message)
        return loss
    return eqx.error_if(loss, ~jnp.isfinite(loss), message)


def exact_gd_loss(
    problem: AbstractProblem,
    *,
    lr: ScalarLike | None = None,
    optimizer: AbstractOptimizer | None = None,
    steps: int,
) -> Scalar:
    """``f(x_K)`` of full-batch gradient descent (every ``b_k = inf``, so ``w_k = 0``) on a
    quadratic problem, through the same exact recursion as ``exact_expected_loss`` (with momentum
    and an lr schedule when ``optimizer`` is given).

    Args:
        problem: a quadratic problem (see ``exact_loss_trajectory``).
        lr: learning rate ``h > 0`` (plain gradient descent); give this or ``optimizer``.
        optimizer: a ``js.SGD``.
        steps: number of steps ``K >= 1`` (a Python int).

    Raises:
        ValueError: naming ``problem``, ``lr``, ``optimizer`` or ``steps``.
    """
    _check_quadratic(problem)
    k = _steps(steps, minimum=1)
    b = jnp.full((k,), jnp.inf, dtype=_dtype(problem))
    return _run(problem, b, lr, optimizer)[-1]


# ------------------------------------------------------------------------------------------------
# Closed forms for Gaussian features (docs/theory.md §5.1)
# ------------------------------------------------------------------------------------------------


def _eigen(problem: GaussianLinearRegression) -> tuple[Vector, Vector]:
    """Eigenvalues ``lam`` of ``S`` and ``z0 = U^T (x0 - x_star)``, ``v0`` in the eigenbasis."""
    lam, U = jnp.linalg.eigh(problem.cov)
    return lam, U.T @ (problem.x0 - problem.x_star)


@eqx.filter_jit
def _phi_core(problem, t: Array, horizon: Scalar) -> Array:
    lam, z0 = _eigen(problem)
    t = t[..., None]
    lz2 = lam * z0**2 * jnp.exp(-2.0 * lam * t)  # lam_i v_i(t)^2
    quad = jnp.sum(lz2, axis=-1, keepdims=True) + problem.noise_var  # v^T S v + s2
    return 0.5 * jnp.sum(lam**2 * jnp.exp(-2.0 * lam * (horizon - t)) * (lz2 + quad), axis=-1)


def gaussian_phi(
    problem: GaussianLinearRegression, t: Float[Array, "*shape"], *, horizon: ScalarLike
) -> Float[Array, "*shape"]:
    """Continuous-time sensitivity ``phi(t) = tr(Lam(t) Sigma(x(t)))`` for Gaussian features in
    closed form (docs/theory.md §5.1): in the eigenbasis of ``S`` (``lam_i``, ``v_i(t) = e^{-lam_i t} v0_i``)

        phi(t) = (1/2) sum_i lam_i^2 e^{-2 lam_i (T - t)} [lam_i v_i(t)^2 + sum_j lam_j v_j(t)^2 + s2].

    Args:
        problem: a ``GaussianLinearRegression`` (any SPD ``cov``; rotated by ``eigh``).
        t: times, any shape (meaningful on ``[0, T]``).
        horizon: ``T > 0``.

    Returns:
        ``phi(t)`` with the shape of ``t``.

    Raises:
        ValueError: naming ``problem``, ``t`` (NaN/inf) or ``horizon``.
    """
    _check_gaussian(problem)
    dtype = _dtype(problem)
    T = _positive_scalar("horizon", horizon, dtype)
    t = _as_float_array("t", t).astype(dtype)
    return _phi_core(problem, t, T)


@eqx.filter_jit
def _sensitivity_core(problem, lr: Scalar, steps: int) -> StepArray:
    lam, z0 = _eigen(problem)
    # Write phi(t) = (1/2) sum_i lam_i^2 [ lam_i z0_i^2 e^{-2 lam_i T}
    #                                      + sum_j wt_j e^{-2 lam_i (T - t) - 2 mu_j t} ],
    # where (mu_j, wt_j) = (lam_j, lam_j z0_j^2) plus one extra pair (0, s2) for the label noise.
    # Each term is an exponential of a linear function of t, integrated exactly per step.
    mu = jnp.concatenate([lam, jnp.zeros((1,), lam.dtype)])
    wt = jnp.concatenate([lam * z0**2, problem.noise_var[None].astype(lam.dtype)])
    T = lr * steps
    constant = 0.5 * jnp.sum(lam**3 * z0**2 * jnp.exp(-2.0 * lam * T))
    slope = 2.0 * (lam[:, None] - mu[None, :])
    ratio = exprel(-jnp.abs(slope) * lr)

    def one_step(k):
        # Exponent at the step's ends; both <= 0 on [0, T], so exp of the larger one never
        # overflows, and (1 - e^{-|c| h}) / (|c| h) handles c -> 0 and large |c| alike.
        start = -2.0 * lam[:, None] * ((steps - k) * lr) - 2.0 * mu[None, :] * (k * lr)
        end = start + slope * lr
        integral = lr * jnp.exp(jnp.maximum(start, end)) * ratio
        return lr * constant + 0.5 * jnp.sum(lam[:, None] ** 2 * wt[None, :] * integral)

    ks = jnp.arange(steps, dtype=lam.dtype)
    return jax.lax.map(one_step, ks, batch_size=min(steps, 256))


def gaussian_sensitivity(
    problem: GaussianLinearRegression, *, lr: ScalarLike, steps: int
) -> StepArray:
    """Per-step sensitivities ``phi_k = int_{kh}^{(k+1)h} phi(t) dt`` for Gaussian features, in
    closed form (docs/theory.md §4 and 5.1; ``T = steps * lr``). ``phi`` is a sum of ``O(d^2)``
    exponentials ``e^{c t}``, each integrated exactly (``expm1`` for ``c -> 0``).

    Then ``J1 = gaussian_correction + sum_k phi_k / b_k`` for a piecewise-constant schedule.

    Args:
        problem: a ``GaussianLinearRegression``.
        lr: learning rate ``h > 0``.
        steps: number of steps ``K >= 1`` (a Python int).

    Returns:
        ``(steps,)`` array ``phi_k``.

    Raises:
        ValueError: naming ``problem``, ``lr`` or ``steps``.
    """
    _check_gaussian(problem)
    k = _steps(steps, minimum=1)
    h = _positive_scalar("lr", lr, _dtype(problem))
    return _sensitivity_core(problem, h, k)


@eqx.filter_jit
def _correction_core(problem, horizon: Scalar) -> Scalar:
    lam, z0 = _eigen(problem)
    return -0.5 * jnp.sum(lam**3 * z0**2 * horizon * jnp.exp(-2.0 * lam * horizon))


def gaussian_correction(problem: GaussianLinearRegression, *, horizon: ScalarLike) -> Scalar:
    """Schedule-independent part of ``J1`` for Gaussian features: ``grad F(x_T) . mc_T``
    (docs/theory.md §3; ``m = 0`` since ``D3f = 0``). Solving ``mc' = -S mc - (1/2) S^2 v(t)`` in the
    eigenbasis gives the resonant ``mc_i(T) = -(1/2) lam_i^2 z0_i T e^{-lam_i T}``, so

        grad F(x_T) . mc_T = -(1/2) sum_i lam_i^3 z0_i^2 T e^{-2 lam_i T}.

    Args:
        problem: a ``GaussianLinearRegression``.
        horizon: ``T >= 0``.

    Raises:
        ValueError: naming ``problem`` or ``horizon``.
    """
    _check_gaussian(problem)
    T = _positive_scalar("horizon", horizon, _dtype(problem), allow_zero=True)
    return _correction_core(problem, T)


@eqx.filter_jit
def _gd_core(problem, horizon: Scalar) -> Scalar:
    lam, z0 = _eigen(problem)
    return 0.5 * jnp.sum(lam * z0**2 * jnp.exp(-2.0 * lam * horizon)) + 0.5 * problem.noise_var


def gaussian_gd_loss(problem: GaussianLinearRegression, *, horizon: ScalarLike) -> Scalar:
    """``F(x_T) = f(x(T))`` of gradient flow ``x' = -S (x - x_star)`` for Gaussian features:
    ``(1/2) sum_i lam_i z0_i^2 e^{-2 lam_i T} + s2 / 2`` (docs/theory.md §5.1).

    Args:
        problem: a ``GaussianLinearRegression``.
        horizon: ``T >= 0``.

    Raises:
        ValueError: naming ``problem`` or ``horizon``.
    """
    _check_gaussian(problem)
    T = _positive_scalar("horizon", horizon, _dtype(problem), allow_zero=True)
    return _gd_core(problem, T)
