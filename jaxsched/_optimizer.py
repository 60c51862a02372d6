"""The training algorithm as a pytree: SGD with an optional (per-step) learning-rate schedule,
heavy-ball or Nesterov momentum (theory 7, 8).

Every numeric field is an array leaf, so changing the learning rate, the lr schedule's values or the
momentum never recompiles, and everything is differentiable in them. Entry points accept
``optimizer=`` (an :class:`AbstractOptimizer`); ``lr=`` alone keeps meaning plain SGD at a constant
rate (:func:`as_optimizer` is the one rule that turns the two spellings into an optimizer).

Conventions (theory 7): the *trace form* of optax ``sgd(momentum=mu)`` and PyTorch
``SGD(momentum=mu)``: ``t_{k+1} = g_k + mu t_k``, ``x_{k+1} = x_k - s_k t_{k+1}`` (Nesterov:
``x_{k+1} = x_k - s_k (g_k + mu t_{k+1})``), ``t_0 = 0``, with ``s_k`` the learning rate of step k.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._misc import _is_concrete
from ._types import Array, Float

__all__ = ["AbstractOptimizer", "SGD", "as_optimizer", "lr_schedule"]


class AbstractOptimizer(eqx.Module):
    """Base of the training algorithms whose batch schedule jaxsched optimises."""

    def step_sizes(self, steps: int) -> Float[Array, " steps"]:
        """The ``(steps,)`` learning rates ``s_k`` of the run."""
        raise NotImplementedError

    @property
    def lag(self) -> Array:
        """Mean age ``L`` of the gradients in the update (0 without momentum)."""
        raise NotImplementedError

    @property
    def constant_lr(self) -> bool:
        """True when every step has the same learning rate (a static fact: it fixes the solver's
        jump times)."""
        raise NotImplementedError

    @property
    def time_scale(self) -> Array:
        """Intrinsic time advanced per unit of learning rate (``1/(1-mu)`` with momentum)."""
        raise NotImplementedError

    def astype(self, dtype) -> AbstractOptimizer:
        """The same optimizer with every floating leaf cast to ``dtype``."""
        return jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), self)


def _as_float_leaf(name: str, value, dtype=None) -> Array:
    try:
        arr = jnp.asarray(value)
    except TypeError:
        raise ValueError(f"{name}: must be a number or an array of numbers, got {value!r}") from None
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float) if dtype is None else dtype)
    # an explicit dtype drops weak typing: Python and NumPy floats share one trace
    return jnp.asarray(arr, dtype=arr.dtype if dtype is None else dtype)


class SGD(AbstractOptimizer):
    """Minibatch SGD, optionally with momentum and a learning-rate schedule.

    Args:
        lr: learning rate ``h > 0``: a scalar (constant rate) or a ``(steps,)`` array of per-step
            rates ``s_k`` (an lr schedule; see :func:`lr_schedule` to evaluate an optax schedule).
        momentum: ``0 <= mu < 1`` (default 0, plain SGD), in optax's / PyTorch's trace form.
        nesterov: Nesterov momentum (optax ``nesterov=True``).

    Raises:
        ValueError: naming the argument, for a non-positive or non-finite ``lr``, ``momentum``
            outside ``[0, 1)``, or an ``lr`` that is neither a scalar nor 1-D.
    """

    lr: Float[Array, ""] | Float[Array, " steps"]
    momentum: Float[Array, ""]
    nesterov: bool = eqx.field(static=True, default=False)

    def __init__(self, lr, momentum=0.0, nesterov: bool = False):
        lr = _as_float_leaf("lr", lr)
        if lr.ndim > 1 or (lr.ndim == 1 and lr.shape[0] == 0):
            raise ValueError(f"lr: must be a scalar or a non-empty (steps,) array, got shape {lr.shape}")
        if _is_concrete(lr):
            v = np.asarray(lr)
            if not np.all(np.isfinite(v)) or np.any(v <= 0):
                raise ValueError("lr: every learning rate must be finite and > 0")
        self.lr = lr
        mu = _as_float_leaf("momentum", momentum, lr.dtype)
        if mu.ndim != 0:
            raise ValueError(f"momentum: must be a scalar, got shape {mu.shape}")
        if _is_concrete(mu) and not (0.0 <= float(mu) < 1.0):
            raise ValueError(f"momentum: must satisfy 0 <= momentum < 1, got {float(mu)}")
        self.momentum = mu
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov: must be a bool, got {nesterov!r}")
        self.nesterov = nesterov

    @property
    def constant_lr(self) -> bool:
        """True when ``lr`` is one scalar rate (no schedule)."""
        return self.lr.ndim == 0

    def step_sizes(self, steps: int) -> Float[Array, " steps"]:
        if self.lr.ndim == 1 and self.lr.shape[0] != steps:
            raise ValueError(f"lr: the lr schedule has {self.lr.shape[0]} steps, the run has {steps}")
        return jnp.broadcast_to(self.lr, (steps,))

    @property
    def lag(self) -> Array:
        """Mean age ``L`` of the gradients in the update: ``mu/(1-mu)`` (heavy ball),
        ``mu^2/(1-mu)`` (Nesterov), 0 for SGD (theory 7)."""
        mu = self.momentum
        return (mu * mu if self.nesterov else mu) / (1.0 - mu)

    @property
    def time_scale(self) -> Array:
        """``1 / (1 - mu)``: one step advances intrinsic time by ``s_k / (1 - mu)`` (theory 7)."""
        return 1.0 / (1.0 - self.momentum)


def as_optimizer(optimizer: AbstractOptimizer | None, lr) -> AbstractOptimizer:
    """The one rule for ``optimizer=`` / ``lr=``: exactly one must be given; ``lr`` alone means
    ``SGD(lr)``."""
    if optimizer is None:
        if lr is None:
            raise ValueError("lr: give a learning rate (lr=) or an optimizer (optimizer=)")
        return SGD(lr)
    if lr is not None:
        raise ValueError("lr: give either lr= or optimizer=, not both (the optimizer holds its lr)")
    if not isinstance(optimizer, AbstractOptimizer):
        raise ValueError(
            f"optimizer: expected a jaxsched optimizer such as js.SGD(lr=...), got {type(optimizer).__name__}"
        )
    return optimizer


def lr_schedule(schedule: Callable[[Array], Array], steps: int) -> Float[Array, " steps"]:
    """Evaluate an optax-style schedule ``step -> lr`` (e.g. ``optax.cosine_decay_schedule``) on the
    steps ``0 .. steps-1``: the ``(steps,)`` array that ``SGD(lr=...)`` takes."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: must be a Python int >= 1, got {steps!r}")
    if not callable(schedule):
        raise ValueError(f"schedule: must be a callable step -> lr, got {type(schedule).__name__}")
    values = jax.vmap(schedule)(jnp.arange(int(steps)))
    return jnp.asarray(values, dtype=jnp.result_type(float))
