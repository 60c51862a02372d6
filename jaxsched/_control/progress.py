"""Progress meters for the iterative schedule optimisers, passed in as objects (like diffrax's
``progress_meter=``).

A meter's ``session(total, desc)`` opens the display on the host and yields a *live* meter, an
equinox module whose only leaf is an integer id: every live meter has the same structure, so runs
with and without a bar share one compiled function. Inside the traced loop the live meter ticks
through ``jax.debug.callback`` (optimistix calls it as its ``verbose`` hook once per iteration);
under ``vmap`` each batch element ticks, so the bar counts iterations of the whole batch. The open
displays are kept in a host-side table keyed by the id, as diffrax keeps its tqdm bars.
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array

__all__ = ["ProgressMeter", "NoProgress", "TqdmProgress", "LiveMeter"]

_BARS: dict[int, object] = {}
_IDS = itertools.count()
_LOCK = threading.Lock()


def _tick(bar_id, loss) -> None:
    with _LOCK:
        bar = _BARS.get(int(bar_id))
    if bar is not None:
        bar.update(1)
        bar.set_postfix(objective=f"{float(loss):.6g}", refresh=False)


class LiveMeter(eqx.Module):
    """The traced side of a meter: ``callback`` is optimistix's ``verbose`` hook."""

    bar_id: Array

    def callback(self, **kwargs) -> None:
        loss = kwargs["loss_this_step"][1] if "loss_this_step" in kwargs else jnp.zeros(())
        jax.debug.callback(_tick, self.bar_id, loss)


class ProgressMeter(eqx.Module):
    """Base class: ``session`` yields the :class:`LiveMeter` to pass into the traced loop."""

    @contextlib.contextmanager
    def session(self, total: int, desc: str):
        yield LiveMeter(jnp.asarray(-1, jnp.int32))


class NoProgress(ProgressMeter):
    """No display (the default)."""


class TqdmProgress(ProgressMeter):
    """A tqdm bar over the optimiser's iterations (``tqdm.auto``: a widget in notebooks)."""

    @contextlib.contextmanager
    def session(self, total: int, desc: str):
        from tqdm.auto import tqdm

        bar = tqdm(total=int(total) or None, desc=desc, unit="it")
        with _LOCK:
            key = next(_IDS)
            _BARS[key] = bar
        try:
            yield LiveMeter(jnp.asarray(key, jnp.int32))
        finally:
            with _LOCK:
                _BARS.pop(key, None)
            bar.close()
