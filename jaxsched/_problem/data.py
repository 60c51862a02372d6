"""Problems defined by a per-example loss on a finite data set (docs/theory.md §1 and 2, finite data).

``DataProblem(per_example_loss, data, x0)`` turns any differentiable model written in JAX into a
jaxsched problem: ``f(x) = mean_i l(x; xi_i)`` and ``Sigma(x)`` is the (population) covariance of
the per-example gradients, ``Sigma = mean_i (g_i - gbar)(g_i - gbar)^T``. The parameters may be any
pytree (an equinox model's array leaves, for instance); internally they are flattened with
``jax.flatten_util.ravel_pytree`` so the expansion sees a vector ``x`` of size ``d``.

Every mean over examples is a sum over chunks of ``chunk_size`` examples (``lax.scan``) with the
derivative taken *inside* each chunk, so reverse-mode residuals are never stored for the whole data
set at once: memory is bounded by one chunk's activations (times the number of tangents for the dense
``d x d`` quantities).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._misc import _is_concrete
from .._types import Array, Float, Int, Matrix, Scalar, Vector
from .base import AbstractFiniteDataProblem

__all__ = ["DataProblem"]


def _check_data(data) -> tuple[Any, int]:
    """Convert the leaves of ``data`` to arrays and check they share a leading example axis."""
    leaves, treedef = jax.tree_util.tree_flatten(data)
    if not leaves:
        raise ValueError("data: must be a pytree with at least one array leaf")
    out = []
    for leaf in leaves:
        try:
            arr = jnp.asarray(leaf)
        except TypeError as e:
            raise ValueError(f"data: a leaf cannot be converted to an array ({e})") from None
        if arr.ndim == 0:
            raise ValueError("data: every leaf needs a leading example axis, got a scalar leaf")
        if (_is_concrete(arr) and jnp.issubdtype(arr.dtype, jnp.inexact)
                and not bool(np.all(np.isfinite(np.asarray(arr))))):
            raise ValueError("data: contains NaN or infinite values")
        out.append(arr)
    sizes = {a.shape[0] for a in out}
    if len(sizes) != 1:
        raise ValueError(
            f"data: all leaves must share the leading (example) axis, got sizes {sorted(sizes)}"
        )
    n = sizes.pop()
    if n < 2:
        raise ValueError(f"data: need at least 2 examples, got {n}")
    return jax.tree_util.tree_unflatten(treedef, out), n


def _take(data, idx):
    return jax.tree_util.tree_map(lambda a: a[idx], data)


class DataProblem(AbstractFiniteDataProblem):
    """Mean of a per-example loss over a finite data set, for any JAX model.

    ``f(x) = (1/n) sum_i l(x; xi_i)``, ``Sigma(x) = (1/n) sum_i (g_i - gbar)(g_i - gbar)^T`` with
    ``g_i = grad_x l(x; xi_i)`` and ``gbar = grad f(x)`` (docs/theory.md §1; the matrix ``G~^T / sqrt(n)`` of
    centred per-example gradients is the diffusion coefficient of docs/theory.md §2). Minibatches are drawn
    uniformly, with replacement (``Cov[g_k] = Sigma / b``) or without replacement inside a step
    (``Cov[g_k] = Sigma (n - b) / (b (n - 1))``). The third-derivative contractions of docs/theory.md §3 and 4
    are computed by autodiff; no ``d^3`` tensor is formed.

    Args:
        per_example_loss: ``per_example_loss(params, example) -> scalar`` where ``params`` has the
            pytree structure of ``x0`` and ``example`` is one slice of ``data`` along its leading
            axis. For an equinox model use ``params, static = eqx.partition(model, eqx.is_array)``
            and ``eqx.combine(params, static)`` inside the loss.
        data: a pytree of arrays sharing a leading example axis of size ``n >= 2`` (integer leaves,
            such as class labels, are allowed).
        x0: initial parameters, any pytree of floating arrays; stored flattened as the ``(d,)``
            vector ``self.x0``; :meth:`unravel` maps a flat vector back to the pytree.
        replace: sample with replacement (default) or without replacement inside a step.
        chunk_size: number of examples processed at once when averaging over the data set
            (default: all of them). Smaller chunks bound memory at the cost of a sequential loop.

    Raises:
        ValueError: naming the argument, for leaves of ``data`` with different leading sizes,
            NaN/inf in ``data`` or ``x0``, non-floating parameters, a loss that does not return a
            scalar, or a bad ``chunk_size``/``replace``.
    """

    per_example_loss: Callable[..., Scalar]
    data: Any
    x0: Vector
    unravel_fn: Callable[[Vector], Any] = eqx.field(static=True)
    num_examples: int = eqx.field(static=True)
    replace: bool = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)

    def __init__(self, per_example_loss, data, x0, *, replace: bool = True, chunk_size=None):
        if not callable(per_example_loss):
            raise ValueError(
                f"per_example_loss: must be a callable, got {type(per_example_loss).__name__}"
            )
        self.per_example_loss = per_example_loss
        self.data, n = _check_data(data)
        self.num_examples = n
        leaves = jax.tree_util.tree_leaves(x0)
        if not leaves:
            raise ValueError("x0: must contain at least one array")
        for leaf in leaves:
            if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                raise ValueError(f"x0: parameters must be floating arrays, got dtype "
                                 f"{jnp.asarray(leaf).dtype}")
        flat, unravel = ravel_pytree(x0)
        if _is_concrete(flat) and not bool(np.all(np.isfinite(np.asarray(flat)))):
            raise ValueError("x0: contains NaN or infinite values")
        self.x0 = flat
        self.unravel_fn = unravel
        if not isinstance(replace, bool):
            raise ValueError(f"replace: must be a bool, got {replace!r}")
        self.replace = replace
        if chunk_size is None:
            chunk_size = n
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
            raise ValueError(f"chunk_size: must be a positive int or None, got {chunk_size!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: must be > 0, got {chunk_size}")
        self.chunk_size = int(min(chunk_size, n))
        # The loss must map (params, one example) to a scalar; checked on shapes only.
        example = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                         self.data)
        try:
            out = jax.eval_shape(per_example_loss, x0, example)
        except Exception as e:  # any failure to trace is a problem with the user's loss
            raise ValueError(f"per_example_loss: cannot be evaluated on (x0, one example): {e}") \
                from e
        if not hasattr(out, "shape") or out.shape != ():
            shape = getattr(out, "shape", type(out).__name__)
            raise ValueError(f"per_example_loss: must return a scalar, got {shape}")

    # --- parameters -------------------------------------------------------------------------------
    def unravel(self, x: Vector) -> Any:
        """The parameter pytree of the flat vector ``x`` (inverse of the flattening of ``x0``)."""
        return self.unravel_fn(x)

    # --- chunked sums over examples ----------------------------------------------------------------
    def _loss_sum(self, x: Vector, chunk, mask) -> Scalar:
        params = self.unravel_fn(x)
        losses = jax.vmap(self.per_example_loss, in_axes=(None, 0))(params, chunk)
        return jnp.sum(mask * losses)

    def _data_sum(self, fn: Callable[[Any, Array], Any]):
        """``sum over chunks of fn(chunk, mask)``: ``mask`` is 1 on real examples and 0 on padding."""
        n, c = self.num_examples, self.chunk_size
        dtype = self.x0.dtype
        if c >= n:
            return fn(self.data, jnp.ones(n, dtype))
        k = -(-n // c)
        pad = k * c - n
        # Padding repeats example 0 (finite by construction) with weight 0.
        padded = jax.tree_util.tree_map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]).reshape(
                (k, c) + a.shape[1:]
            ),
            self.data,
        )
        mask = jnp.concatenate([jnp.ones(n, dtype), jnp.zeros(pad, dtype)]).reshape(k, c)
        first = (_take(padded, 0), mask[0])
        init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                      jax.eval_shape(fn, *first))

        def body(acc, inp):
            return jax.tree_util.tree_map(jnp.add, acc, fn(*inp)), None

        total, _ = jax.lax.scan(body, init, (padded, mask))
        return total

    # --- loss and derivatives ----------------------------------------------------------------------
    def value(self, x: Vector) -> Scalar:
        return self._data_sum(lambda ch, m: self._loss_sum(x, ch, m)) / self.num_examples

    def gradient(self, x: Vector) -> Vector:
        return self._data_sum(
            lambda ch, m: jax.grad(self._loss_sum)(x, ch, m)
        ) / self.num_examples

    def hvp(self, x: Vector, v: Vector) -> Vector:
        """Hessian-vector product ``H(x) v`` (forward over reverse, chunked)."""
        def chunk(ch, m):
            return jax.jvp(lambda z: jax.grad(self._loss_sum)(z, ch, m), (x,), (v,))[1]

        return self._data_sum(chunk) / self.num_examples

    def hessian(self, x: Vector) -> Matrix:
        return self._data_sum(
            lambda ch, m: jax.hessian(self._loss_sum)(x, ch, m)
        ) / self.num_examples

    def per_example_gradients(
        self, x: Vector, indices: Int[Array, " m"] | None = None
    ) -> Float[Array, "m d"]:
        """Per-example gradients ``g_i(x)`` for ``i`` in ``indices`` (all examples when None)."""
        params_grad = jax.grad(
            lambda z, ex: self.per_example_loss(self.unravel_fn(z), ex)
        )
        data = self.data if indices is None else _take(self.data, indices)
        return jax.vmap(params_grad, in_axes=(None, 0))(x, data)

    def covariance(self, x: Vector) -> Matrix:
        gbar = self.gradient(x)
        grad_one = jax.grad(lambda z, ex: self.per_example_loss(self.unravel_fn(z), ex))

        def chunk(ch, m):
            # Centre before multiplying: the two-pass form avoids the cancellation of
            # mean g g^T - gbar gbar^T when the gradient is large compared with its spread.
            G = (jax.vmap(grad_one, in_axes=(None, 0))(x, ch) - gbar) * m[:, None]
            return G.T @ G

        return self._data_sum(chunk) / self.num_examples

    def third_contraction(self, x: Vector, P: Matrix) -> Vector:
        """``d/dx tr(H(x) P)`` (docs/theory.md §3), chunk by chunk so reverse-mode residuals stay per
        chunk."""
        def chunk(ch, m):
            return jax.grad(lambda z: jnp.vdot(jax.hessian(self._loss_sum)(z, ch, m), P))(x)

        return self._data_sum(chunk) / self.num_examples

    def third_hessian(self, x: Vector, a: Vector) -> Matrix:
        """``D3f(x)[a]`` (docs/theory.md §4): the directional derivative of the Hessian along ``a``."""
        def chunk(ch, m):
            return jax.jvp(lambda z: jax.hessian(self._loss_sum)(z, ch, m), (x,), (a,))[1]

        return self._data_sum(chunk) / self.num_examples
