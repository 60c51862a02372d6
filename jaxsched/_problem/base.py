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

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, Float, Matrix, Scalar, Vector

__all__ = ["AbstractProblem"]


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




def check_problem(problem) -> None:
    if not isinstance(problem, AbstractProblem):
        raise ValueError(
            f"problem: expected a jaxsched problem (AbstractProblem), got {type(problem).__name__}"
        )


