"""Shared parts of the Monte Carlo layer: the result type, how a problem gives samples (the sampling
protocol of :mod:`jaxsched._check.simulate`), validation, path keys and the vmap-over-paths tail."""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import _as_float_array, _is_concrete
from .._types import Array, Float, Int, Scalar, Vector

__all__ = ["SimulationResult"]

# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
class SimulationResult(eqx.Module):
    """Monte Carlo result of :func:`simulate_sgd` or :func:`simulate_sde`.

    Attributes:
        final_loss: ``(num_paths,)`` terminal loss ``F(x_K)`` of every path.
        final_params: ``(num_paths, d)`` final parameters of every path.
        loss_steps: ``(grid,)`` step indices ``0, r, 2r, ..., K`` at which the loss was recorded
            (``None`` unless ``record_every=r`` was given). Time is ``loss_steps * lr``.
        loss_paths: ``(num_paths, grid)`` loss ``F`` of every path on that grid (or ``None``).
        final_loss_cv: ``(num_paths,)`` control-variate estimator of ``F(x_K)`` with the same
            expectation and a smaller variance (``simulate_sgd(..., control_variate=True)``), or
            ``None``. When present, :meth:`mean` and :meth:`stderr` use it.
    """

    final_loss: Float[Array, " paths"]
    final_params: Float[Array, "paths d"]
    loss_steps: Int[Array, " grid"] | None = None
    loss_paths: Float[Array, "paths grid"] | None = None
    final_loss_cv: Float[Array, " paths"] | None = None

    @property
    def num_paths(self) -> int:
        return self.final_loss.shape[0]

    @property
    def estimator(self) -> Float[Array, " paths"]:
        """Per-path unbiased estimates of ``E F(x_K)``: ``final_loss_cv`` when present, else
        ``final_loss``."""
        return self.final_loss if self.final_loss_cv is None else self.final_loss_cv

    def mean(self) -> Scalar:
        """Monte Carlo estimate of ``E F(x_K)`` (mean of :attr:`estimator`)."""
        return jnp.mean(self.estimator)

    def stderr(self) -> Scalar:
        """Standard error of :meth:`mean` (sample standard deviation / sqrt(num_paths))."""
        return _stderr(self.estimator, axis=0)

    @property
    def mean_loss(self) -> Float[Array, " grid"] | None:
        """Mean loss on the recorded grid (``None`` when nothing was recorded)."""
        return None if self.loss_paths is None else jnp.mean(self.loss_paths, axis=0)

    @property
    def stderr_loss(self) -> Float[Array, " grid"] | None:
        """Standard error of :attr:`mean_loss` on the recorded grid."""
        return None if self.loss_paths is None else _stderr(self.loss_paths, axis=0)


def _stderr(x: Array, axis: int) -> Array:
    # ddof=1 gives NaN for a single path, which is the honest answer.
    return jnp.std(x, axis=axis, ddof=1) / math.sqrt(x.shape[axis])


# ------------------------------------------------------------------------------------------------
# A problem defined by a per-sample loss and a sampler
# ------------------------------------------------------------------------------------------------
def _is_data_problem(problem) -> bool:
    return problem.is_finite_data


def _is_online_problem(problem) -> bool:
    return problem.is_online


def _example_gradients_fn(problem) -> Callable[[Vector, Array], Array]:
    """``(x, indices) -> (m, d)`` per-example gradients (a finite-data problem's method)."""
    return problem.per_example_gradients


def _online_gradient_fn(problem) -> Callable[[Vector, Array], Vector]:
    """``(x, key) -> (d,)`` gradient of one fresh sample (an online problem's method)."""
    return problem.sample_gradient


def _num_examples(problem) -> int:
    return int(problem.num_examples)


# ------------------------------------------------------------------------------------------------
# Validation shared by both entry points
# ------------------------------------------------------------------------------------------------
def _check_lr(lr) -> Array:
    lr = _as_float_array("lr", lr, ndim=0)
    if _is_concrete(lr) and not float(lr) > 0:
        raise ValueError(f"lr: must be > 0, got {float(lr)}")
    return lr


def _check_positive_int(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: must be a positive int, got {value!r}")
    return int(value)


def _traced_batch_sizes(batch_sizes, *, integer: bool) -> Array:
    """Traced batch sizes: shape checked now, values by ``eqx.error_if`` when the program runs
    (non-integers here; ``< 1`` and ``> n`` by the core's guard)."""
    b = jnp.asarray(batch_sizes)
    if b.ndim != 1 or b.shape[0] == 0:
        raise ValueError(f"batch_sizes: expected a non-empty 1-d array, got shape {b.shape}")
    if not integer:
        b = b.astype(jnp.result_type(float))
        return eqx.error_if(b, jnp.any(~(b > 0)) | jnp.any(~jnp.isfinite(b)),
                            "batch_sizes: must be > 0")
    if jnp.issubdtype(b.dtype, jnp.floating):
        b = eqx.error_if(b, jnp.any(b != jnp.round(b)) | jnp.any(~jnp.isfinite(b)),
                         "batch_sizes: SGD needs integer batch sizes >= 1")
    return b.astype(jnp.int32)


def _check_batch_sizes(batch_sizes, *, integer: bool, max_size: int | None = None) -> Array:
    if not _is_concrete(batch_sizes):
        return _traced_batch_sizes(batch_sizes, integer=integer)
    try:
        b = np.asarray(batch_sizes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"batch_sizes: cannot be converted to a numeric array ({e})") from None
    if b.ndim != 1 or b.shape[0] == 0:
        raise ValueError(f"batch_sizes: expected a non-empty 1-d array, got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise ValueError("batch_sizes: contains NaN or infinite values")
    if integer:
        if np.any(b != np.round(b)) or np.any(b < 1):
            raise ValueError("batch_sizes: SGD needs integer batch sizes >= 1")
        if max_size is not None and np.any(b > max_size):
            raise ValueError(f"batch_sizes: sampling without replacement needs batch sizes <= "
                             f"the number of examples {max_size}, got {int(b.max())}")
        # int32 always, so the dtype of the input never causes a retrace.
        return jnp.asarray(b, dtype=jnp.int32)
    if np.any(b <= 0):
        raise ValueError("batch_sizes: must be > 0")
    return jnp.asarray(b, dtype=jnp.result_type(float))


def _path_keys(key, num_paths: int) -> Array:
    try:
        key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key.astype(jnp.uint32))
    except Exception as e:  # noqa: BLE001 - any failure means it is not a usable key
        raise ValueError(f"key: must be a JAX PRNG key, got {key!r} ({e})") from None
    if key.shape != ():
        raise ValueError(f"key: expected a single PRNG key, got shape {key.shape}")
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_paths))


def _segments(values: Array, record_every: int | None, fill) -> tuple[Array, Array, int]:
    """Reshape per-step ``values`` to ``(segments, r)`` padding with ``fill`` (a padded step is a
    no-op), plus the step indices of the segment ends and the number of real steps."""
    steps = values.shape[0]
    r = steps if record_every is None else min(record_every, steps)
    n_seg = -(-steps // r)
    pad = n_seg * r - steps
    values = jnp.concatenate([values, jnp.full((pad,), fill, values.dtype)]).reshape(n_seg, r)
    ends = jnp.minimum(jnp.arange(1, n_seg + 1) * r, steps)
    return values, ends, steps


def _run_paths(problem, one_path, keys, x0, ends, record_every, control_variate):
    """Run ``one_path`` (returning final params, control-variate term, segment losses) over the
    keys with vmap and package the result; with ``control_variate`` subtract its zero-mean term."""
    x_final, z, seg_losses = jax.vmap(one_path)(keys)
    result = _package(problem, x_final, seg_losses, problem.terminal_value(x0), ends,
                      record_every)
    if control_variate:
        result = SimulationResult(result.final_loss, result.final_params, result.loss_steps,
                                  result.loss_paths, result.final_loss - z)
    return result


def _package(problem, x_final, seg_losses, loss0, ends, record_every) -> SimulationResult:
    final_loss = jax.vmap(problem.terminal_value)(x_final)
    if record_every is None:
        return SimulationResult(final_loss, x_final)
    loss_paths = jnp.concatenate([jnp.broadcast_to(loss0, (x_final.shape[0], 1)), seg_losses], 1)
    steps = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends])
    return SimulationResult(final_loss, x_final, steps, loss_paths)
