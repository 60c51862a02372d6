"""Monte Carlo of real minibatch SGD and of its diffusion family (theory sec. 1 and 2).

Everything the theory predicts (``expected_loss``, ``exact_expected_loss``) is a statement about one
of the two processes simulated here:

- :func:`simulate_sgd` runs minibatch SGD ``x_{k+1} = x_k - h g_k`` where ``g_k`` is the mean of
  ``b_k`` per-sample gradients (theory 1);
- :func:`simulate_sde` integrates the diffusion of theory 2,
  ``dX = -grad f dt - (h/4) grad |grad f|^2 dt + sqrt(h u(t)) sigma(X) dW``, with diffrax (a
  ``VirtualBrownianTree`` per step, so the solve can be differentiated) or with a fast forward-only
  ``lax.scan`` whose noise is drawn inside the scan.

Both are vmapped over Monte Carlo paths and return a :class:`SimulationResult`.

How SGD gets samples (the sampling protocol)
--------------------------------------------
A problem can be simulated by :func:`simulate_sgd` when it gives per-sample gradients in one of two
ways. The built-in problems are handled by adapters in this module; other problem types (for
example a per-example ``DataProblem``) plug in by defining the method.

- **finite data set** (``LinearRegressionData`` or any problem with the two members below):
  ``per_example_gradients(x, indices) -> (m, d)``, the gradients of the per-example losses of the
  examples ``indices`` (an int array of shape ``(m,)``) at ``x``, and ``num_examples`` (an int).
  Optionally a bool attribute ``replace`` (the sampling the problem's ``noise_weight`` assumes).
  Indices are drawn uniformly with replacement, or without replacement inside a step.
- **online samples** (``GaussianLinearRegression``, :class:`SampledProblem` or any problem with the
  method below): ``sample_gradient(x, key) -> (d,)``, the gradient at ``x`` of the loss of one fresh
  sample drawn with the PRNG ``key``.

The reported loss is ``problem.terminal_value`` (the exact ``F``, not a minibatch estimate).

Randomness: path ``i`` uses ``fold_in(key, i)``, step ``k`` of it ``fold_in(path_key, k)`` and
sample ``j`` of that step ``fold_in(step_key, j)``. So a fixed ``key`` gives identical results, path
``i`` does not depend on ``num_paths``, and SGD results do not depend on ``chunk_size`` (up to
the order of floating-point summation).

Control variates: ``control_variate=True`` adds ``final_loss_cv``, an estimator of ``E F`` with the
same expectation and a much smaller variance when the final gradient is not small: the loss minus
its linear response to the noise along the noise-free path, which has mean exactly zero.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._misc import _as_float_array, _is_concrete
from .._problem.base import AbstractProblem
from .._problem.linear import GaussianLinearRegression, LinearRegressionData
from .._types import Array, Float, Int, Matrix, Scalar, Vector

__all__ = ["SimulationResult", "simulate_sde", "simulate_sgd"]

#: Number of times each jitted core has been traced (a diagnostic: a sweep over batch-size values
#: must not retrace). Keys: ``"sgd"``, ``"sde"``.
TRACE_COUNTS: collections.Counter = collections.Counter()


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
    return isinstance(problem, LinearRegressionData) or (
        hasattr(problem, "per_example_gradients") and hasattr(problem, "num_examples"))


def _is_online_problem(problem) -> bool:
    return isinstance(problem, GaussianLinearRegression) or hasattr(problem, "sample_gradient")


def _example_gradients_fn(problem) -> Callable[[Vector, Array], Array]:
    """``(x, indices) -> (m, d)`` per-example gradients."""
    if hasattr(problem, "per_example_gradients"):
        return problem.per_example_gradients

    def linreg(x, idx):
        a = problem.features[idx]
        r = a @ x - problem.targets[idx]
        return a * r[:, None]

    return linreg


def _online_gradient_fn(problem) -> Callable[[Vector, Array], Vector]:
    """``(x, key) -> (d,)`` gradient of one fresh sample. Built once per trace, so the Gaussian
    adapter factorises ``cov`` once and not per sample."""
    if hasattr(problem, "sample_gradient"):
        return problem.sample_gradient
    chol = jnp.linalg.cholesky(problem.cov)
    noise_sd = jnp.sqrt(problem.noise_var)

    def gaussian(x, key):
        z = jax.random.normal(key, (x.shape[0] + 1,), x.dtype)
        a = chol @ z[:-1]
        # y = a . x_star + e, loss (a . x - y)^2 / 2, gradient a (a . (x - x_star) - e)
        return a * (jnp.dot(a, x - problem.x_star) - noise_sd * z[-1])

    return gaussian


def _num_examples(problem) -> int:
    return int(problem.num_examples)


#: Size of the masked tail blocks: a batch of ``b`` samples is ``b // C`` full blocks of ``C`` plus
#: ``ceil((b mod C) / 4)`` blocks of 4 whose samples past ``b`` are masked, so at most 3 samples a
#: step are drawn in vain. Only two block shapes exist, because every distinct block shape costs
#: a separate compilation of the random number generator (about a second each on a CPU).
_TAIL_BLOCK = 4


def _blocked_sum(block_sum: Callable[[Array, Array], Array], count: Array, chunk: int,
                 init: Array) -> Array:
    """``sum_{j < count} g_j`` where ``block_sum(j_block, mask)`` sums ``g_j`` over an int block of
    sample indices where ``mask``. ``count`` is a traced integer: the loops have traced trip counts,
    so one compiled function serves every batch size, and the largest live block has ``chunk``
    samples whatever ``count`` is."""
    tail = min(chunk, _TAIL_BLOCK)
    acc, start = init, jnp.zeros((), jnp.int32)
    if chunk > tail:
        n_full = count // chunk

        def full(i, acc):
            j = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
            return acc + block_sum(j, jnp.ones((chunk,), bool))

        acc = jax.lax.fori_loop(0, n_full, full, acc)
        start = n_full * chunk

    def part(i, acc):
        j = start + i * tail + jnp.arange(tail, dtype=jnp.int32)
        return acc + block_sum(j, j < count)

    return jax.lax.fori_loop(0, (count - start + tail - 1) // tail, part, acc)


def _default_chunk(num_paths: int, width: int) -> int:
    """Largest power of two ``C <= 1024`` with ``num_paths * C * width <= 2^22`` values (32 MiB in
    float64) for one block of per-sample gradients."""
    c = max(1, (1 << 22) // max(1, num_paths * width))
    return int(min(1024, 1 << (c.bit_length() - 1)))


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


def _check_batch_sizes(batch_sizes, *, integer: bool, max_size: int | None = None) -> Array:
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


# ------------------------------------------------------------------------------------------------
# Minibatch SGD
# ------------------------------------------------------------------------------------------------
def simulate_sgd(problem: AbstractProblem, batch_sizes, *, lr, num_paths: int, key,
                 replace: bool | None = None, record_every: int | None = None,
                 chunk_size: int | None = None, control_variate: bool = False
                 ) -> SimulationResult:
    """Monte Carlo of real minibatch SGD, ``x_{k+1} = x_k - h mean_{j < b_k} grad l(x_k; xi_kj)``
    (theory 1), vmapped over ``num_paths`` independent paths.

    Gaussian problems draw fresh samples ``a ~ N(0, cov)``, ``y = a . x_star + e``; data problems
    draw example indices uniformly, with replacement or without replacement inside a step; see the
    module docstring for the protocol other problem types implement. Batch sizes are traced
    values: one compiled function serves every schedule of the same length. Per-sample gradients
    are summed in blocks of at most ``chunk_size`` samples inside the scan, so memory is
    ``O(num_paths * chunk_size * d)`` whatever the batch sizes (sampling without replacement also
    keeps one index permutation of length ``n`` per path).

    Args:
        problem: a data problem (``LinearRegressionData`` or one implementing
            ``per_example_gradients``) or an online one (``GaussianLinearRegression``,
            :class:`SampledProblem` or one implementing ``sample_gradient``).
        batch_sizes: ``(K,)`` integer batch sizes ``b_k >= 1``.
        lr: learning rate ``h > 0``.
        num_paths: number of independent SGD runs.
        key: JAX PRNG key; a fixed key gives identical results.
        replace: data problems only: sample with (``True``) or without (``False``, ``b_k <= n``)
            replacement inside a step. ``None`` follows ``problem.replace`` (default ``True``), so
            the simulation matches the problem's ``noise_weight``.
        record_every: if given, also record every path's loss at steps ``0, r, 2r, ..., K``.
        chunk_size: largest block of per-sample gradients held at once; default chooses a power of
            two keeping one block near 32 MiB. Results do not depend on it (up to rounding).
        control_variate: also return ``final_loss_cv = F(x_K) - Z`` where
            ``Z = sum_k c_k . (g_k(xbar_k) - grad f(xbar_k))`` is the linear response of the loss to
            the gradient noise, evaluated with the *same samples* at the deterministic
            gradient-descent point ``xbar_k`` (``c_k`` by a backward pass of Hessian-vector
            products). ``E Z = 0`` exactly, so ``final_loss_cv`` has the same expectation as
            ``final_loss``; it removes the ``O(h)`` leading fluctuation and leaves ``O(h^2)``
            variance, typically shrinking the standard error several-fold. Costs a second gradient
            per sample (the samples themselves are shared).

    Returns:
        :class:`SimulationResult` (``final_loss = F(x_K)`` per path, ``final_params``, and the
        recorded grid when asked).

    Raises:
        ValueError: naming the argument, for a problem without samples (a plain ``Problem`` only
            knows ``f`` and ``Sigma``), ``lr <= 0``, ``num_paths < 1``, non-integer or
            non-positive batch sizes, batches larger than the data set without replacement, or a
            bad key / ``record_every`` / ``chunk_size``.
    """
    data = _is_data_problem(problem)
    if not data and not _is_online_problem(problem):
        raise ValueError(
            f"problem: {type(problem).__name__} has no samples to draw; simulate_sgd needs a data "
            "problem (per_example_gradients) or an online one (sample_gradient), e.g. "
            "SampledProblem. Use simulate_sde for a problem known only through f and Sigma.")
    lr = _check_lr(lr)
    num_paths = _check_positive_int("num_paths", num_paths)
    record_every = _check_positive_int("record_every", record_every, allow_none=True)
    chunk_size = _check_positive_int("chunk_size", chunk_size, allow_none=True)
    if replace is not None and not isinstance(replace, bool):
        raise ValueError(f"replace: must be a bool or None, got {replace!r}")
    if data:
        replace = bool(getattr(problem, "replace", True)) if replace is None else replace
        n = _num_examples(problem)
    else:
        if replace is False:
            raise ValueError("replace: sampling without replacement needs a finite data set; "
                             f"{type(problem).__name__} draws fresh samples")
        replace, n = True, None
    batch_sizes = _check_batch_sizes(batch_sizes, integer=True,
                                     max_size=None if replace else n)
    if chunk_size is None:
        chunk_size = _default_chunk(num_paths, problem.dim + 1)
    if not isinstance(control_variate, bool):
        raise ValueError(f"control_variate: must be a bool, got {control_variate!r}")
    keys = _path_keys(key, num_paths)
    return _sgd_core(problem, batch_sizes, lr, keys, data=data, replace=replace,
                     chunk=chunk_size, record_every=record_every,
                     control_variate=control_variate)


def _gd_control_path(problem, b_flat, lr):
    """The deterministic quantities of the control variate: the gradient-descent path ``xbar_k``
    (the point at the start of step ``k``), ``grad f(xbar_k)``, and the coefficients
    ``c_k = -h lam_{k+1}`` of the linear response ``grad F(xbar_K) . (x_K - xbar_K) ~ sum_k c_k .
    xi_k`` to the gradient noise ``xi_k``, with ``lam_K = grad F(xbar_K)``,
    ``lam_k = (I - h H(xbar_k)) lam_{k+1}`` (Hessian-vector products)."""

    def forward(x, b):
        return jnp.where(b > 0, x - lr * problem.gradient(x), x), x

    x_last, xbar = jax.lax.scan(forward, problem.x0, b_flat)

    def backward(lam, inp):
        x, b = inp
        hvp = jax.jvp(problem.gradient, (x,), (lam,))[1]
        return jnp.where(b > 0, lam - lr * hvp, lam), -lr * lam

    _, coef = jax.lax.scan(backward, problem.terminal_gradient(x_last), (xbar, b_flat),
                           reverse=True)
    return xbar, jax.vmap(problem.gradient)(xbar), coef


@eqx.filter_jit
def _sgd_core(problem, batch_sizes, lr, keys, *, data, replace, chunk, record_every,
              control_variate):
    TRACE_COUNTS["sgd"] += 1
    b_seg, ends, _ = _segments(batch_sizes, record_every, 0)
    k_seg = jnp.arange(b_seg.size, dtype=jnp.int32).reshape(b_seg.shape)
    x0 = problem.x0
    lr = lr.astype(x0.dtype)
    d = x0.shape[0]
    # With the control variate every sample's gradient is also taken at the gradient-descent
    # point xbar_k (same sample), so rows are (x_k, xbar_k); without it there is one row.
    rows = 2 if control_variate else 1
    if control_variate:
        cv_inputs = _gd_control_path(problem, b_seg.reshape(-1), lr)
    else:
        cv_inputs = tuple(jnp.zeros((b_seg.size, d), x0.dtype) for _ in range(3))
    cv_seg = tuple(a.reshape(b_seg.shape + (d,)) for a in cv_inputs)

    if data:
        grads_of = _example_gradients_fn(problem)
        n = _num_examples(problem)
    else:
        grad_of = _online_gradient_fn(problem)

    def gradient_sum(X, perm, b, skey):
        """Sums over the ``b`` samples of one step of their gradients at each row of ``X``
        (``(rows, d)``), and the updated permutation."""
        def masked_sum(g, mask):  # g: (rows, size, d)
            return jnp.where(mask[None, :, None], g, 0.0).sum(1)

        def at_rows(idx):
            return jax.vmap(lambda xx: grads_of(xx, idx))(X)

        if not data:
            def one(jj):
                return jax.vmap(grad_of, in_axes=(0, None))(X, jax.random.fold_in(skey, jj))

            def block(j, mask):
                return masked_sum(jnp.swapaxes(jax.vmap(one)(j), 0, 1), mask)
        elif replace:
            def block(j, mask):
                idx = jax.vmap(lambda jj: jax.random.randint(
                    jax.random.fold_in(skey, jj), (), 0, n, jnp.int32))(j)
                return masked_sum(at_rows(idx), mask)
        else:
            # Partial Fisher–Yates from the path's current arrangement: after the swaps,
            # perm[:b] is a uniform random b-subset (any starting order works), in O(b) work.
            def swap(j, p):
                r = jax.random.randint(jax.random.fold_in(skey, j), (), j, n, jnp.int32)
                # one scatter of both entries: XLA then updates the loop carry in place (two
                # chained scatters made it copy the whole permutation on every swap)
                return p.at[jnp.stack([j, r])].set(jnp.stack([p[r], p[j]]))

            perm = jax.lax.fori_loop(0, b, swap, perm)

            def block(j, mask):
                # j may run past n in the masked tail: clamp the gather, the mask drops it.
                return masked_sum(at_rows(perm[jnp.minimum(j, n - 1)]), mask)
        return _blocked_sum(block, b, chunk, jnp.zeros((rows, d), x0.dtype)), perm

    def one_path(pkey):
        perm0 = jnp.arange(n, dtype=jnp.int32) if (data and not replace) else jnp.zeros((0,))

        def step(carry, inp):
            x, z, perm = carry
            k, b, xbar, gbar, coef = inp
            X = jnp.stack([x, xbar]) if control_variate else x[None]
            total, perm = gradient_sum(X, perm, b, jax.random.fold_in(pkey, k))
            # b == 0 marks a padding step: total is 0 there, so x and z are unchanged.
            mean_g = total / jnp.maximum(b, 1).astype(x.dtype)
            if control_variate:
                z = z + jnp.where(b > 0, jnp.dot(coef, mean_g[1] - gbar), 0.0)
            return (x - lr * mean_g[0], z, perm), None

        def segment(carry, inp):
            carry, _ = jax.lax.scan(step, carry, inp)
            return carry, problem.terminal_value(carry[0])

        init = (x0, jnp.zeros((), x0.dtype), perm0)
        (x, z, _), losses = jax.lax.scan(segment, init, (k_seg, b_seg) + cv_seg)
        return x, z, losses

    return _run_paths(problem, one_path, keys, x0, ends, record_every, control_variate)


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
    driven by ``n`` Brownian motions (theory 2): no factorisation. Others use the Cholesky factor
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
    """Monte Carlo of the diffusion of theory 2 on ``[0, T]``, ``T = K h``:

        dX = -grad f dt - (h/4) grad |grad f|^2 dt + sqrt(h u(t)) sigma(X) dW,

    with ``u(t) = noise_weight(b_k)`` on step ``k`` (``1/b_k`` with replacement) and
    ``sigma sigma^T = Sigma``. The correction term (``(h/2) H grad f``, by a Jacobian-vector
    product) makes the family weak order 2 in ``h``; without it the mean loss moves by about
    ``-h grad F(x_T) . mc_T`` (theory 3), i.e. by ``-h`` times the correction part of ``J1``.

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
    TRACE_COUNTS["sde"] += 1
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
