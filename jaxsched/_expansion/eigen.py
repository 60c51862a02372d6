"""Eigenbasis sensitivity for quadratic problems (theory 5): O(d) per time point for Gaussian
features, exact quadrature of the per-step integrals."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._problem.linear import DiagonalGaussianRegression, GaussianLinearRegression, LinearRegressionData
from .._types import Array, Float, Scalar, StepArray, Vector
from . import moments as ex

# Elements of one intermediate array in the eigen path; bounds memory for large d or n.
_EIGEN_BLOCK_ELEMENTS = 2**20

# ------------------------------------------------------------------------------------------------
# eigen path (quadratic problems)


class _Eigen(NamedTuple):
    """A quadratic problem in the eigenbasis of its Hessian ``S``: ``z(t) = e^{-lam t} z0``.

    For a finite data set (theory 5.3, ``A~ = F U`` the rotated features, ``r^ = F x^ - y``),
    ``features``/``residuals`` are set, and when ``d^2 <= n`` also the coefficients of
    ``(U^T Sigma U)_ii = z^T Q_i z + 2 L_i . z + C_i`` (``None`` otherwise; all ``None`` for
    Gaussian features)."""

    lam: Vector
    z0: Vector
    noise_var: Scalar | None = None
    features: Float[Array, "n d"] | None = None
    residuals: Float[Array, " n"] | None = None
    quad: Float[Array, "d d d"] | None = None  # Q_ijl
    lin: Float[Array, "d d"] | None = None  # L_ij
    const: Float[Array, " d"] | None = None  # C_i


def _eigen_form(problem) -> _Eigen:
    if isinstance(problem, DiagonalGaussianRegression):
        return _Eigen(problem.eigenvalues, problem.x0, problem.noise_var)
    if isinstance(problem, GaussianLinearRegression):
        lam, U = jnp.linalg.eigh(problem.cov)
        return _Eigen(lam, U.T @ (problem.x0 - problem.x_star), problem.noise_var)
    F, y = problem.features, problem.targets
    n, d = F.shape
    lam, U = jnp.linalg.eigh(F.T @ F / n)
    # The Gram matrix is PSD; eigh may return -1e-17 for a zero eigenvalue.
    lam = jnp.maximum(lam, 0.0)
    x_hat = jnp.linalg.lstsq(F, y)[0]  # minimum-norm least squares: singular S is fine
    A, r = F @ U, F @ x_hat - y
    e = _Eigen(lam, U.T @ (problem.x0 - x_hat), None, A, r)
    if d * d > n:
        return e
    # mean_k r_k(z)^2 A~_ki^2 is a quadratic form in z: O(d^3) per time point instead of O(n d).
    # With g~ = G z + c (G = A~^T A~ / n, c = A~^T r^ / n): the diagonal of U^T Sigma U is
    # z^T Q_i z + 2 L_i . z + C_i, with Q_i = mean_k A~_ki^2 A~_k A~_k^T - G_i G_i^T, etc.
    A2 = A**2
    G = A.T @ A / n
    c = A.T @ r / n
    quad = jnp.einsum("kj,kl,ki->ijl", A, A, A2) / n - G[:, :, None] * G[:, None, :]
    lin = (A2 * r[:, None]).T @ A / n - c[:, None] * G
    return e._replace(quad=quad, lin=lin, const=(r**2) @ A2 / n - c**2)


def _eigen_phi(e: _Eigen, z: Float[Array, "m d"], decay: Float[Array, "m d"]) -> Float[Array, " m"]:
    """``phi(t) = tr(Lam(t) Sigma(x(t)))`` at ``m`` time points from ``z(t)`` (the eigenbasis
    coordinates of ``x(t) - x_ref``) and ``decay = e^{-2 lam (T - t)}``: ``Lam(t) = (1/2)
    e^{-S(T-t)} S e^{-S(T-t)}`` is diagonal in the eigenbasis (theory 4, quadratic ``f``, ``F = f``)."""
    lam = e.lam
    if e.features is None:
        # Theory 5.1: (1/2) sum_i lam_i^2 E_i (lam_i z_i^2 + s2) + (1/2)(sum_i lam_i^2 E_i)(sum_j
        # lam_j z_j^2): two O(d) sums per time point.
        z2 = z**2
        w = lam**2 * decay
        own = jnp.sum(w * (lam * z2 + e.noise_var), axis=-1)
        return 0.5 * own + 0.5 * jnp.sum(w, axis=-1) * jnp.sum(lam * z2, axis=-1)
    # Theory 5.3: Sigma = mean_k r_k^2 a_k a_k^T - g g^T; in the eigenbasis only its diagonal is
    # needed: mean_k r_k^2 A~_ki^2 - g~_i^2 with r(t) = A~ z(t) + r^.
    A = e.features
    n = A.shape[0]
    r = z @ A.T + e.residuals
    g = r @ A / n
    second = (r**2) @ (A**2) / n
    return 0.5 * jnp.sum(lam * decay * (second - g**2), axis=-1)


def _quadrature_phi(e: _Eigen, lr: Scalar, steps: int, nodes: int, batch: int) -> StepArray:
    """``phi_k`` by a ``nodes``-point Gauss-Legendre rule on each step (``O(nodes d)`` per step
    for Gaussian features, ``O(nodes n d)`` for a data set)."""
    lam, z0 = e.lam, e.z0
    dtype = lam.dtype
    xi, wq = np.polynomial.legendre.leggauss(nodes)
    xi = jnp.asarray((1.0 + xi) / 2.0, dtype)  # nodes on [0, 1]
    wq = jnp.asarray(wq / 2.0, dtype)
    # At node t = h (k + xi_j): z(t) = z0 e^{-lam h k} e^{-lam h xi_j} and
    # e^{-2 lam (T - t)} = e^{-2 lam h (K - k - 1)} e^{-2 lam h (1 - xi_j)}. Factoring the
    # exponentials into per-step and per-node parts (every exponent <= 0, so nothing overflows)
    # costs 2 d exponentials per step instead of 2 d per node.
    node_z = jnp.exp(-lr * xi[:, None] * lam)
    node_decay = jnp.exp(-2.0 * lr * (1.0 - xi[:, None]) * lam)

    def one_step(k):
        z = (z0 * jnp.exp(-lr * k * lam)) * node_z
        decay = jnp.exp(-2.0 * lr * (steps - k - 1) * lam) * node_decay
        return lr * jnp.sum(wq * _eigen_phi(e, z, decay))

    # Steps evaluated at once, so that (vmapped batch) x steps x nodes x width stays bounded.
    width = lam.shape[0] if e.features is None else max(e.features.shape)
    block = int(max(1, min(steps, _EIGEN_BLOCK_ELEMENTS // (batch * nodes * width))))
    return jax.lax.map(one_step, jnp.arange(steps, dtype=dtype), batch_size=block)


def _phi1(x: Array) -> Array:
    """``(e^x - 1) / x`` (``= 1`` at 0) via ``expm1``, with a series near 0."""
    small = jnp.abs(x) < 1e-5
    safe = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 + x / 2.0 + x**2 / 6.0, jnp.expm1(safe) / safe)


def _moment_sums_phi(e: _Eigen, lr: Scalar, steps: int, block: int) -> StepArray:
    """Exact ``phi_k`` for a finite data set with ``d^2 <= n`` (theory 5.3): ``phi(t)`` is a sum
    of exponentials ``(1/2) lam_i e^{-2 lam_i (T - t)} Q_ijl z0_j z0_l e^{-(lam_j + lam_l) t}``
    (and the linear and constant terms), each integrated exactly over the step:

        int_{kh}^{(k+1)h} e^{-2 lam_i (T - t) - b t} dt
            = e^{-2 lam_i h (K - k)} e^{-b h k} h phi1((2 lam_i - b) h).

    The first two factors are per-step exponentials of the eigenvalues (exponents <= 0), the last
    is per configuration, so each step costs ``O(d^3)`` multiply-adds and no quadrature error."""
    lam, z0 = e.lam, e.z0
    rate = 2.0 * lam[:, None, None] - lam[None, :, None] - lam[None, None, :]
    quad = e.quad * (lr * _phi1(rate * lr)) * z0[None, :, None] * z0[None, None, :]
    lin = 2.0 * e.lin * (lr * _phi1((2.0 * lam[:, None] - lam[None, :]) * lr)) * z0[None, :]
    const = e.const * lr * _phi1(2.0 * lam * lr)
    d = lam.shape[0]

    def one_step(k):
        a = jnp.exp(-lr * k * lam)  # e^{-lam_j h k}
        c = 0.5 * lam * jnp.exp(-2.0 * lr * (steps - k) * lam)
        inner = (quad.reshape(d, d * d) @ (a[:, None] * a[None, :]).reshape(-1)
                 + lin @ a + const)
        return jnp.dot(c, inner)

    return jax.lax.map(one_step, jnp.arange(steps, dtype=lam.dtype), batch_size=block)


def _eigen_parts(problem, lr: Scalar, steps: int, nodes: int, batch: int = 1) -> ex.FirstOrderParts:
    e = _eigen_form(problem)
    lam, z0 = e.lam, e.z0
    T = lr * steps
    d = lam.shape[0]
    if e.quad is not None:
        block = int(max(1, min(steps, _EIGEN_BLOCK_ELEMENTS // (batch * d * d))))
        phi = _moment_sums_phi(e, lr, steps, block)
    else:
        phi = _quadrature_phi(e, lr, steps, nodes, batch)
    zT = z0 * jnp.exp(-lam * T)
    if e.features is None:
        base = 0.5 * jnp.sum(lam * zT**2) + 0.5 * e.noise_var
    else:
        base = 0.5 * jnp.mean((e.features @ zT + e.residuals) ** 2)
    # grad F(x_T) . mc_T with mc' = -S mc - (1/2) S grad f resonant in each eigendirection
    # (theory 3; the same closed form as _linreg.gaussian_correction).
    correction = -0.5 * jnp.sum(lam**3 * z0**2 * T * jnp.exp(-2.0 * lam * T))
    return ex.FirstOrderParts(phi=phi, base_loss=base, correction=correction, x_final=zT)


def _supports_eigen(problem) -> bool:
    return isinstance(
        problem, (DiagonalGaussianRegression, GaussianLinearRegression, LinearRegressionData)
    )


def _check_nodes(nodes) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) or nodes < 1:
        raise ValueError(f"nodes: must be a Python int >= 1, got {nodes!r}")
    return int(nodes)


@eqx.filter_jit
def _eigen_parts_core(problem, lr, steps, nodes):
    return _eigen_parts(problem, lr, steps, nodes)


def eigen_first_order_parts(problem, *, lr, steps: int, nodes: int = 8) -> ex.FirstOrderParts:
    """``phi_k``, ``F(x_T)`` and the drift correction of a quadratic problem in the eigenbasis of
    its Hessian (theory 4, 5.1, 5.3), so that ``E F(x_K) ~ base_loss + lr * (correction +
    sum_k phi_k w(b_k))`` as for :func:`jaxsched.first_order_parts`.

    ``Lam(t) = (1/2) e^{-S(T-t)} S e^{-S(T-t)}`` is diagonal in the eigenbasis, so
    ``phi(t) = (1/2) sum_i lam_i e^{-2 lam_i (T - t)} (U^T Sigma(x(t)) U)_ii``. Three routes:

    - Gaussian features: the diagonal is ``lam_i^2 z_i^2 + lam_i (sum_j lam_j z_j^2 + s2)``,
      ``O(d)`` per time point; ``phi_k`` by a ``nodes``-point Gauss-Legendre rule per step.
      ``phi`` is a sum of exponentials with rates at most ``2 lam_max``; at
      ``lr * lam_max <= 2`` (the stability limit of gradient descent) the relative quadrature
      error of 8 nodes is below ``1e-12``. Cost ``O(steps * nodes * d)``.
    - A data set with ``d^2 <= n``: the diagonal is a quadratic in ``z(t)``; every term is an
      exponential in ``t``, integrated exactly per step: ``O(steps * d^3)``, no quadrature error.
    - A data set with ``d^2 > n``: ``mean_k r_k(t)^2 A~_ki^2 - g~_i^2`` with the residuals
      ``r(t)``, Gauss-Legendre as above: ``O(steps * nodes * n d)``.

    Plus one ``eigh`` (``O(d^3)``) per problem, unless it is a :class:`DiagonalGaussianRegression`
    (then ``d = 10^4`` takes well under a second).

    Args:
        problem: ``DiagonalGaussianRegression``, ``GaussianLinearRegression`` or
            ``LinearRegressionData`` (the terminal functional is ``f``).
        lr: learning rate ``h > 0``.
        steps: number of steps ``K`` (Python int).
        nodes: Gauss-Legendre nodes per step (Python int).

    Returns:
        A :class:`jaxsched.FirstOrderParts` (``x_final`` holds ``x_T - x_ref`` in the eigenbasis).

    Raises:
        ValueError: naming the argument, for another problem type, ``lr <= 0``, bad ``steps`` or
            ``nodes``.
    """
    if not _supports_eigen(problem):
        raise ValueError(
            "problem: the eigen path needs DiagonalGaussianRegression, GaussianLinearRegression or "
            f"LinearRegressionData, got {type(problem).__name__}"
        )
    steps = ex.check_steps(steps)
    nodes = _check_nodes(nodes)
    lr = ex.as_positive_scalar("lr", lr).astype(problem.x0.dtype)
    return _eigen_parts_core(problem, lr, steps, nodes)


def _diagonal_exact(e: _Eigen, w: StepArray, lr: Scalar) -> Scalar:
    """Exact ``E f(x_K)`` of SGD for Gaussian features in the eigenbasis (theory 5.2): with
    ``S`` diagonal the diagonal ``m_i = M_ii`` obeys a closed recursion,
    ``m_i' = (1 - h lam_i)^2 m_i + h^2 w (lam_i^2 m_i + lam_i (sum_j lam_j m_j + s2))``, ``O(d)``
    per step."""
    lam, s2 = e.lam, e.noise_var
    contraction = (1.0 - lr * lam) ** 2

    def step(m, wk):
        noise = lam**2 * m + lam * (jnp.sum(lam * m) + s2)
        return contraction * m + lr**2 * wk * noise, None

    m, _ = jax.lax.scan(step, e.z0**2, w)
    return 0.5 * jnp.sum(lam * m) + 0.5 * s2


