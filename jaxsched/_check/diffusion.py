"""Monte Carlo of the diffusion family of SGD (docs/theory.md §2):

    dX = -grad f dt - (h/4) grad |grad f|^2 dt + sqrt(h u(t)) sigma(X) dW,

integrated with diffrax (a ``VirtualBrownianTree`` per step, so the solve can be differentiated) or
with a fast forward-only ``lax.scan`` whose noise is drawn inside the scan; vmapped over paths, with
the same :class:`SimulationResult`, key protocol and recording grid as :func:`simulate_sgd`.
"""

from __future__ import annotations

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

from .._misc import _is_concrete
from .._problem.base import AbstractProblem
from .._types import Matrix
from ._common import (
    SimulationResult,
    _check_batch_sizes,
    _check_lr,
    _check_positive_int,
    _example_gradients_fn,
    _is_data_problem,
    _num_examples,
    _path_keys,
    _run_paths,
    _segments,
)

__all__ = ["simulate_sde"]

# ------------------------------------------------------------------------------------------------
# The diffusion
# ------------------------------------------------------------------------------------------------
_DEFAULT_SUBSTEPS = {"euler": 16, "srk": 4}


#: Up to this dimension the Cholesky factor is written out elementwise: for the small matrices of
#: low-dimensional problems a fused elementwise kernel is several times faster, batched over paths
#: inside a loop, than a call to LAPACK per loop iteration.
_UNROLLED_CHOLESKY_MAX_DIM = 8


def _unrolled_cholesky(a: Matrix) -> Matrix:
    """Lower Cholesky factor of a small SPD matrix by the textbook recursion, unrolled at trace
    time (``d(d+1)/2`` scalar expressions)."""
    d = a.shape[-1]
    low = [[None] * d for _ in range(d)]
    for j in range(d):
        low[j][j] = jnp.sqrt(a[j, j] - sum(low[j][k] ** 2 for k in range(j)))
        for i in range(j + 1, d):
            low[i][j] = (a[i, j] - sum(low[i][k] * low[j][k] for k in range(j))) / low[j][j]
    zero = jnp.zeros((), a.dtype)
    return jnp.stack([jnp.stack([low[i][j] if j <= i else zero for j in range(d)])
                      for i in range(d)])


def _diffusion_fns(problem):
    """``sigma0(x)`` with ``sigma0 sigma0^T = Sigma(x)`` (the noise is ``sqrt(h u) sigma0 dW``),
    the Brownian dimension, and ``ito_to_strat(x) = sum_j Dsigma0_j(x)[sigma0_j(x)]`` (half of it,
    times ``h u``, is the Itô-to-Stratonovich drift shift).

    Data problems use the ``d x n`` matrix of centred per-example gradients over ``sqrt(n)``
    driven by ``n`` Brownian motions (docs/theory.md §2): no factorisation. Others use the Cholesky factor
    of ``Sigma(x)`` with a jitter of ``1e-12`` of its mean eigenvalue (so a singular ``Sigma``,
    e.g. at an optimum without label noise, does not give NaN)."""
    if _is_data_problem(problem):
        grads_of = _example_gradients_fn(problem)
        n = _num_examples(problem)
        idx = jnp.arange(n, dtype=jnp.int32)

        def sigma0(x):
            g = grads_of(x, idx)
            return (g - g.mean(0)).T / math.sqrt(n)

        def ito_to_strat(x):
            # sum_j D(g_j - gbar)[(g_j - gbar)/n]: the gbar part sums to H . 0 = 0.
            c = sigma0(x).T / math.sqrt(n)

            def one(j, cj):
                return jax.jvp(lambda z: grads_of(z, j[None])[0], (x,), (cj,))[1]

            return jax.vmap(one)(idx, c).sum(0)

        return sigma0, n, ito_to_strat

    d = problem.dim
    cholesky = _unrolled_cholesky if d <= _UNROLLED_CHOLESKY_MAX_DIM else jnp.linalg.cholesky

    def sigma0(x):
        s = problem.covariance(x)
        s = 0.5 * (s + s.T)
        jitter = 1e-12 * jnp.trace(s) / d + jnp.finfo(s.dtype).tiny
        return cholesky(s + jitter * jnp.eye(d, dtype=s.dtype))

    def ito_to_strat(x):
        sig = sigma0(x)
        cols = jax.vmap(lambda v: jax.jvp(sigma0, (x,), (v,))[1], in_axes=1)(sig)  # (j, d, d)
        return jnp.einsum("jij->i", cols)

    return sigma0, d, ito_to_strat


def simulate_sde(problem: AbstractProblem, batch_sizes, *, lr, num_paths: int, key,
                 correction: bool = True, solver: str = "srk", method: str = "diffrax",
                 dt: float | None = None, record_every: int | None = None,
                 control_variate: bool = False) -> SimulationResult:
    """Monte Carlo of the diffusion of docs/theory.md §2 on ``[0, T]``, ``T = K h``:

        dX = -grad f dt - (h/4) grad |grad f|^2 dt + sqrt(h u(t)) sigma(X) dW,

    with ``u(t) = noise_weight(b_k)`` on step ``k`` (``1/b_k`` with replacement) and
    ``sigma sigma^T = Sigma``. The correction term (``(h/2) H grad f``, by a Jacobian-vector
    product) makes the family weak order 2 in ``h``; without it the mean loss moves by about
    ``-h grad F(x_T) . mc_T`` (docs/theory.md §3), i.e. by ``-h`` times the correction part of ``J1``.

    ``method="diffrax"`` solves each step ``[kh, (k+1)h]`` with ``diffrax.diffeqsolve`` driven by a
    ``VirtualBrownianTree`` (so it can be differentiated, e.g. in ``lr`` or problem arguments,
    with pathwise gradients). ``method="scan"`` is a forward-only ``lax.scan`` with the Gaussian
    increments drawn inside the scan, for large Monte Carlo runs.

    Solvers (``dt`` is rounded down to ``h / substeps``, an integer number per step):

    - ``"euler"``: Euler–Maruyama (Itô). Its weak error ``O(dt)`` includes an ``O(dt)`` drift error
      of the same kind as the ``O(h)`` effects measured here, so the default ``dt`` is ``h/16``.
    - ``"srk"``: a stochastic Runge–Kutta scheme whose deterministic part is second order, so the
      solver error is ``O(dt^2 + h dt)`` (the noise has variance ``O(h)``); default ``dt = h/4``.
      With diffrax it is ``diffrax.GeneralShARK`` (valid for general, non-commuting noise;
      Stratonovich, so the drift is shifted by ``-(h u / 2) sum_j Dsigma_j sigma_j``, computed
      exactly by Jacobian-vector products). With ``method="scan"`` it is the Itô predictor–corrector
      ``x~ = x + b dt + dW-term``, ``x' = x + (b(x) + b(x~)) dt / 2 + dW-term``.

    Args:
        problem: any problem with ``gradient`` and ``covariance`` (or a data problem, which uses
            the ``d x n`` centred per-example gradients and ``n`` Brownian motions).
        batch_sizes: ``(K,)`` batch sizes ``b_k > 0`` (real values allowed).
        lr: learning rate ``h > 0``.
        num_paths: number of independent paths.
        key: JAX PRNG key. A fixed key gives identical results; runs with the same key and
            different ``correction`` share their Brownian paths (common random numbers).
        correction: include the ``-(h/4) grad |grad f|^2`` drift.
        solver: ``"euler"`` or ``"srk"``.
        method: ``"diffrax"`` or ``"scan"``.
        dt: solver step (``<= h``); default see above.
        record_every: if given, also record every path's loss at steps ``0, r, 2r, ..., K``.
        control_variate: ``method="scan"`` only: also return ``final_loss_cv = F(X_T) - Z``, where
            ``Z`` is the linear response of ``F`` to the Gaussian increments along the noise-free
            path (``E Z = 0`` exactly, so the expectation is unchanged and the ``O(h)`` leading
            fluctuation cancels; see :func:`simulate_sgd`).

    Returns:
        :class:`SimulationResult`.

    Raises:
        ValueError: naming the argument, for ``lr <= 0``, ``num_paths < 1``, non-positive batch
            sizes, an unknown solver or method, ``control_variate`` without ``method="scan"``,
            ``dt <= 0`` or ``dt > lr``, ``dt`` with a traced ``lr``, or a bad key /
            ``record_every``.
    """
    if solver not in _DEFAULT_SUBSTEPS:
        raise ValueError(f"solver: must be 'euler' or 'srk', got {solver!r}")
    if method not in ("diffrax", "scan"):
        raise ValueError(f"method: must be 'diffrax' or 'scan', got {method!r}")
    if not isinstance(correction, bool):
        raise ValueError(f"correction: must be a bool, got {correction!r}")
    if not isinstance(control_variate, bool):
        raise ValueError(f"control_variate: must be a bool, got {control_variate!r}")
    if control_variate and method != "scan":
        raise ValueError("control_variate: only available with method='scan'")
    lr = _check_lr(lr)
    num_paths = _check_positive_int("num_paths", num_paths)
    record_every = _check_positive_int("record_every", record_every, allow_none=True)
    batch_sizes = _check_batch_sizes(batch_sizes, integer=False)
    if dt is None:
        substeps = _DEFAULT_SUBSTEPS[solver]
    else:
        if not _is_concrete(lr):
            raise ValueError("dt: cannot be used with a traced lr; leave dt=None")
        dt = float(dt)
        if not (math.isfinite(dt) and 0 < dt <= float(lr) * (1 + 1e-12)):
            raise ValueError(f"dt: must satisfy 0 < dt <= lr = {float(lr)}, got {dt}")
        substeps = max(1, math.ceil(float(lr) / dt - 1e-9))
    keys = _path_keys(key, num_paths)
    # correction is an array leaf (0 or 1), so switching it does not recompile.
    corr = jnp.asarray(1.0 if correction else 0.0, dtype=lr.dtype)
    return _sde_core(problem, batch_sizes, lr, corr, keys, solver=solver, method=method,
                     substeps=substeps, record_every=record_every,
                     control_variate=control_variate)


@eqx.filter_jit
def _sde_core(problem, batch_sizes, lr, corr, keys, *, solver, method, substeps, record_every,
              control_variate):
    b_seg, ends, _ = _segments(batch_sizes, record_every, 0.0)
    k_seg = jnp.arange(b_seg.size, dtype=jnp.int32).reshape(b_seg.shape)
    sigma0, m, ito_to_strat = _diffusion_fns(problem)
    x0 = problem.x0
    h = lr.astype(x0.dtype)
    dt = h / substeps

    def weight(b):
        """``u = noise_weight(b)``; ``b == 0`` marks a padding step (inactive)."""
        active = b > 0
        return active, problem.noise_weight(jnp.where(active, b, 1.0))

    def drift(x, u):
        g = problem.gradient(x)
        # (h/4) grad |grad f|^2 = (h/2) H grad f, by one Jacobian-vector product
        out = -g - corr * 0.5 * h * jax.jvp(problem.gradient, (x,), (g,))[1]
        if solver == "srk" and method == "diffrax":
            out = out - 0.5 * h * u * ito_to_strat(x)
        return out

    def scheme(x, u, noise):
        """One substep of the scan scheme given its noise increment ``sqrt(h u) sigma0 dW``."""
        bx = drift(x, u)
        if solver == "euler":
            return x + bx * dt + noise
        xp = x + bx * dt + noise
        return x + 0.5 * (bx + drift(xp, u)) * dt + noise

    def step_scan(x, u, skey, cv_coef):
        scale = jnp.sqrt(h * u * dt)

        # all increments of the step in one draw (one generator call instead of one per substep)
        zs = jax.random.normal(skey, (substeps, m), x.dtype)
        z_acc = jnp.sum(cv_coef * zs) if control_variate else jnp.zeros((), x.dtype)

        def sub(j, x):
            return scheme(x, u, scale * (sigma0(x) @ zs[j]))

        # unrolled: the substeps are few and static, and the loop overhead is then gone
        return jax.lax.fori_loop(0, substeps, sub, x, unroll=True), z_acc

    def step_diffrax(x, u, skey, cv_coef):
        levy = diffrax.SpaceTimeLevyArea if solver == "srk" else diffrax.BrownianIncrement
        # One tree per step on the local interval [0, h]: independent Brownian pieces make one
        # Brownian motion, and u is constant on the whole solve (no stage lands on a step edge).
        bm = diffrax.VirtualBrownianTree(0.0, h, tol=dt / 2, shape=(m,), key=skey, levy_area=levy)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, args: drift(y, args)),
            diffrax.ControlTerm(lambda t, y, args: jnp.sqrt(h * args) * sigma0(y), bm))
        sol = diffrax.diffeqsolve(
            terms, diffrax.GeneralShARK() if solver == "srk" else diffrax.Euler(), 0.0, h, dt, x, u,
            saveat=diffrax.SaveAt(t1=True), max_steps=substeps + 2)
        return sol.ys[-1], jnp.zeros((), x.dtype)

    step_fn = step_diffrax if method == "diffrax" else step_scan
    if control_variate:
        cv_seg = _sde_control_coefficients(problem, b_seg.reshape(-1), weight, drift, scheme,
                                           sigma0, h, dt, substeps)
        cv_seg = cv_seg.reshape(b_seg.shape + cv_seg.shape[1:])
    else:
        cv_seg = jnp.zeros(b_seg.shape + (0,), x0.dtype)

    def one_path(pkey):
        def step(carry, inp):
            x, z = carry
            k, b, cv_coef = inp
            active, u = weight(b)
            x_new, dz = step_fn(x, u, jax.random.fold_in(pkey, k), cv_coef)
            return (jnp.where(active, x_new, x), z + jnp.where(active, dz, 0.0)), None

        def segment(carry, inp):
            carry, _ = jax.lax.scan(step, carry, inp)
            return carry, problem.terminal_value(carry[0])

        init = (x0, jnp.zeros((), x0.dtype))
        (x, z), losses = jax.lax.scan(segment, init, (k_seg, b_seg, cv_seg))
        return x, z, losses

    return _run_paths(problem, one_path, keys, x0, ends, record_every, control_variate)


def _sde_control_coefficients(problem, b_flat, weight, drift, scheme, sigma0, h, dt, substeps):
    """Coefficients ``a_{k,j}`` (``(K, substeps, m)``) of the control variate
    ``Z = sum a_{k,j} . z_{k,j}`` of the scan method: the linear response of ``F`` to the standard
    normal increments ``z`` along the noise-free path ``xbar`` of the same scheme,
    ``a = sqrt(h u dt) sigma0(xbar)^T lam`` with ``lam_N = grad F(xbar_N)`` and
    ``lam_n = (I + dt Db(xbar_n)) lam_{n+1}`` (``Db`` is symmetric: the drift is a gradient). Any
    deterministic coefficients give ``E Z = 0``; these make ``Z`` cancel the leading fluctuation."""

    def forward(x, b):
        active, u = weight(b)

        def sub(x, _):
            return scheme(x, u, jnp.zeros_like(x)), x

        x_new, xs = jax.lax.scan(sub, x, None, length=substeps)
        return jnp.where(active, x_new, x), xs

    x_last, xbar = jax.lax.scan(forward, problem.x0, b_flat)

    def backward(lam, inp):
        xs, b = inp
        active, u = weight(b)
        scale = jnp.sqrt(h * u * dt)

        def sub(lam, x):
            coef = scale * (sigma0(x).T @ lam)
            return lam + dt * jax.jvp(lambda y: drift(y, u), (x,), (lam,))[1], coef

        lam_new, coefs = jax.lax.scan(sub, lam, xs, reverse=True)
        return jnp.where(active, lam_new, lam), jnp.where(active, coefs, 0.0)

    _, coefs = jax.lax.scan(backward, problem.terminal_gradient(x_last), (xbar, b_flat),
                            reverse=True)
    return coefs
