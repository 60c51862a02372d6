"""The one home of argument validation (host-side messages naming the argument), of the tracer
test that decides whether values can be checked eagerly, and of atomic file writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._types import Array


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


def as_positive_scalar(name: str, value) -> Array:
    """A floating scalar array; refused eagerly when concrete and not finite and > 0."""
    try:
        arr = jnp.asarray(value)
    except TypeError:
        raise ValueError(f"{name}: must be a number, got {value!r}") from None
    if arr.ndim != 0:
        raise ValueError(f"{name}: must be a scalar, got shape {arr.shape}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    if _is_concrete(arr):
        v = float(arr)
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: must be a finite number > 0, got {v}")
    return arr


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps: must be a Python int, got {steps!r}")
    if steps <= 0:
        raise ValueError(f"steps: must be > 0, got {steps}")
    return int(steps)


def as_batch_sizes(batch_sizes, name: str = "batch_sizes") -> Array:
    try:
        b = jnp.asarray(batch_sizes)
    except TypeError:
        raise ValueError(f"{name}: must be an array of batch sizes") from None
    if b.ndim != 1 or b.shape[0] == 0:
        raise ValueError(f"{name}: must be a non-empty 1-D array, got shape {b.shape}")
    b = b.astype(jnp.result_type(float))
    if _is_concrete(b):
        bn = np.asarray(b)
        if not np.all(np.isfinite(bn)) or np.any(bn <= 0):
            raise ValueError(f"{name}: every batch size must be finite and > 0")
    return b




def exprel(x: Array) -> Array:
    """``(e^x - 1) / x`` (``= 1`` at 0) via ``expm1``; the Taylor series below ``|x| = 1e-4`` keeps
    it exact and differentiable at 0 (error ``< x^4 / 120``, under 1e-18 there). The one home of
    this formula: the eigenbasis step integrals and the exact recursion's rates use it."""
    small = jnp.abs(x) < 1e-4
    safe = jnp.where(small, jnp.ones_like(x), x)
    series = 1.0 + x / 2.0 + x**2 / 6.0 + x**3 / 24.0
    return jnp.where(small, series, jnp.expm1(safe) / safe)


def atomic_write_files(
    out: str, writers: dict[str, Callable[[str], None]], *, create: bool = True
) -> list[str]:
    """Write each file of ``writers`` (name -> function writing to a given path) into folder ``out``
    through a temporary name in the same folder, then rename them all; on any failure (or
    ``KeyboardInterrupt``) remove the temporaries and leave existing files untouched. Files get the
    usual permissions (``0666 & ~umask``), not ``mkstemp``'s 0600. The one home of atomic writes:
    ``jaxsched optimize`` and the sweep's chunk files both use it."""
    if create:
        os.makedirs(out, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            temps[name] = tmp
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~umask)
        for name, tmp in temps.items():
            os.replace(tmp, os.path.join(out, name))
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    return [os.path.join(out, name) for name in writers]


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write one file atomically: ``write`` receives an open file object (binary by default)."""

    def to_path(tmp: str) -> None:
        with open(tmp, mode) as f:
            write(f)

    folder, name = os.path.split(os.path.abspath(path))
    atomic_write_files(folder, {name: to_path}, create=False)
