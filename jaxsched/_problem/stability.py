"""Mean-square stability of SGD and momentum on quadratic problems (docs/theory.md §8, "where the
degeneracy breaks", item 3).

With multiplicative gradient noise the exact second moments (docs/theory.md §5.2, 5.3, 7) obey a linear map
``P -> N(P) + w C(P)`` plus a constant, where ``N(P) = A P A^T`` is the deterministic part of one
step and ``w C`` the noise of a batch with noise weight ``w = w(b)``. They stay bounded for every
start iff its spectral radius is below one. Both parts are positive maps (they keep the cone of
PSD matrices), so by the splitting theorem for positive maps (the M-matrix argument on that cone),
when the deterministic step is stable (``rho(N) < 1``),

    rho(N + w C) < 1   <=>   w * rho((I - N)^{-1} C) < 1,

so the largest stable noise weight is ``w_stab = 1 / rho((I - N)^{-1} C)``, and ``b_stab`` solves
``w(b_stab) = w_stab``. In the eigenbasis of ``S`` the step decouples into one ``2 x 2`` block
``A_i = [[1 - s alpha lam_i, -s beta], [lam_i, mu]]`` per eigenvalue (``B_i = (-s alpha, 1)``;
plain SGD is ``mu = beta = 0``), and ``(I - N)^{-1}`` becomes the Schur multiplier by the
cross-Gramians ``g_ij = sum_k (e1^T A_i^k B_i)(e1^T A_j^k B_j)``, each from a ``4 x 4`` Stein
equation. Then

- Gaussian features, ``C(M) = S M S + tr(S M) S``: the diagonal pairs carry the spectral radius
  (an off-diagonal pair is bounded by the geometric mean of its two diagonal ones), and
  ``rho = lambda_max(diag(D) + z z^T)`` with ``D_i = z_i^2 = g_ii lam_i^2``: a secular equation,
  ``O(d)`` per step size;
- a finite data set, ``C(M) = mean_i A_i M A_i - S M S``: ``rho`` is the spectral radius of the
  ``d^2 x d^2`` matrix ``diag(vec g) (mean_i (a~_i a~_i^T) kron (a~_i a~_i^T) - Lam kron Lam)``
  (``a~ = U^T a``), ``O(n d^4)`` once plus ``O(d^6)`` per step size.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._optimizer import AbstractOptimizer, as_optimizer
from .._types import Array, Float, Scalar, StepArray, Vector
from .exact import _check_quadratic, _steps, _update_coefficients

__all__ = ["stability_batch", "stability_batch_at"]


def _stable_blocks(lam: Vector, s: Scalar, mu, alpha, beta) -> Array:
    """True when every ``2 x 2`` block ``A_i`` has spectral radius ``< 1`` (Jury's criterion on
    ``z^2 - tr z + det``: ``det < 1`` and ``|tr| < 1 + det``)."""
    tr = 1.0 - s * alpha * lam + mu
    det = mu * (1.0 - s * alpha * lam) + s * beta * lam
    return jnp.all((det < 1.0) & (jnp.abs(tr) < 1.0 + det))


def _cross_gramian(lam_i: Vector, lam_j: Vector, s, mu, alpha, beta) -> Array:
    """``g_ij = [X]_00`` with ``X = A_i X A_j^T + B B^T`` (the impulse responses' inner product),
    broadcast over ``lam_i`` and ``lam_j``."""

    def one(li, lj):
        Ai = jnp.array([[1.0 - s * alpha * li, -s * beta], [li, mu]])
        Aj = jnp.array([[1.0 - s * alpha * lj, -s * beta], [lj, mu]])
        Bv = jnp.stack([-s * alpha, jnp.ones_like(s)])
        rhs = jnp.outer(Bv, Bv).reshape(4)
        # row-major vec: vec(A_i X A_j^T) = (A_i kron A_j) vec(X)
        x = jnp.linalg.solve(jnp.eye(4, dtype=Ai.dtype) - jnp.kron(Ai, Aj), rhs)
        return x[0]

    return jnp.vectorize(one)(lam_i, lam_j)


def _secular_max(D: Vector) -> Scalar:
    """Largest eigenvalue of ``diag(D) + z z^T`` with ``z_i^2 = D_i >= 0``: the root
    ``x > max D`` of ``sum_i D_i / (x - D_i) = 1`` (bisection on the bracket
    ``[max D, max D + sum D]``, then one Newton step whose only role is to carry the derivative
    of the root by the implicit function theorem)."""
    lo0, width = jnp.max(D), jnp.sum(D)

    def f(x, D):
        return jnp.sum(D / (x - D)) - 1.0

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        above = f(mid, jax.lax.stop_gradient(D)) > 0  # f decreases: the root is above mid
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo0, width = jax.lax.stop_gradient(lo0), jax.lax.stop_gradient(width)
    lo, hi = jax.lax.fori_loop(0, 200, bisect, (lo0, lo0 + width))
    x0 = jax.lax.stop_gradient(hi)
    dfdx = -jnp.sum(jax.lax.stop_gradient(D) / (x0 - jax.lax.stop_gradient(D)) ** 2)
    return x0 - f(x0, D) / dfdx


# ------------------------------------------------------------------------------------------------
# The noise operator, from the problem's eigen form (Gaussian features or a finite data set).
# ------------------------------------------------------------------------------------------------
class _GaussianNoise(eqx.Module):
    lam: Vector

    def rho(self, s, mu, alpha, beta):
        g = _cross_gramian(self.lam, self.lam, s, mu, alpha, beta)
        return _secular_max(g * self.lam**2)


class _DataNoise(eqx.Module):
    lam: Vector
    cmat: Float[Array, "dd dd"]

    def rho(self, s, mu, alpha, beta):
        g = _cross_gramian(self.lam[:, None], self.lam[None, :], s, mu, alpha, beta)
        K = g.reshape(-1)[:, None] * self.cmat
        return jnp.max(jnp.abs(jnp.linalg.eigvals(K)))


def _noise_operator(problem):
    # Asked of the problem's eigen form: Gaussian features (no examples) or a finite data set.
    e = problem.eigen_form()
    if e.features is None:
        return _GaussianNoise(e.lam)
    Ft = e.features  # rotated features a~_i = U^T a_i
    n = Ft.shape[0]
    G = jax.vmap(jnp.kron)(Ft, Ft)  # rows a~_i kron a~_i: (n, d^2)
    return _DataNoise(e.lam, G.T @ G / n - jnp.diag(jnp.kron(e.lam, e.lam)))


def _invert_noise_weight(problem, w: Array) -> Array:
    """The batch ``b`` with ``problem.noise_weight(b) = w`` (decreasing in ``b``), by bisection in
    ``log b`` on ``[1e-12, 1e12]`` and one implicit-function Newton step for the derivative;
    ``0`` for ``w = inf`` and ``inf`` where no batch in the bracket is small enough."""
    lo0, hi0 = jnp.log(1e-12), jnp.log(1e12)
    w_c = jax.lax.stop_gradient(w)

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        noisy = problem.noise_weight(jnp.exp(mid)) > w_c  # still too much noise: go larger
        return jnp.where(noisy, mid, lo), jnp.where(noisy, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 120, bisect, (jnp.full_like(w_c, lo0), jnp.full_like(w_c, hi0)))
    b0 = jax.lax.stop_gradient(jnp.exp(hi))
    slope = jax.grad(lambda b: problem.noise_weight(b))(b0)
    b = b0 - (problem.noise_weight(b0) - w) / slope
    unreachable = problem.noise_weight(jnp.asarray(1e12, w_c.dtype)) > w_c
    return jnp.where(jnp.isinf(w_c), 0.0, jnp.where(unreachable, jnp.inf, b))


@eqx.filter_jit
def _stability_core(problem, step_sizes: StepArray, optimizer) -> StepArray:
    op = _noise_operator(problem)
    dtype = op.lam.dtype
    mu, alpha, beta = _update_coefficients(optimizer, dtype)

    def one(s):
        stable = _stable_blocks(op.lam, s, mu, alpha, beta)
        rho = op.rho(s, mu, alpha, beta)
        w_stab = jnp.where(rho > 0, 1.0 / jnp.where(rho > 0, rho, 1.0), jnp.inf)
        return jnp.where(stable, _invert_noise_weight(problem, w_stab), jnp.inf)

    return jax.vmap(one)(step_sizes.astype(dtype))


def stability_batch_at(problem, step_sizes: Float[Array, " k"], optimizer=None
                       ) -> Float[Array, " k"]:
    """``b_stab(s)`` at each of the step sizes ``s`` (the rates of ``optimizer`` are ignored; its
    momentum and Nesterov flag are used; ``None`` means plain SGD). See :func:`stability_batch`.

    Raises:
        ValueError: ``problem`` not quadratic, ``step_sizes`` not 1-D.
    """
    _check_quadratic(problem)
    s = jnp.asarray(step_sizes, problem.x0.dtype)
    if s.ndim != 1:
        raise ValueError(f"step_sizes: expected a 1-D array, got shape {s.shape}")
    opt = as_optimizer(None, 1.0) if optimizer is None else as_optimizer(optimizer, None)
    return _stability_core(problem, s, opt)


def stability_batch(
    problem,
    optimizer: AbstractOptimizer | None = None,
    steps: int | None = None,
    *,
    lr=None,
) -> Float[Array, " steps"]:
    """The smallest real batch size ``b_stab(s_k)`` above which the exact second-moment recursion
    of SGD (or heavy ball / Nesterov in the trace form) on a quadratic problem is mean-square
    stable at the step size ``s_k`` of each step (docs/theory.md §8, item 3; the recursions of
    docs/theory.md §5 and §7). Below it the expected loss grows geometrically whatever the start.

    ``b_stab = w^{-1}(w_stab)`` with ``w`` the problem's ``noise_weight`` and
    ``w_stab = 1 / rho((I - N)^{-1} C)`` (module docstring); ``inf`` where full-batch gradient
    descent itself is unstable at ``s_k`` (no batch helps), ``0`` where the noise never destabilises.
    Without replacement ``b_stab <= n`` (``w(n) = 0``). Differentiable in the problem's values,
    the rates and the momentum. ``optimal_schedule`` should keep ``b_k >= 2 b_stab(s_k)``.

    Args:
        problem: ``GaussianLinearRegression``, ``DiagonalGaussianRegression`` or
            ``LinearRegressionData``.
        optimizer: a ``js.SGD`` (momentum, Nesterov, scalar or per-step ``lr``).
        steps: the number of steps ``K`` (needed with a scalar ``lr``; with an lr schedule it
            must equal its length if given).
        lr: plain SGD at this constant rate, instead of ``optimizer``.

    Returns:
        ``(K,)`` array of ``b_stab(s_k)``, in the problem's dtype.

    Raises:
        ValueError: ``problem`` not quadratic; neither or both of ``lr`` and ``optimizer``;
            ``steps`` missing for a scalar rate or not matching the schedule.
    """
    _check_quadratic(problem)
    opt = as_optimizer(optimizer, lr)
    lr_arr = jnp.asarray(opt.lr)
    if steps is None:
        if lr_arr.ndim == 0:
            raise ValueError("steps: needed with a constant learning rate")
        steps = lr_arr.shape[0]
    steps = _steps(steps, minimum=1)
    rates = opt.step_sizes(steps)
    if lr_arr.ndim == 0:  # one rate: solve once
        return jnp.broadcast_to(_stability_core(problem, rates[:1], opt), (steps,))
    return _stability_core(problem, rates, opt)
