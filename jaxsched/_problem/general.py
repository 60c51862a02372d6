"""A general problem from JAX functions (docs/theory.md §1-2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import _as_float_array, _is_concrete
from .._types import Matrix, Scalar, Vector
from .base import AbstractOnlineProblem, AbstractProblem


class Problem(AbstractProblem):
    """A general problem from JAX functions: any twice-differentiable ``loss: R^d -> R`` and any
    state-dependent PSD ``noise_cov: R^d -> (d, d)`` (the per-sample gradient covariance). This is
    the large family of diffusion coefficients of docs/theory.md §2.

    Args:
        loss: ``loss(x)`` (or ``loss(x, args)`` when ``args`` is given), a scalar.
        noise_cov: ``noise_cov(x)`` (or ``noise_cov(x, args)``), a ``(d, d)`` PSD matrix.
        x0: ``(d,)`` initial parameter.
        terminal: optional terminal functional ``F(x)`` (or ``F(x, args)``); defaults to ``loss``.
        args: optional pytree of arrays passed to the functions; put here anything that varies in a
            sweep, so it is an array leaf (vmappable, differentiable, never recompiled).
    """

    loss: Callable[..., Scalar]
    noise_cov: Callable[..., Matrix]
    x0: Vector
    terminal: Callable[..., Scalar] | None = None
    args: Any = None

    def __init__(self, loss, noise_cov, x0, terminal=None, args=None):
        for name, fn in (("loss", loss), ("noise_cov", noise_cov)):
            if not callable(fn):
                raise ValueError(f"{name}: must be a callable, got {type(fn).__name__}")
        if terminal is not None and not callable(terminal):
            raise ValueError(f"terminal: must be a callable or None, got {type(terminal).__name__}")
        self.loss = loss
        self.noise_cov = noise_cov
        self.terminal = terminal
        self.args = args
        self.x0 = _as_float_array("x0", x0, ndim=1)
        if _is_concrete(self.x0, args):
            self._check_shapes()
        self.x0 = self._check_noise_cov_at_x0()

    def _check_noise_cov_at_x0(self) -> Vector:
        """``noise_cov(x0)`` must be symmetric positive semi-definite (a covariance) and ``loss(x0)``
        finite: checked eagerly when they are concrete, with ``eqx.error_if`` (on ``x0``) when
        traced (inside the user's jit, or with traced ``args``)."""
        S = self._call(self.noise_cov, self.x0)
        f0 = self._call(self.loss, self.x0)
        msg = "noise_cov: must return a symmetric positive semi-definite matrix at x0"
        if _is_concrete(S, f0):
            S = np.asarray(S, dtype=np.float64)
            if not np.isfinite(float(np.asarray(f0))):
                raise ValueError("loss: returns NaN or an infinite value at x0")
            if not np.all(np.isfinite(S)):
                raise ValueError("noise_cov: returns NaN or infinite values at x0")
            scale = max(float(np.max(np.abs(S))), np.finfo(np.float64).tiny)
            asym = float(np.max(np.abs(S - S.T))) / scale
            low = float(np.linalg.eigvalsh(0.5 * (S + S.T))[0]) / scale
            if asym > 1e-10 or low < -1e-10:
                raise ValueError(f"{msg} (asymmetry {asym:.3g}, smallest eigenvalue {low * scale:.3g})")
            return self.x0
        scale = jnp.maximum(jnp.max(jnp.abs(S)), jnp.finfo(S.dtype).tiny)
        asym = jnp.max(jnp.abs(S - S.T)) / scale
        low = jnp.linalg.eigvalsh(0.5 * (S + S.T))[0] / scale
        return eqx.error_if(self.x0, (asym > 1e-10) | (low < -1e-10), msg)

    def _call(self, fn, x):
        return fn(x) if self.args is None else fn(x, self.args)

    def _check_shapes(self) -> None:
        d = self.x0.shape[0]
        checks = [("loss", self.loss, ()), ("noise_cov", self.noise_cov, (d, d))]
        if self.terminal is not None:
            checks.append(("terminal", self.terminal, ()))
        for name, fn, shape in checks:
            out = jax.eval_shape(lambda x, fn=fn: self._call(fn, x), self.x0)
            if out.shape != shape:
                what = "a scalar" if shape == () else f"a {shape} matrix"
                raise ValueError(f"{name}: must return {what}, got shape {out.shape}")
            # A float64 constant inside a float32 problem (jax_enable_x64 on) would otherwise fail
            # deep inside the ODE solver with a dtype mismatch.
            if out.dtype != self.x0.dtype:
                raise ValueError(
                    f"x0: has dtype {self.x0.dtype} but {name} returns {out.dtype} (with "
                    "jax_enable_x64 on, Python floats and jnp.eye/jnp.array constants are float64): "
                    "give x0 in the functions' dtype or make them return x0's dtype")

    def value(self, x):
        return self._call(self.loss, x)

    def covariance(self, x):
        return self._call(self.noise_cov, x)

    def terminal_value(self, x):
        if self.terminal is None:
            return self.value(x)
        return self._call(self.terminal, x)

    def terminal_gradient(self, x):
        return jax.grad(self.terminal_value)(x)

    def terminal_hessian(self, x):
        return jax.hessian(self.terminal_value)(x)


class SampledProblem(AbstractOnlineProblem):
    """A problem given by a per-sample loss ``l(x; xi)`` and a sampler of ``xi`` (online data), so
    that real minibatch SGD can be simulated; ``f = E l`` and ``Sigma`` are supplied for the
    expansion (computed exactly or by quadrature, e.g. Gauss–Hermite).

    Example (docs/theory.md §3): ``l(x; a) = log cosh(x - a)``, ``a ~ N(0, 1)``::

        SampledProblem(lambda x, a: jnp.log(jnp.cosh(x[0] - a)),
                       lambda key: jax.random.normal(key),
                       x0=jnp.array([3.0]), loss=f_by_quadrature, noise_cov=sigma_by_quadrature)

    Args:
        per_sample_loss: ``l(x, xi)`` (or ``l(x, xi, args)``), a scalar for one sample ``xi``.
        sampler: ``sampler(key)`` (or ``sampler(key, args)``) returns one sample ``xi`` (a pytree).
        x0: ``(d,)`` initial parameter.
        loss: ``f(x)`` (or ``f(x, args)``) ``= E_xi l(x, xi)``, used for the reported loss and for
            the expansion.
        noise_cov: optional ``Sigma(x)`` (or ``Sigma(x, args)``) ``= Cov_xi grad l(x, xi)``, needed
            by the expansion and by :func:`simulate_sde`, not by :func:`simulate_sgd`.
        terminal: optional terminal functional ``F``; defaults to ``loss``.
        args: optional pytree of arrays passed to every function (vmappable, never recompiled).

    Raises:
        ValueError: naming the argument, for non-callables or wrong shapes.
    """

    per_sample_loss: Callable[..., Scalar]
    sampler: Callable[..., Any]
    x0: Vector
    loss: Callable[..., Scalar]
    noise_cov: Callable[..., Matrix] | None = None
    terminal: Callable[..., Scalar] | None = None
    args: Any = None

    def __init__(self, per_sample_loss, sampler, x0, *, loss, noise_cov=None, terminal=None,
                 args=None):
        for name, fn in (("per_sample_loss", per_sample_loss), ("sampler", sampler), ("loss", loss)):
            if not callable(fn):
                raise ValueError(f"{name}: must be a callable, got {type(fn).__name__}")
        for name, fn in (("noise_cov", noise_cov), ("terminal", terminal)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name}: must be a callable or None, got {type(fn).__name__}")
        self.per_sample_loss = per_sample_loss
        self.sampler = sampler
        self.loss = loss
        self.noise_cov = noise_cov
        self.terminal = terminal
        self.args = args
        self.x0 = _as_float_array("x0", x0, ndim=1)
        if _is_concrete(self.x0, args):
            self._check_shapes()

    def _with_args(self, fn, *xs):
        return fn(*xs) if self.args is None else fn(*xs, self.args)

    def _check_shapes(self) -> None:
        d = self.x0.shape[0]
        xi = jax.eval_shape(lambda k: self._with_args(self.sampler, k), jax.random.key(0))
        out = jax.eval_shape(lambda x, s: self._with_args(self.per_sample_loss, x, s), self.x0, xi)
        if out.shape != ():
            raise ValueError(f"per_sample_loss: must return a scalar, got shape {out.shape}")
        for name, fn, shape in (("loss", self.loss, ()), ("noise_cov", self.noise_cov, (d, d)),
                                ("terminal", self.terminal, ())):
            if fn is not None:
                out = jax.eval_shape(lambda x, fn=fn: self._with_args(fn, x), self.x0)
                if out.shape != shape:
                    raise ValueError(f"{name}: must return shape {shape}, got {out.shape}")

    def value(self, x):
        return self._with_args(self.loss, x)

    def covariance(self, x):
        if self.noise_cov is None:
            raise NotImplementedError("SampledProblem: pass noise_cov= to use Sigma(x)")
        return self._with_args(self.noise_cov, x)

    def terminal_value(self, x):
        return self.value(x) if self.terminal is None else self._with_args(self.terminal, x)

    def terminal_gradient(self, x):
        return jax.grad(self.terminal_value)(x)

    def terminal_hessian(self, x):
        return jax.hessian(self.terminal_value)(x)

    def sample_gradient(self, x: Vector, key) -> Vector:
        """Gradient at ``x`` of the loss of one fresh sample drawn with ``key``."""
        xi = self._with_args(self.sampler, key)
        return jax.grad(lambda z: self._with_args(self.per_sample_loss, z, xi))(x)


# ------------------------------------------------------------------------------------------------
# Sampling adapters (see the module docstring for the protocol)
# ------------------------------------------------------------------------------------------------
