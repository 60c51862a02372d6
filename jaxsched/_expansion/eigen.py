"""Eigenbasis sensitivity for quadratic problems (theory 5): O(d) per time point for Gaussian
features, exact quadrature of the per-step integrals."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import exprel
from .._optimizer import SGD
from .._problem.linear import EigenForm
from .._solution import RESULTS
from .._types import Array, Float, Scalar, StepArray
from . import _common as cm
from .sensitivity import AbstractSensitivity, FirstOrderParts, first_order_parts

# Elements of one intermediate array in the eigen path; bounds memory for large d or n.
_EIGEN_BLOCK_ELEMENTS = 2**20

# ------------------------------------------------------------------------------------------------
# eigen path (quadratic problems)


_Eigen = EigenForm  # the eigen form lives on the problems (``problem.eigen_form()``)


def _eigen_form(problem) -> EigenForm:
    return problem.eigen_form()


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


def _remaining(s: StepArray) -> StepArray:
    """``T - t_{k+1} = sum_{j > k} s_j`` by a reverse cumulative sum (no cancellation near T)."""
    return jnp.cumsum(s[::-1])[::-1] - s


def _quadrature_phi(e: EigenForm, s: StepArray, constant: bool, nodes: int, batch: int) -> StepArray:
    """``phi_k`` by a ``nodes``-point Gauss-Legendre rule on each step (``O(nodes d)`` per step
    for Gaussian features, ``O(nodes n d)`` for a data set), in intrinsic time ``t_k = sum_{j<k}
    s_j``."""
    lam, z0 = e.lam, e.z0
    dtype = lam.dtype
    steps = s.shape[0]
    xi, wq = np.polynomial.legendre.leggauss(nodes)
    xi = jnp.asarray((1.0 + xi) / 2.0, dtype)  # nodes on [0, 1]
    wq = jnp.asarray(wq / 2.0, dtype)
    t_start = jnp.cumsum(s) - s
    rem = _remaining(s)
    # At node t = t_k + s_k xi_j: z(t) = z0 e^{-lam t_k} e^{-lam s_k xi_j} and
    # e^{-2 lam (T - t)} = e^{-2 lam (T - t_{k+1})} e^{-2 lam s_k (1 - xi_j)}: per-step and per-node
    # factors, every exponent <= 0, so nothing overflows. At a constant step size the per-node
    # factors are computed once.
    def node_factors(sk):
        return jnp.exp(-sk * xi[:, None] * lam), jnp.exp(-2.0 * sk * (1.0 - xi[:, None]) * lam)

    shared = node_factors(s[0]) if constant else None

    def one_step(k):
        node_z, node_decay = shared if constant else node_factors(s[k])
        z = (z0 * jnp.exp(-t_start[k] * lam)) * node_z
        decay = jnp.exp(-2.0 * rem[k] * lam) * node_decay
        return s[k] * jnp.sum(wq * _eigen_phi(e, z, decay))

    # Steps evaluated at once, so that (vmapped batch) x steps x nodes x width stays bounded.
    width = lam.shape[0] if e.features is None else max(e.features.shape)
    block = int(max(1, min(steps, _EIGEN_BLOCK_ELEMENTS // (batch * nodes * width))))
    return jax.lax.map(one_step, jnp.arange(steps), batch_size=block)


def _moment_sums_phi(e: EigenForm, s: StepArray, constant: bool, block: int) -> StepArray:
    """Exact ``phi_k`` for a finite data set with ``d^2 <= n`` (docs/theory.md §5.3): ``phi(t)`` is
    a sum of exponentials ``(1/2) lam_i e^{-2 lam_i (T - t)} Q_ijl z0_j z0_l e^{-(lam_j + lam_l) t}``
    (and the linear and constant terms), each integrated exactly over the step:

        int_{t_k}^{t_k + s_k} e^{-2 lam_i (T - t) - b t} dt
            = e^{-2 lam_i (T - t_k)} e^{-b t_k} s_k phi1((2 lam_i - b) s_k).

    The first two factors are per-step exponentials of the eigenvalues (exponents <= 0), the last
    depends on the step size only (computed once at a constant rate), so each step costs ``O(d^3)``
    and there is no quadrature error."""
    lam, z0 = e.lam, e.z0
    steps = s.shape[0]
    d = lam.shape[0]
    rate = 2.0 * lam[:, None, None] - lam[None, :, None] - lam[None, None, :]
    rate_lin = 2.0 * lam[:, None] - lam[None, :]
    zz = z0[None, :, None] * z0[None, None, :]

    def coefficients(sk):
        quad = e.quad * (sk * exprel(rate * sk)) * zz
        lin = 2.0 * e.lin * (sk * exprel(rate_lin * sk)) * z0[None, :]
        const = e.const * sk * exprel(2.0 * lam * sk)
        return quad.reshape(d, d * d), lin, const

    shared = coefficients(s[0]) if constant else None
    t_start = jnp.cumsum(s) - s
    rem = _remaining(s) + s  # T - t_k

    def one_step(k):
        quad, lin, const = shared if constant else coefficients(s[k])
        a = jnp.exp(-t_start[k] * lam)  # e^{-lam_j t_k}
        c = 0.5 * lam * jnp.exp(-2.0 * rem[k] * lam)
        inner = quad @ (a[:, None] * a[None, :]).reshape(-1) + lin @ a + const
        return jnp.dot(c, inner)

    return jax.lax.map(one_step, jnp.arange(steps), batch_size=block)


def eigen_parts(problem, units: cm.StepUnits, steps: int, nodes: int, batch: int = 1) -> FirstOrderParts:
    """The :class:`FirstOrderParts` of a quadratic problem in its eigenbasis (traced)."""
    e = problem.eigen_form()
    lam, z0 = e.lam, e.z0
    s = units.s
    T = jnp.sum(s)
    d = lam.shape[0]
    if e.quad is not None:
        block = int(max(1, min(steps, _EIGEN_BLOCK_ELEMENTS // (batch * d * d))))
        phi = _moment_sums_phi(e, s, units.constant, block)
    else:
        phi = _quadrature_phi(e, s, units.constant, nodes, batch)
    zT = z0 * jnp.exp(-lam * T)
    if e.features is None:
        base = 0.5 * jnp.sum(lam * zT**2) + 0.5 * e.noise_var
    else:
        base = 0.5 * jnp.mean((e.features @ zT + e.residuals) ** 2)
    # grad F(x_T) . mc_T with mc' = -S mc - (1/2)(1 + 2L) s(t) S grad f, resonant in each
    # eigendirection (docs/theory.md §3, §7): int_0^T s dt = sum_k s_k^2; plus the momentum lag.
    drift = (-0.5 * units.drift_factor * jnp.sum(s * s)
             * jnp.sum(lam**3 * z0**2 * jnp.exp(-2.0 * lam * T)))
    drift = drift + units.lag * jnp.sum((lam * zT) ** 2)
    return FirstOrderParts(phi=phi, base_loss=base, correction=drift / units.mean_step, step_sizes=s,
                           phi_stderr=jnp.zeros_like(phi), result=RESULTS.successful,
                           x_final=e.to_parameters(zT))


def _eigen_parts(problem, lr: Scalar, steps: int, nodes: int, batch: int = 1) -> FirstOrderParts:
    """Plain SGD at the constant rate ``lr`` (the sweep's entry)."""
    units = cm.step_units(SGD(lr), steps, problem.x0.dtype)
    return eigen_parts(problem, units, steps, nodes, batch)


def _supports_eigen(problem) -> bool:
    return problem.is_quadratic


def _check_nodes(nodes) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) or nodes < 1:
        raise ValueError(f"nodes: must be a Python int >= 1, got {nodes!r}")
    return int(nodes)


class Eigenbasis(AbstractSensitivity):
    """The sensitivity of a quadratic problem in the eigenbasis of its Hessian (docs/theory.md §4,
    §5.1, §5.3): ``Lam(t) = (1/2) e^{-S(T-t)} S e^{-S(T-t)}`` is diagonal there, so
    ``phi(t) = (1/2) sum_i lam_i e^{-2 lam_i (T - t)} (U^T Sigma(x(t)) U)_ii``. Three routes:

    - Gaussian features: the diagonal is ``lam_i^2 z_i^2 + lam_i (sum_j lam_j z_j^2 + s2)``,
      ``O(d)`` per time point; ``phi_k`` by a ``nodes``-point Gauss-Legendre rule per step.
      ``phi`` is a sum of exponentials with rates at most ``2 lam_max``; at
      ``s lam_max <= 2`` (the stability limit of gradient descent) the relative quadrature
      error of 8 nodes is below ``1e-12``. Cost ``O(steps * nodes * d)``.
    - A data set with ``d^2 <= n``: the diagonal is a quadratic in ``z(t)``; every term is an
      exponential in ``t``, integrated exactly per step: ``O(steps * d^3)``, no quadrature error.
    - A data set with ``d^2 > n``: ``mean_k r_k(t)^2 A~_ki^2 - g~_i^2`` with the residuals
      ``r(t)``, Gauss-Legendre as above: ``O(steps * nodes * n d)``.

    Plus one ``eigh`` (``O(d^3)``) per problem, unless it is a :class:`DiagonalGaussianRegression`
    (then ``d = 10^4`` takes well under a second). Closed forms in the learning rate: gradients in
    ``lr`` need no ODE solve.

    Args:
        nodes: Gauss-Legendre nodes per step (Python int, default 8).
    """

    nodes: int = eqx.field(static=True, default=8)

    def __post_init__(self):
        _check_nodes(self.nodes)

    def check(self, problem, optimizer) -> None:
        if not problem.is_quadratic:
            raise ValueError(
                "method: the eigenbasis sensitivity needs a quadratic problem (linear regression), "
                f"got {type(problem).__name__}; use js.DenseAdjoint() or js.MatrixFree()")

    def parts(self, problem, units, steps, rtol, atol, solver) -> FirstOrderParts:
        return eigen_parts(problem, units, steps, self.nodes)


def eigen_first_order_parts(problem, *, lr, steps: int, nodes: int = 8) -> FirstOrderParts:
    """``first_order_parts(problem, lr=lr, steps=steps, method=Eigenbasis(nodes))`` (kept for
    backward compatibility; ``x_final`` holds ``x_T - x_ref`` in the eigenbasis)."""
    return first_order_parts(problem, lr=lr, steps=steps, method=Eigenbasis(_check_nodes(nodes)))


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


