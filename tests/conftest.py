"""Test configuration and shared builders: float64 everywhere, so tolerances reflect the
mathematics, not rounding; a monkeypatch-based trace counter."""

import collections

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def trace_counter(monkeypatch):
    """``watch(module, name)`` replaces ``module.name`` by a counting wrapper; ``counts[name]`` is
    then the number of calls. Install it after a warm-up call: a function that only runs while JAX
    traces is called again only if something retraces, so ``counts == {}`` proves no recompile."""
    counts: collections.Counter = collections.Counter()

    def watch(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    return watch, counts
