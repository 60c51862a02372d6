"""Linear regression problems (docs/theory.md §5): Gaussian features and finite data."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import _as_float_array, _is_concrete
from .._types import Array, Float, Matrix, Scalar, Vector
from .base import AbstractFiniteDataProblem, AbstractOnlineProblem, AbstractQuadraticProblem


class EigenForm(NamedTuple):
    """A quadratic problem in the eigenbasis of its Hessian ``S = U diag(lam) U^T``:
    ``z(t) = e^{-lam t} z0`` on the gradient-flow path (docs/theory.md §5).

    For Gaussian features ``noise_var`` is set; for a finite data set (§5.3, ``A~ = F U`` the
    rotated features, ``r^ = F x^ - y``) ``features``/``residuals`` are set, and when ``d^2 <= n``
    also the coefficients of ``(U^T Sigma U)_ii = z^T Q_i z + 2 L_i . z + C_i``."""

    lam: Vector
    z0: Vector
    noise_var: Scalar | None = None
    features: Float[Array, "n d"] | None = None
    residuals: Float[Array, " n"] | None = None
    quad: Float[Array, "d d d"] | None = None  # Q_ijl
    lin: Float[Array, "d d"] | None = None  # L_ij
    const: Float[Array, " d"] | None = None  # C_i
    basis: Matrix | None = None  # U (None: the problem is already diagonal)
    offset: Vector | None = None  # x_ref, so that x = x_ref + U z

    def to_parameters(self, z: Vector) -> Vector:
        """The parameter vector ``x = x_ref + U z`` of eigen coordinates ``z``."""
        x = z if self.basis is None else self.basis @ z
        return x if self.offset is None else x + self.offset


class MomentModel(NamedTuple):
    """A quadratic problem in the centred variable ``v = x - x_ref`` for the exact recursions
    (docs/theory.md §5.2, §5.3, §7): ``E[g|v] = S v + cbar``, ``E f = tr(S M)/2 + cbar . mu + const``,
    and ``noise(mu, M) = E[Sigma(v)]`` for ``E v = mu``, ``E v v^T = M``."""

    hess: Matrix
    offset: Vector
    v0: Vector
    const: Scalar
    noise: Callable[[Vector, Matrix], Matrix]


def _gaussian_sample_gradient(x_minus_star, chol_or_sqrt_diag, noise_var, key, diagonal: bool):
    d = x_minus_star.shape[0]
    z = jax.random.normal(key, (d + 1,), x_minus_star.dtype)
    a = chol_or_sqrt_diag * z[:-1] if diagonal else chol_or_sqrt_diag @ z[:-1]
    # y = a . x_star + e, loss (a . x - y)^2 / 2, gradient a (a . (x - x_star) - e)
    return a * (jnp.dot(a, x_minus_star) - jnp.sqrt(noise_var) * z[-1])


def _check_square_spd(name: str, cov: Array) -> Array:
    """``cov`` after checking it is a symmetric positive definite square matrix: eagerly (a
    ValueError naming ``name``) when concrete, with ``eqx.error_if`` when traced."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{name}: expected a square (d, d) matrix, got shape {cov.shape}")
    if not _is_concrete(cov):
        scale = jnp.max(jnp.abs(cov))
        asym = jnp.max(jnp.abs(cov - cov.T)) > 1e-10 * scale
        cov = eqx.error_if(cov, asym, f"{name}: must be symmetric")
        low = jnp.linalg.eigvalsh(0.5 * (cov + cov.T))[0] <= 1e-12 * scale
        return eqx.error_if(cov, low, f"{name}: must be positive definite")
    c = np.asarray(cov, dtype=np.float64)
    scale = max(float(np.max(np.abs(c))), np.finfo(np.float64).tiny)
    if np.max(np.abs(c - c.T)) > 1e-10 * scale:
        raise ValueError(f"{name}: must be symmetric")
    eig = np.linalg.eigvalsh(0.5 * (c + c.T))
    if eig[0] <= 1e-12 * scale:
        raise ValueError(f"{name}: must be positive definite (smallest eigenvalue {eig[0]:.3g})")
    return cov


def _check_nonnegative(name: str, value: Array) -> Array:
    """A scalar ``>= 0``: eagerly when concrete, with ``eqx.error_if`` when traced."""
    if _is_concrete(value):
        if float(np.asarray(value)) < 0:
            raise ValueError(f"{name}: must be >= 0, got {float(value)}")
        return value
    return eqx.error_if(value, value < 0, f"{name}: must be >= 0")


class GaussianLinearRegression(AbstractQuadraticProblem, AbstractOnlineProblem):
    """Least squares with Gaussian features (docs/theory.md §5.1): ``a ~ N(0, cov)``, ``y = a . x_star + e``,
    ``e ~ N(0, noise_var)``. Then ``f(x) = v^T S v / 2 + s2 / 2`` with ``v = x - x_star`` and

        Sigma(x) = S v v^T S + (v^T S v) S + s2 S.

    Args:
        cov: ``(d, d)`` symmetric positive definite feature covariance ``S``.
        x_star: ``(d,)`` true parameter.
        x0: ``(d,)`` initial parameter.
        noise_var: label noise variance ``s2 >= 0``.

    Raises:
        ValueError: naming the argument, for wrong shapes, a non-symmetric or indefinite ``cov``,
            NaN/inf entries or a negative ``noise_var``.
    """

    cov: Matrix
    x_star: Vector
    x0: Vector
    noise_var: Scalar

    def __init__(self, cov, x_star, x0, noise_var=0.0):
        self.cov = _as_float_array("cov", cov, ndim=2)
        self.cov = _check_square_spd("cov", self.cov)
        d = self.cov.shape[0]
        self.x_star = _as_float_array("x_star", x_star, ndim=1)
        self.x0 = _as_float_array("x0", x0, ndim=1)
        for name, v in (("x_star", self.x_star), ("x0", self.x0)):
            if v.shape != (d,):
                raise ValueError(f"{name}: expected shape ({d},) to match cov, got {v.shape}")
        self.noise_var = _check_nonnegative("noise_var", _as_float_array("noise_var", noise_var, ndim=0))

    def value(self, x):
        v = x - self.x_star
        return 0.5 * v @ self.cov @ v + 0.5 * self.noise_var

    def gradient(self, x):
        return self.cov @ (x - self.x_star)

    def hessian(self, x):
        return self.cov

    def covariance(self, x):
        Sv = self.cov @ (x - self.x_star)
        return jnp.outer(Sv, Sv) + (jnp.dot(x - self.x_star, Sv) + self.noise_var) * self.cov

    def sample_gradient(self, x, key):
        """Gradient of one fresh example's loss ``(a . x - y)^2 / 2`` at ``x``."""
        return _gaussian_sample_gradient(x - self.x_star, jnp.linalg.cholesky(self.cov), self.noise_var,
                                         key, diagonal=False)

    def moment_model(self) -> MomentModel:
        S = self.cov
        s2 = self.noise_var

        def noise(mu, M):
            # E[Sigma(v)] = S M S + tr(S M) S + s2 S  (§5.2; Isserlis for the Gaussian 4th moment)
            SM = S @ M
            return SM @ S + (jnp.trace(SM) + s2) * S

        v0 = self.x0 - self.x_star
        return MomentModel(S, jnp.zeros_like(v0), v0, 0.5 * s2, noise)

    def eigen_form(self) -> EigenForm:
        lam, U = jnp.linalg.eigh(self.cov)
        return EigenForm(lam, U.T @ (self.x0 - self.x_star), self.noise_var, basis=U,
                         offset=self.x_star)


class LinearRegressionData(AbstractQuadraticProblem, AbstractFiniteDataProblem):
    """Least squares on a finite data set sampled uniformly (docs/theory.md §5.3):
    ``f(x) = mean_i (a_i . x - y_i)^2 / 2`` and ``Sigma(x) = mean_i g_i g_i^T - grad f grad f^T`` with
    ``g_i = a_i (a_i . x - y_i)``, computed in ``O(n d^2)`` without building ``n`` matrices.

    Args:
        features: ``(n, d)`` design matrix (rows ``a_i``).
        targets: ``(n,)`` targets ``y_i``.
        x0: ``(d,)`` initial parameter.
        replace: sample with replacement (default) or without replacement inside a step, in which
            case ``Cov[g_k] = Sigma (n - b) / (b (n - 1))``.

    Raises:
        ValueError: naming the argument, for mismatched shapes or NaN/inf entries.
    """

    features: Float[Array, "n d"]
    targets: Float[Array, " n"]
    x0: Vector
    replace: bool = eqx.field(static=True)

    def __init__(self, features, targets, x0=None, replace: bool = True):
        self.features = _as_float_array("features", features, ndim=2)
        n, d = self.features.shape
        if n < 2:
            raise ValueError(f"features: need at least 2 examples, got {n}")
        self.targets = _as_float_array("targets", targets, ndim=1)
        if self.targets.shape != (n,):
            raise ValueError(f"targets: expected shape ({n},) to match features, got {self.targets.shape}")
        x0 = jnp.zeros(d, self.features.dtype) if x0 is None else x0
        self.x0 = _as_float_array("x0", x0, ndim=1)
        if self.x0.shape != (d,):
            raise ValueError(f"x0: expected shape ({d},) to match features, got {self.x0.shape}")
        if not isinstance(replace, bool):
            raise ValueError(f"replace: must be a bool, got {replace!r}")
        self.replace = replace

    @property
    def num_examples(self) -> int:
        return self.features.shape[0]

    @property
    def gram(self) -> Matrix:
        """``S = mean_i a_i a_i^T``, the (constant) Hessian."""
        return self.features.T @ self.features / self.num_examples

    def residuals(self, x: Vector) -> Float[Array, " n"]:
        return self.features @ x - self.targets

    def value(self, x):
        return 0.5 * jnp.mean(self.residuals(x) ** 2)

    def gradient(self, x):
        return self.features.T @ self.residuals(x) / self.num_examples

    def hessian(self, x):
        return self.gram

    def covariance(self, x):
        r = self.residuals(x)
        g = self.features.T @ r / self.num_examples
        second = (self.features * (r**2)[:, None]).T @ self.features / self.num_examples
        return second - jnp.outer(g, g)

    def per_example_gradients(self, x, idx):
        a = self.features[idx]
        return a * (a @ x - self.targets[idx])[:, None]

    def moment_model(self) -> MomentModel:
        F, y = self.features, self.targets
        n = self.num_examples
        S = F.T @ F / n
        # Least squares via SVD: the minimum-norm solution, so a singular S is fine.
        x_hat = jnp.linalg.lstsq(F, y)[0]
        r = F @ x_hat - y
        cbar = F.T @ r / n  # zero up to rounding (normal equations); kept so the recursion is exact

        def noise(mu, M):
            # Q = mean_i E[g_i g_i^T] with g_i = a_i (a_i . v + r_i):
            #   a_i a_i^T (q_i + 2 (a_i . mu) r_i + r_i^2), q_i = a_i^T M a_i  -> O(n d^2), no n matrices
            q = jnp.sum((F @ M) * F, axis=1)
            weights = q + 2.0 * (F @ mu) * r + r**2
            Q = (F * weights[:, None]).T @ F / n
            Smu = S @ mu
            mean_outer = S @ M @ S + jnp.outer(Smu, cbar) + jnp.outer(cbar, Smu) + jnp.outer(cbar, cbar)
            return Q - mean_outer

        return MomentModel(S, cbar, self.x0 - x_hat, 0.5 * jnp.mean(r**2), noise)

    def eigen_form(self) -> EigenForm:
        F, y = self.features, self.targets
        n, d = F.shape
        lam, U = jnp.linalg.eigh(F.T @ F / n)
        # The Gram matrix is PSD; eigh may return -1e-17 for a zero eigenvalue.
        lam = jnp.maximum(lam, 0.0)
        x_hat = jnp.linalg.lstsq(F, y)[0]  # minimum-norm least squares: singular S is fine
        A, r = F @ U, F @ x_hat - y
        e = EigenForm(lam, U.T @ (self.x0 - x_hat), None, A, r, basis=U, offset=x_hat)
        if d * d > n:
            return e
        # mean_k r_k(z)^2 A~_ki^2 is a quadratic form in z: O(d^3) per time point instead of
        # O(n d). With g~ = G z + c (G = A~^T A~ / n, c = A~^T r^ / n): the diagonal of U^T Sigma U
        # is z^T Q_i z + 2 L_i . z + C_i, with Q_i = mean_k A~_ki^2 A~_k A~_k^T - G_i G_i^T, etc.
        A2 = A**2
        G = A.T @ A / n
        c = A.T @ r / n
        quad = jnp.einsum("kj,kl,ki->ijl", A, A, A2) / n - G[:, :, None] * G[:, None, :]
        lin = (A2 * r[:, None]).T @ A / n - c[:, None] * G
        return e._replace(quad=quad, lin=lin, const=(r**2) @ A2 / n - c**2)


class DiagonalGaussianRegression(AbstractQuadraticProblem, AbstractOnlineProblem):
    """Gaussian linear regression (docs/theory.md §5.1) written in the eigenbasis of its feature
    covariance: ``S = diag(eigenvalues)``, ``x_star = 0``, ``x0 = v0`` (the coordinates of
    ``x0 - x_star`` in the eigenbasis). Storage and the eigen path cost ``O(d)``, so ``d = 10^4``
    is cheap; the dense methods (``hessian``, ``covariance``) build ``d x d`` matrices and exist so
    that every other jaxsched function accepts it.

    Args:
        eigenvalues: ``(d,)`` eigenvalues ``lam_i > 0`` of ``S``.
        v0: ``(d,)`` initial offset from the optimum, in the eigenbasis.
        noise_var: label noise variance ``s2 >= 0``.

    Raises:
        ValueError: naming the argument, for wrong shapes, NaN/inf, non-positive eigenvalues or
            negative ``noise_var`` (eagerly when concrete; under a trace ``eqx.error_if`` raises at run time).
    """

    eigenvalues: Vector
    x0: Vector
    noise_var: Scalar

    def __init__(self, eigenvalues, v0, noise_var=0.0):
        self.eigenvalues = _as_float_array("eigenvalues", eigenvalues, ndim=1)
        self.x0 = _as_float_array("v0", v0, ndim=1)
        if self.x0.shape != self.eigenvalues.shape:
            raise ValueError(
                f"v0: expected shape {self.eigenvalues.shape} to match eigenvalues, "
                f"got {self.x0.shape}"
            )
        self.noise_var = _check_nonnegative("noise_var", _as_float_array("noise_var", noise_var, ndim=0))
        if _is_concrete(self.eigenvalues):
            # NumPy, not jnp: under an ambient jit a jnp reduction of a constant is staged
            if float(np.min(np.asarray(self.eigenvalues))) <= 0:
                raise ValueError("eigenvalues: must all be > 0")
        else:
            self.eigenvalues = eqx.error_if(self.eigenvalues, jnp.min(self.eigenvalues) <= 0,
                                            "eigenvalues: must all be > 0")

    @classmethod
    def from_gaussian(cls, problem: GaussianLinearRegression) -> DiagonalGaussianRegression:
        """Rotate a :class:`GaussianLinearRegression` into its eigenbasis (``eigh``, ``O(d^3)``)."""
        lam, U = jnp.linalg.eigh(problem.cov)
        return cls(lam, U.T @ (problem.x0 - problem.x_star), problem.noise_var)

    def to_gaussian(self) -> GaussianLinearRegression:
        """The same problem as a dense :class:`GaussianLinearRegression` (``cov = diag(lam)``)."""
        return GaussianLinearRegression(
            jnp.diag(self.eigenvalues), jnp.zeros_like(self.x0), self.x0, self.noise_var
        )

    def value(self, x):
        return 0.5 * jnp.sum(self.eigenvalues * x**2) + 0.5 * self.noise_var

    def gradient(self, x):
        return self.eigenvalues * x

    def hessian(self, x):
        return jnp.diag(self.eigenvalues)

    def covariance(self, x):
        g = self.eigenvalues * x
        return jnp.outer(g, g) + (jnp.dot(x, g) + self.noise_var) * jnp.diag(self.eigenvalues)

    def sample_gradient(self, x, key):
        """Gradient of one fresh example's loss at ``x`` (features ``a ~ N(0, diag(lam))``)."""
        return _gaussian_sample_gradient(x, jnp.sqrt(self.eigenvalues), self.noise_var, key,
                                         diagonal=True)

    def moment_model(self) -> MomentModel:
        lam = self.eigenvalues
        s2 = self.noise_var

        def noise(mu, M):
            # §5.2 with S = diag(lam): S M S + tr(S M) S + s2 S
            return lam[:, None] * M * lam[None, :] + jnp.diag((jnp.dot(lam, jnp.diag(M)) + s2) * lam)

        return MomentModel(jnp.diag(lam), jnp.zeros_like(self.x0), self.x0, 0.5 * s2, noise)

    def eigen_form(self) -> EigenForm:
        return EigenForm(self.eigenvalues, self.x0, self.noise_var)
