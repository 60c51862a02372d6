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
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._misc import _is_concrete
from ._types import Array, Float

__all__ = ["AbstractAdaptiveOptimizer", "AbstractOptimizer", "Adam", "RMSprop", "SGD", "as_optimizer",
           "lr_schedule"]


class AbstractOptimizer(eqx.Module):
    """Base of the training algorithms whose batch schedule jaxsched optimises."""

    #: True for the adaptive optimizers (Adam, RMSprop; docs/theory.md §9): the entry points hand
    #: them to the moment model and the optax Monte Carlo of §9 instead of the SGD expansion.
    is_adaptive: ClassVar[bool] = False

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


# ------------------------------------------------------------------------------------------------
# Adaptive optimizers (docs/theory.md §9)
# ------------------------------------------------------------------------------------------------
def _check_lr_leaf(lr) -> Array:
    lr = _as_float_leaf("lr", lr)
    if lr.ndim > 1 or (lr.ndim == 1 and lr.shape[0] == 0):
        raise ValueError(f"lr: must be a scalar or a non-empty (steps,) array, got shape {lr.shape}")
    if _is_concrete(lr):
        v = np.asarray(lr)
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError("lr: every learning rate must be finite and > 0")
    return lr


def _check_unit_leaf(name: str, value, dtype, *, allow_zero: bool) -> Array:
    arr = _as_float_leaf(name, value, dtype)
    if arr.ndim != 0:
        raise ValueError(f"{name}: must be a scalar, got shape {arr.shape}")
    if _is_concrete(arr):
        v = float(arr)
        ok = (0.0 <= v < 1.0) if allow_zero else (0.0 < v < 1.0)
        if not ok:
            bound = "0 <=" if allow_zero else "0 <"
            raise ValueError(f"{name}: must satisfy {bound} {name} < 1, got {v}")
    return arr


def _check_eps_leaf(eps, dtype) -> Array:
    arr = _as_float_leaf("eps", eps, dtype)
    if arr.ndim != 0:
        raise ValueError(f"eps: must be a scalar, got shape {arr.shape}")
    if _is_concrete(arr) and not (np.isfinite(float(arr)) and float(arr) >= 0):
        raise ValueError(f"eps: must be finite and >= 0, got {float(arr)}")
    return arr


class AbstractAdaptiveOptimizer(AbstractOptimizer):
    """Base of the adaptive optimizers of docs/theory.md §9: first moment ``m`` (rate ``b1``),
    second moment ``v`` (rate ``b2``), update ``x <- x - s_k phi_k(m, v)`` with
    ``phi_k(m, v) = (m / c1_k) / (sqrt(v / c2_k) + eps)`` elementwise.

    The moment model, the Monte Carlo and the schedule optimiser ask an adaptive optimizer only for
    the members below, never for its concrete class.
    """

    is_adaptive: ClassVar[bool] = True
    #: False when ``m`` is the gradient itself (``b1 = 0``: RMSprop); the continuous form of §9.3
    #: then has no ``m`` state.
    has_first_moment: ClassVar[bool] = True
    lr: eqx.AbstractVar[Array]
    eps: eqx.AbstractVar[Array]

    # Every subclass has ``b1`` (decay of the first moment, 0: none) and ``b2`` (decay of the second
    # moment), as fields or properties.

    def bias_corrections(self, steps: int) -> tuple[Array, Array]:
        """``(c1, c2)``, each ``(steps,)``: the divisors of ``m`` and ``v`` at steps ``1..steps``."""
        raise NotImplementedError

    def optax_transform(self, rates: Array):
        """The optax ``GradientTransformation`` this optimizer is, with the per-step learning rates
        ``rates`` looked up by optax's own step count."""
        raise NotImplementedError

    @property
    def constant_lr(self) -> bool:
        return self.lr.ndim == 0

    def step_sizes(self, steps: int) -> Float[Array, " steps"]:
        if self.lr.ndim == 1 and self.lr.shape[0] != steps:
            raise ValueError(f"lr: the lr schedule has {self.lr.shape[0]} steps, the run has {steps}")
        return jnp.broadcast_to(self.lr, (steps,))

    @property
    def lag(self) -> Array:
        """Mean age of the gradients in ``m``: ``b1 / (1 - b1)`` (after the bias correction has
        faded)."""
        return self.b1 / (1.0 - self.b1)

    @property
    def time_scale(self) -> Array:
        """1: the normalised update moves ``x`` by about ``s_k`` per coordinate and step, whatever
        ``b1`` (the bias-corrected mean of the gradients has weight one)."""
        return jnp.ones((), self.lr.dtype)


class Adam(AbstractAdaptiveOptimizer):
    """Adam with bias correction, as ``optax.adam`` and PyTorch's ``Adam`` (docs/theory.md §9):
    ``m_k = b1 m + (1-b1) g_k``, ``v_k = b2 v + (1-b2) g_k^2``,
    ``x_k = x - s_k (m_k / (1 - b1^k)) / (sqrt(v_k / (1 - b2^k)) + eps)``, ``m_0 = v_0 = 0``.

    Args:
        lr: learning rate ``> 0``: a scalar or a ``(steps,)`` array of per-step rates.
        b1: first-moment decay, ``0 <= b1 < 1`` (default 0.9).
        b2: second-moment decay, ``0 < b2 < 1`` (default 0.999).
        eps: ``>= 0`` added to ``sqrt(v_hat)`` (outside the root, PyTorch's place; default 1e-8).

    Raises:
        ValueError: naming the argument, for a non-positive or non-finite ``lr``, a rate outside its
            interval, a negative ``eps`` or a non-scalar ``b1``/``b2``/``eps``.
    """

    lr: Float[Array, ""] | Float[Array, " steps"]
    b1: Float[Array, ""]
    b2: Float[Array, ""]
    eps: Float[Array, ""]

    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr = _check_lr_leaf(lr)
        self.b1 = _check_unit_leaf("b1", b1, self.lr.dtype, allow_zero=True)
        self.b2 = _check_unit_leaf("b2", b2, self.lr.dtype, allow_zero=False)
        self.eps = _check_eps_leaf(eps, self.lr.dtype)

    def bias_corrections(self, steps: int) -> tuple[Array, Array]:
        k = jnp.arange(1, steps + 1, dtype=self.lr.dtype)
        return 1.0 - self.b1**k, 1.0 - self.b2**k

    def optax_transform(self, rates: Array):
        import optax

        return optax.adam(learning_rate=lambda count: rates[count], b1=self.b1, b2=self.b2,
                          eps=self.eps)


class RMSprop(AbstractAdaptiveOptimizer):
    """RMSprop in PyTorch's convention (docs/theory.md §9): ``v_k = decay v + (1 - decay) g_k^2``,
    ``x_k = x - s_k g_k / (sqrt(v_k) + eps)``, ``v_0 = 0``, no bias correction, no momentum.

    This is ``optax.rmsprop(lr, decay=decay, eps=eps, eps_in_sqrt=False)``: ``eps`` is added
    *outside* the square root. optax's default ``eps_in_sqrt=True`` divides by ``sqrt(v + eps)``
    instead, a different optimizer when ``v`` is small (and Keras' RMSprop differs again).

    Args:
        lr: learning rate ``> 0``: a scalar or a ``(steps,)`` array of per-step rates.
        decay: second-moment decay, ``0 < decay < 1`` (default 0.99, PyTorch's ``alpha``).
        eps: ``>= 0`` added to ``sqrt(v)`` (default 1e-8).

    Raises:
        ValueError: naming the argument, as for :class:`Adam`.
    """

    lr: Float[Array, ""] | Float[Array, " steps"]
    decay: Float[Array, ""]
    eps: Float[Array, ""]
    has_first_moment: ClassVar[bool] = False

    def __init__(self, lr, decay=0.99, eps=1e-8):
        self.lr = _check_lr_leaf(lr)
        self.decay = _check_unit_leaf("decay", decay, self.lr.dtype, allow_zero=False)
        self.eps = _check_eps_leaf(eps, self.lr.dtype)

    @property
    def b1(self) -> Array:
        return jnp.zeros((), self.lr.dtype)

    @property
    def b2(self) -> Array:
        return self.decay

    def bias_corrections(self, steps: int) -> tuple[Array, Array]:
        one = jnp.ones((steps,), self.lr.dtype)
        return one, one

    def optax_transform(self, rates: Array):
        import optax

        return optax.rmsprop(learning_rate=lambda count: rates[count], decay=self.decay,
                             eps=self.eps, eps_in_sqrt=False)
