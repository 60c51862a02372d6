"""Linear regression problems (theory 5): Gaussian features and finite data."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._misc import _as_float_array, _is_concrete
from .._types import Array, Float, Matrix, Scalar, Vector
from .base import AbstractProblem


def _check_square_spd(name: str, cov: Array) -> None:
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"{name}: expected a square (d, d) matrix, got shape {cov.shape}")
    if not _is_concrete(cov):
        return
    c = np.asarray(cov, dtype=np.float64)
    scale = max(float(np.max(np.abs(c))), np.finfo(np.float64).tiny)
    if np.max(np.abs(c - c.T)) > 1e-10 * scale:
        raise ValueError(f"{name}: must be symmetric")
    eig = np.linalg.eigvalsh(0.5 * (c + c.T))
    if eig[0] <= 1e-12 * scale:
        raise ValueError(f"{name}: must be positive definite (smallest eigenvalue {eig[0]:.3g})")


class GaussianLinearRegression(AbstractProblem):
    """Least squares with Gaussian features (theory 5.1): ``a ~ N(0, cov)``, ``y = a . x_star + e``,
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

    is_quadratic: ClassVar[bool] = True

    def __init__(self, cov, x_star, x0, noise_var=0.0):
        self.cov = _as_float_array("cov", cov, ndim=2)
        _check_square_spd("cov", self.cov)
        d = self.cov.shape[0]
        self.x_star = _as_float_array("x_star", x_star, ndim=1)
        self.x0 = _as_float_array("x0", x0, ndim=1)
        for name, v in (("x_star", self.x_star), ("x0", self.x0)):
            if v.shape != (d,):
                raise ValueError(f"{name}: expected shape ({d},) to match cov, got {v.shape}")
        self.noise_var = _as_float_array("noise_var", noise_var, ndim=0)
        if _is_concrete(self.noise_var) and float(self.noise_var) < 0:
            raise ValueError(f"noise_var: must be >= 0, got {float(self.noise_var)}")

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

    def third_contraction(self, x, P):
        return jnp.zeros_like(x)

    def third_hessian(self, x, a):
        return jnp.zeros_like(self.cov)


class LinearRegressionData(AbstractProblem):
    """Least squares on a finite data set sampled uniformly (theory 5.3):
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

    is_quadratic: ClassVar[bool] = True

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

    def third_contraction(self, x, P):
        return jnp.zeros_like(x)

    def third_hessian(self, x, a):
        d = self.features.shape[1]
        return jnp.zeros((d, d), self.features.dtype)

    def noise_weight(self, batch_sizes):
        if self.replace:
            return 1.0 / batch_sizes
        n = self.num_examples
        return (n - batch_sizes) / (batch_sizes * (n - 1))




class DiagonalGaussianRegression(AbstractProblem):
    """Gaussian linear regression (theory 5.1) written in the eigenbasis of its feature
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
            negative ``noise_var`` (value checks on concrete inputs only).
    """

    eigenvalues: Vector
    x0: Vector
    noise_var: Scalar

    is_quadratic: ClassVar[bool] = True

    def __init__(self, eigenvalues, v0, noise_var=0.0):
        self.eigenvalues = _as_float_array("eigenvalues", eigenvalues, ndim=1)
        self.x0 = _as_float_array("v0", v0, ndim=1)
        if self.x0.shape != self.eigenvalues.shape:
            raise ValueError(
                f"v0: expected shape {self.eigenvalues.shape} to match eigenvalues, "
                f"got {self.x0.shape}"
            )
        self.noise_var = _as_float_array("noise_var", noise_var, ndim=0)
        if _is_concrete(self.eigenvalues, self.noise_var):
            if float(jnp.min(self.eigenvalues)) <= 0:
                raise ValueError("eigenvalues: must all be > 0")
            if float(self.noise_var) < 0:
                raise ValueError(f"noise_var: must be >= 0, got {float(self.noise_var)}")

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

    def third_contraction(self, x, P):
        return jnp.zeros_like(x)

    def third_hessian(self, x, a):
        return jnp.zeros((x.shape[0], x.shape[0]), x.dtype)


