"""Problem types: the loss ``f``, the per-sample gradient covariance ``Sigma(x)``, ``x0`` and the
terminal functional ``F`` (theory sec. 1).

Every problem is an ``equinox.Module`` whose numeric fields are array leaves, so a problem can be
vmapped over and differentiated. The methods give everything the expansion needs:

- ``value(x)``, ``gradient(x)``, ``hessian(x)``: ``f`` and its derivatives;
- ``covariance(x)``: ``Sigma(x)``, the covariance of one per-sample gradient;
- ``third_contraction(x, P)``: ``D3f(x)[P]_i = d/dx_i tr(H(x) P)`` (theory 3), a gradient of a scalar;
- ``third_hessian(x, a)``: ``D3f(x)[a]_jk = sum_i a_i d_ijk f``, the Hessian of ``a . grad f`` (theory 4);
- ``terminal_value/gradient/hessian``: ``F`` and its derivatives (``F = f`` unless given);
- ``noise_weight(b)``: the factor multiplying ``Sigma`` in ``Cov[g_k]``: ``1/b`` with replacement,
  ``(n - b) / (b (n - 1))`` without replacement inside a step (theory 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._types import Array, Float, Matrix, Scalar, Vector

__all__ = [
    "AbstractProblem",
    "GaussianLinearRegression",
    "LinearRegressionData",
    "Problem",
]


def _is_concrete(*xs) -> bool:
    """True when no argument is a tracer, so values can be checked eagerly."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def _as_float_array(name: str, value, ndim: int | None = None) -> Array:
    """Convert ``value`` to a floating JAX array, refusing wrong rank and (when concrete) NaN/inf."""
    try:
        arr = jnp.asarray(value)
    except TypeError as e:
        raise ValueError(f"{name}: cannot be converted to an array ({e})") from None
    # An explicit dtype drops JAX's weak typing, so a Python float and a NumPy float give the same
    # abstract value and never cause a retrace.
    dtype = arr.dtype if jnp.issubdtype(arr.dtype, jnp.floating) else jnp.result_type(float)
    arr = jnp.asarray(arr, dtype=dtype)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected an array with {ndim} dimension(s), got shape {arr.shape}")
    if _is_concrete(arr) and not bool(np.all(np.isfinite(np.asarray(arr)))):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


class AbstractProblem(eqx.Module):
    """Base class of all problems. Subclasses implement ``value``, ``gradient`` and ``covariance``;
    derivatives default to autodiff and can be overridden with closed forms."""

    x0: eqx.AbstractVar[Vector]

    #: True when ``f`` is quadratic and the exact discrete recursions of theory 5 apply.
    is_quadratic: ClassVar[bool] = False

    @property
    def dim(self) -> int:
        return self.x0.shape[-1]

    # --- loss ---------------------------------------------------------------------------------
    def value(self, x: Vector) -> Scalar:
        raise NotImplementedError

    def gradient(self, x: Vector) -> Vector:
        return jax.grad(self.value)(x)

    def hessian(self, x: Vector) -> Matrix:
        return jax.hessian(self.value)(x)

    def covariance(self, x: Vector) -> Matrix:
        raise NotImplementedError

    def third_contraction(self, x: Vector, P: Matrix) -> Vector:
        """``d/dx tr(H(x) P)`` by reverse mode through the Hessian: no ``d^3`` tensor is formed."""
        return jax.grad(lambda z: jnp.vdot(self.hessian(z), P))(x)

    def third_hessian(self, x: Vector, a: Vector) -> Matrix:
        """Hessian of ``z -> a . grad f(z)``, i.e. ``D3f(x)[a]``."""
        return jax.hessian(lambda z: jnp.vdot(a, self.gradient(z)))(x)

    # --- terminal functional F ------------------------------------------------------------------
    def terminal_value(self, x: Vector) -> Scalar:
        return self.value(x)

    def terminal_gradient(self, x: Vector) -> Vector:
        return self.gradient(x)

    def terminal_hessian(self, x: Vector) -> Matrix:
        return self.hessian(x)

    # --- sampling -------------------------------------------------------------------------------
    def noise_weight(self, batch_sizes: Float[Array, "..."]) -> Float[Array, "..."]:
        """Factor of ``Sigma`` in the covariance of a minibatch gradient of size ``b``: ``1/b``."""
        return 1.0 / batch_sizes


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


class Problem(AbstractProblem):
    """A general problem from JAX functions: any twice-differentiable ``loss: R^d -> R`` and any
    state-dependent PSD ``noise_cov: R^d -> (d, d)`` (the per-sample gradient covariance). This is
    the large family of diffusion coefficients of theory 2.

    Args:
        loss: ``loss(x)`` (or ``loss(x, args)`` when ``args`` is given), a scalar.
        noise_cov: ``noise_cov(x)`` (or ``noise_cov(x, args)``), a ``(d, d)`` PSD matrix.
        x0: ``(d,)`` initial parameter.
        terminal: optional terminal functional ``F(x)`` (or ``F(x, args)``); defaults to ``loss``.
        args: optional pytree of arrays passed to the functions; put here anything that varies in a
            sweep, so it is an array leaf (vmappable, differentiable, never recompiled).
    """

    loss: Callable[..., Scalar]
    noise_cov: Callable[..., Matrix]
    x0: Vector
    terminal: Callable[..., Scalar] | None = None
    args: Any = None

    def __init__(self, loss, noise_cov, x0, terminal=None, args=None):
        for name, fn in (("loss", loss), ("noise_cov", noise_cov)):
            if not callable(fn):
                raise ValueError(f"{name}: must be a callable, got {type(fn).__name__}")
        if terminal is not None and not callable(terminal):
            raise ValueError(f"terminal: must be a callable or None, got {type(terminal).__name__}")
        self.loss = loss
        self.noise_cov = noise_cov
        self.terminal = terminal
        self.args = args
        self.x0 = _as_float_array("x0", x0, ndim=1)
        if _is_concrete(self.x0, args):
            self._check_shapes()

    def _call(self, fn, x):
        return fn(x) if self.args is None else fn(x, self.args)

    def _check_shapes(self) -> None:
        d = self.x0.shape[0]
        out = jax.eval_shape(lambda x: self._call(self.loss, x), self.x0)
        if out.shape != ():
            raise ValueError(f"loss: must return a scalar, got shape {out.shape}")
        out = jax.eval_shape(lambda x: self._call(self.noise_cov, x), self.x0)
        if out.shape != (d, d):
            raise ValueError(f"noise_cov: must return a ({d}, {d}) matrix, got shape {out.shape}")
        if self.terminal is not None:
            out = jax.eval_shape(lambda x: self._call(self.terminal, x), self.x0)
            if out.shape != ():
                raise ValueError(f"terminal: must return a scalar, got shape {out.shape}")

    def value(self, x):
        return self._call(self.loss, x)

    def covariance(self, x):
        return self._call(self.noise_cov, x)

    def terminal_value(self, x):
        if self.terminal is None:
            return self.value(x)
        return self._call(self.terminal, x)

    def terminal_gradient(self, x):
        return jax.grad(self.terminal_value)(x)

    def terminal_hessian(self, x):
        return jax.hessian(self.terminal_value)(x)
