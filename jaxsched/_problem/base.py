"""Problem types: the loss ``f``, the per-sample gradient covariance ``Sigma(x)``, ``x0`` and the
terminal functional ``F`` (docs/theory.md §1).

Every problem is an ``equinox.Module`` whose numeric fields are array leaves, so a problem can be
vmapped over and differentiated. The methods give everything the expansion needs:

- ``value(x)``, ``gradient(x)``, ``hessian(x)``: ``f`` and its derivatives;
- ``covariance(x)``: ``Sigma(x)``, the covariance of one per-sample gradient;
- ``third_contraction(x, P)``: ``D3f(x)[P]_i = d/dx_i tr(H(x) P)`` (docs/theory.md §3), a gradient
  of a scalar;
- ``third_hessian(x, a)``: ``D3f(x)[a]_jk = sum_i a_i d_ijk f``, the Hessian of ``a . grad f``
  (docs/theory.md §4);
- ``terminal_value/gradient/hessian``: ``F`` and its derivatives (``F = f`` unless given);
- ``noise_weight(b)``: the factor multiplying ``Sigma`` in ``Cov[g_k]``: ``1/b`` with replacement,
  ``(n - b) / (b (n - 1))`` without replacement inside a step (docs/theory.md §1).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, Float, Matrix, Scalar, Vector

__all__ = ["AbstractProblem", "AbstractQuadraticProblem", "AbstractFiniteDataProblem",
           "AbstractOnlineProblem", "check_problem"]


class AbstractProblem(eqx.Module):
    """Base class of all problems. Subclasses implement ``value``, ``gradient`` and ``covariance``;
    derivatives default to autodiff and can be overridden with closed forms.

    A consumer asks a problem for its behaviour through the methods below (never by testing its
    concrete class): ``noise_weight`` and ``batch_cap`` (how minibatches are drawn),
    ``eigen_form`` (quadratic problems), ``per_example_gradients`` (finite data),
    ``sample_gradient`` (online data).
    """

    x0: eqx.AbstractVar[Vector]

    #: True when ``f`` is quadratic and the exact discrete recursions of docs/theory.md §5 apply.
    is_quadratic: ClassVar[bool] = False
    #: True when the problem is a finite data set with per-example gradients.
    is_finite_data: ClassVar[bool] = False
    #: True when the problem can draw one per-sample gradient (``sample_gradient``).
    is_online: ClassVar[bool] = False

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

    def hvp(self, x: Vector, v: Vector) -> Vector:
        """Hessian-vector product ``H(x) v`` (forward over reverse)."""
        return jax.jvp(self.gradient, (x,), (v,))[1]

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

    def inverse_batch_coefficient(self) -> float:
        """The coefficient of ``1/b`` in ``noise_weight(b)`` (which is affine in ``1/b``): 1 with
        replacement, ``n/(n-1)`` without. It rescales ``phi`` for the square-root rule."""
        return 1.0

    def batch_cap(self) -> int | None:
        """The largest batch a step can draw (``None``: unbounded). A finite data set sampled without
        replacement caps every batch at its ``n`` examples."""
        return None

    def stability_batch(self, step_sizes, optimizer=None):
        """Per-step batch sizes below which the exact second moments of SGD diverge
        (docs/theory.md §8), or ``None`` where the problem cannot say (non-quadratic problems)."""
        return None


class AbstractQuadraticProblem(AbstractProblem):
    """A problem with quadratic ``f`` (constant Hessian ``S``, ``D3f = 0``): the exact moment
    recursions of docs/theory.md §5 and the eigenbasis sensitivity apply; ``F = f``."""

    is_quadratic: ClassVar[bool] = True

    def eigen_form(self):
        """The problem in the eigenbasis of its Hessian (an ``EigenForm``: eigenvalues, initial
        coordinates, noise description), for the eigenbasis sensitivity (docs/theory.md §5)."""
        raise NotImplementedError

    def moment_model(self):
        """The ``MomentModel`` of the exact discrete recursions (docs/theory.md §5.2, §5.3)."""
        raise NotImplementedError

    def stability_batch(self, step_sizes, optimizer=None):
        """``b_stab(s_k)`` per step size: the batch below which the exact second moments diverge
        (docs/theory.md §8); ``inf`` where full-batch descent itself diverges."""
        from .stability import stability_batch_at

        return stability_batch_at(self, step_sizes, optimizer)

    def third_contraction(self, x, P):
        return jnp.zeros_like(x)

    def third_hessian(self, x, a):
        return jnp.zeros((x.shape[0], x.shape[0]), x.dtype)


class AbstractFiniteDataProblem(AbstractProblem):
    """The mean of a per-example loss over ``n`` examples, drawn uniformly with replacement or
    without replacement inside a step (``w(b) = (n - b) / (b (n - 1))``, docs/theory.md §1)."""

    is_finite_data: ClassVar[bool] = True
    replace: eqx.AbstractVar[bool]
    num_examples: eqx.AbstractVar[int]

    def per_example_gradients(self, x: Vector, idx) -> Array:
        """``(len(idx), d)`` gradients of the examples ``idx`` at ``x``."""
        raise NotImplementedError

    def noise_weight(self, batch_sizes):
        if self.replace:
            return 1.0 / batch_sizes
        n = self.num_examples
        return (n - batch_sizes) / (batch_sizes * (n - 1))

    def inverse_batch_coefficient(self) -> float:
        n = self.num_examples
        return 1.0 if self.replace else n / (n - 1)

    def batch_cap(self) -> int | None:
        return None if self.replace else self.num_examples


class AbstractOnlineProblem(AbstractProblem):
    """A problem that can draw fresh per-sample gradients (online data)."""

    is_online: ClassVar[bool] = True

    def sample_gradient(self, x: Vector, key) -> Vector:
        """One per-sample gradient ``grad l(x; xi)`` with ``xi`` drawn from ``key``."""
        raise NotImplementedError


def check_problem(problem) -> None:
    if not isinstance(problem, AbstractProblem):
        raise ValueError(
            f"problem: expected a jaxsched problem (AbstractProblem), got {type(problem).__name__}"
        )


