"""A per-step batch-size table as a pytree: ``step -> batch size`` inside or outside ``jit``.

The table is an array leaf, so a jitted training step that takes a :class:`BatchSchedule` as an
argument is traced once per table *shape*; a new table of the same length reuses the compiled code.
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, ArrayLike, Int


def _as_table(batch_sizes) -> Array:
    """Validate a table of batch sizes: 1-D, non-empty, integral and (when concrete) > 0."""
    try:
        b = jnp.asarray(batch_sizes)
    except TypeError:
        raise ValueError("batch_sizes: must be an array of integers") from None
    if b.ndim != 1 or b.shape[0] < 1:
        raise ValueError(f"batch_sizes: must be a 1-D array of shape (steps,), got {b.shape}")
    concrete = not isinstance(b, jax.core.Tracer)
    if not jnp.issubdtype(b.dtype, jnp.integer):
        if jnp.issubdtype(b.dtype, jnp.bool_):
            raise ValueError("batch_sizes: must be integers, got booleans")
        if concrete:
            v = np.asarray(b)
            if not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
                raise ValueError("batch_sizes: must be integers")
        b = jnp.round(b).astype(jnp.result_type(int))
    if concrete and np.any(np.asarray(b) <= 0):
        raise ValueError(f"batch_sizes: every batch size must be >= 1, got minimum {int(np.min(b))}")
    return b


class BatchSchedule(eqx.Module):
    """A batch-size schedule: a table of per-step batch sizes, callable as ``step -> b_step``.

    Steps before 0 return the first batch size and steps past the end the last one, so a
    training loop that runs a little longer keeps a valid batch. Being an equinox module, it can be
    passed to ``jax.jit``-ed functions (changing the table's values does not retrace; changing its
    length does), vmapped over, and stored in other pytrees.

    Args:
        batch_sizes: ``(steps,)`` integer batch sizes, each ``>= 1``. Integral floats are accepted
            and converted.

    Raises:
        ValueError: naming ``batch_sizes``, if it is not a non-empty 1-D array, has non-integral
            values, or (when its values are known, i.e. outside a trace) a value ``<= 0``.
    """

    batch_sizes: Int[Array, " steps"]

    def __init__(self, batch_sizes: Int[ArrayLike, " steps"]):
        self.batch_sizes = _as_table(batch_sizes)

    def _key(self):
        if isinstance(self.batch_sizes, jax.core.Tracer):
            return None
        return (str(self.batch_sizes.dtype), tuple(np.asarray(self.batch_sizes).tolist()))

    def __hash__(self) -> int:
        # By the table's values, so that ``jax.jit(schedule)`` (which hashes the function) works.
        key = self._key()
        return id(self) if key is None else hash(key)

    def __eq__(self, other) -> bool:
        if not isinstance(other, BatchSchedule):
            return NotImplemented
        key = self._key()
        return self is other if key is None else key == other._key()

    @property
    def steps(self) -> int:
        """Number of steps in the table."""
        return self.batch_sizes.shape[0]

    def __call__(self, step: Int[ArrayLike, "..."]) -> Int[Array, "..."]:
        """The batch size of ``step`` (an int or integer array, possibly traced)."""
        index = jnp.clip(jnp.asarray(step), 0, self.steps - 1)
        return self.batch_sizes[index]

    def samples_consumed(self, step: Int[ArrayLike, "..."]) -> Int[Array, "..."]:
        """Samples drawn by the steps before ``step``: ``sum_{j < step} b_j`` (0 at step 0,
        ``sum b`` at ``step = steps``; past the end every further step adds the last batch size,
        consistently with :meth:`__call__`)."""
        step = jnp.asarray(step)
        cum = jnp.concatenate([jnp.zeros(1, self.batch_sizes.dtype), jnp.cumsum(self.batch_sizes)])
        inside = cum[jnp.clip(step, 0, self.steps)]
        extra = jnp.maximum(step - self.steps, 0).astype(self.batch_sizes.dtype)
        return inside + extra * self.batch_sizes[-1]

    def stages(self) -> list[dict]:
        """Runs of equal batch sizes, in order: ``[{"first_step", "steps", "batch_size",
        "samples_consumed"}, ...]`` with plain Python ints (``samples_consumed`` counts the samples
        drawn before the stage starts). Host-side: not for use inside ``jit``."""
        b = np.asarray(self.batch_sizes)
        starts = np.concatenate([[0], np.flatnonzero(np.diff(b)) + 1])
        ends = np.concatenate([starts[1:], [b.size]])
        before = np.concatenate([[0], np.cumsum(b, dtype=np.int64)])
        return [
            {
                "first_step": int(s),
                "steps": int(e - s),
                "batch_size": int(b[s]),
                "samples_consumed": int(before[s]),
            }
            for s, e in zip(starts, ends, strict=True)
        ]

    def to_json(self) -> str:
        """The schedule as a JSON text, ``{"batch_sizes": [...]}`` (exact: integers)."""
        return json.dumps({"batch_sizes": [int(v) for v in np.asarray(self.batch_sizes)]})

    @classmethod
    def from_json(cls, text: str) -> BatchSchedule:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: naming ``text``, when it is not JSON with a ``batch_sizes`` list, or
                naming ``batch_sizes`` when the list is not a valid table.
        """
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"text: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("batch_sizes"), list):
            raise ValueError('text: expected a JSON object with a "batch_sizes" list')
        values = data["batch_sizes"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError("batch_sizes: every entry must be a JSON integer")
        return cls(np.asarray(values, dtype=np.int64))
