"""Monte Carlo of real minibatch SGD and of its diffusion family (docs/theory.md §1 and 2).

Everything the theory predicts (``expected_loss``, ``exact_expected_loss``) is a statement about one
of the two processes simulated here:

- :func:`simulate_sgd` runs minibatch SGD ``x_{k+1} = x_k - h g_k`` where ``g_k`` is the mean of
  ``b_k`` per-sample gradients (docs/theory.md §1);
- :func:`simulate_sde` integrates the diffusion of docs/theory.md §2,
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

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._optimizer import AbstractOptimizer, as_optimizer
from .._problem.base import AbstractProblem
from .._types import Array
from ._common import (
    SimulationResult,
    _check_batch_sizes,
    _check_lr,
    _check_positive_int,
    _example_gradients_fn,
    _is_data_problem,
    _is_online_problem,
    _num_examples,
    _online_gradient_fn,
    _path_keys,
    _run_paths,
    _segments,
)
from .diffusion import simulate_sde

__all__ = ["SimulationResult", "simulate_sde", "simulate_sgd"]

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
# Minibatch SGD
# ------------------------------------------------------------------------------------------------
def simulate_sgd(problem: AbstractProblem, batch_sizes, *, lr=None,
                 optimizer: AbstractOptimizer | None = None, num_paths: int, key,
                 replace: bool | None = None, record_every: int | None = None,
                 chunk_size: int | None = None, control_variate: bool = False
                 ) -> SimulationResult:
    """Monte Carlo of real minibatch SGD (docs/theory.md §1), optionally with momentum, Nesterov and an lr
    schedule (docs/theory.md §7, 8), vmapped over ``num_paths`` independent paths.

    Each path runs ``optax.sgd(learning_rate=<step k -> s_k>, momentum=mu, nesterov=...)`` itself
    (the optax code, not a re-implementation) on the minibatch gradients
    ``g_k = mean_{j < b_k} grad l(x_k; xi_kj)``. ``lr=h`` alone is plain SGD at a constant rate
    (optax's trace with momentum 0, which is exactly ``x_{k+1} = x_k - h g_k``).

    Gaussian problems draw fresh samples ``a ~ N(0, cov)``, ``y = a . x_star + e``; data problems
    draw example indices uniformly, with replacement or without replacement inside a step; see the
    module docstring for the protocol other problem types implement. Batch sizes, rates and the
    momentum are traced values: one compiled function serves every schedule of the same length
    (one per ``nesterov`` flag), and ``simulate_sgd`` can be called inside ``jax.jit``. Per-sample
    gradients are summed in blocks of at most ``chunk_size`` samples inside the scan, so memory is
    ``O(num_paths * chunk_size * d)`` whatever the batch sizes (sampling without replacement also
    keeps one index permutation of length ``n`` per path).

    Args:
        problem: a data problem (``LinearRegressionData`` or one implementing
            ``per_example_gradients``) or an online one (``GaussianLinearRegression``,
            :class:`SampledProblem` or one implementing ``sample_gradient``).
        batch_sizes: ``(K,)`` integer batch sizes ``b_k >= 1``.
        lr: learning rate ``h > 0`` (plain SGD); give this or ``optimizer``.
        optimizer: a ``js.SGD`` (``lr`` a scalar or a ``(K,)`` schedule, ``momentum``,
            ``nesterov``).
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
            the gradient noise, evaluated with the *same samples* at the point ``xbar_k`` of the
            noise-free run of the same optimizer (``c_k = dF(xbar_K)/d xi_k`` by reverse mode
            through that run). ``E Z = 0`` exactly, so ``final_loss_cv`` has the same expectation
            as ``final_loss``; it removes the ``O(h)`` leading fluctuation and leaves ``O(h^2)``
            variance, typically shrinking the standard error several-fold. Costs a second
            gradient per sample (the samples themselves are shared).

    Returns:
        :class:`SimulationResult` (``final_loss = F(x_K)`` per path, ``final_params``, and the
        recorded grid when asked).

    Raises:
        ValueError: naming the argument, for a problem without samples (a plain ``Problem`` only
            knows ``f`` and ``Sigma``), neither or both of ``lr`` and ``optimizer``, ``lr <= 0``, an
            lr schedule whose length is not ``K``, ``num_paths < 1``, non-integer or non-positive
            batch sizes, batches larger than the data set without replacement, or a bad key /
            ``record_every`` / ``chunk_size``. Traced values are checked when the program runs
            (``eqx.error_if``): a non-positive rate, a momentum outside ``[0, 1)``, batch sizes
            that are not integers ``>= 1`` (``<= n`` without replacement).
    """
    if getattr(optimizer, "is_adaptive", False):  # Adam / RMSprop run by optax (docs/theory.md §9)
        from .adaptive import simulate_adaptive

        return simulate_adaptive(problem, batch_sizes, lr=lr, optimizer=optimizer,
                                 num_paths=num_paths, key=key, replace=replace,
                                 record_every=record_every, chunk_size=chunk_size,
                                 control_variate=control_variate)
    data = _is_data_problem(problem)
    if not data and not _is_online_problem(problem):
        raise ValueError(
            f"problem: {type(problem).__name__} has no samples to draw; simulate_sgd needs a data "
            "problem (per_example_gradients) or an online one (sample_gradient), e.g. "
            "SampledProblem. Use simulate_sde for a problem known only through f and Sigma.")
    if optimizer is None and lr is not None:
        lr = _check_lr(lr)
    opt = as_optimizer(optimizer, lr)
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
    max_size = None if replace else n
    batch_sizes = _check_batch_sizes(batch_sizes, integer=True, max_size=max_size)
    rates = opt.step_sizes(batch_sizes.shape[0])  # a ValueError naming lr on a length mismatch
    if chunk_size is None:
        chunk_size = _default_chunk(num_paths, problem.dim + 1)
    if not isinstance(control_variate, bool):
        raise ValueError(f"control_variate: must be a bool, got {control_variate!r}")
    keys = _path_keys(key, num_paths)
    dtype = problem.x0.dtype
    return _sgd_core(problem, batch_sizes, rates.astype(dtype), opt.momentum.astype(dtype), keys,
                     nesterov=opt.nesterov, data=data, replace=replace, max_size=max_size,
                     chunk=chunk_size, record_every=record_every,
                     control_variate=control_variate)


def _transform(rates, momentum, nesterov: bool) -> optax.GradientTransformation:
    """``optax.sgd`` with the per-step rates looked up by optax's own step count."""
    return optax.sgd(learning_rate=lambda count: rates[count], momentum=momentum,
                     nesterov=nesterov)


def _where(active, new, old):
    """``new`` where ``active`` (a real step), ``old`` on a padding step: for whole pytrees (the
    optimizer state advances only on real steps)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, old)


def _control_path(problem, tx, b_flat):
    """The deterministic quantities of the control variate: the noise-free run of the same
    optimizer, ``xbar_k`` (the point at the start of step ``k``), ``grad f(xbar_k)``, and the
    coefficients ``c_k = dF(xbar_K) / d xi_k`` of the linear response to a gradient perturbation
    ``xi_k`` at step ``k``, by reverse mode through the run (for plain SGD,
    ``c_k = -h lam_{k+1}`` with ``lam_k = (I - h H(xbar_k)) lam_{k+1}``)."""
    x0 = problem.x0

    def run(xis):
        def step(carry, inp):
            x, state = carry
            xi, b = inp
            updates, new_state = tx.update(problem.gradient(x) + xi, state, x)
            return _where(b > 0, (optax.apply_updates(x, updates), new_state), carry), x

        (x_last, _), xbar = jax.lax.scan(step, (x0, tx.init(x0)), (xis, b_flat))
        return problem.terminal_value(x_last), xbar

    coef, xbar = jax.grad(run, has_aux=True)(jnp.zeros((b_flat.shape[0], x0.shape[0]), x0.dtype))
    return xbar, jax.vmap(problem.gradient)(xbar), coef


def _guard(batch_sizes, rates, momentum, max_size):
    """Run-time checks of traced values (no-ops for values already checked eagerly)."""
    rates = eqx.error_if(rates, jnp.any(~(rates > 0)) | jnp.any(~jnp.isfinite(rates)),
                         "lr: must be > 0")
    momentum = eqx.error_if(momentum, ~((momentum >= 0) & (momentum < 1)),
                            "momentum: must satisfy 0 <= momentum < 1")
    bad = jnp.any(batch_sizes < 1)
    if max_size is not None:
        bad = bad | jnp.any(batch_sizes > max_size)
    batch_sizes = eqx.error_if(batch_sizes, bad, "batch_sizes: SGD needs integer batch sizes >= 1"
                               + ("" if max_size is None else f" and <= {max_size}"))
    return batch_sizes, rates, momentum


@eqx.filter_jit
def _sgd_core(problem, batch_sizes, rates, momentum, keys, *, nesterov, data, replace, max_size,
              chunk, record_every, control_variate):
    batch_sizes, rates, momentum = _guard(batch_sizes, rates, momentum, max_size)
    tx = _transform(rates, momentum, nesterov)
    b_seg, ends, _ = _segments(batch_sizes, record_every, 0)
    k_seg = jnp.arange(b_seg.size, dtype=jnp.int32).reshape(b_seg.shape)
    x0 = problem.x0
    d = x0.shape[0]
    # With the control variate every sample's gradient is also taken at the noise-free point
    # xbar_k (same sample), so rows are (x_k, xbar_k); without it there is one row.
    rows = 2 if control_variate else 1
    if control_variate:
        cv_inputs = _control_path(problem, tx, b_seg.reshape(-1))
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
            x, state, z, perm = carry
            k, b, xbar, gbar, coef = inp
            X = jnp.stack([x, xbar]) if control_variate else x[None]
            total, perm = gradient_sum(X, perm, b, jax.random.fold_in(pkey, k))
            # b == 0 marks a padding step: x, the optimizer state and z stay as they are.
            active = b > 0
            mean_g = total / jnp.maximum(b, 1).astype(x.dtype)
            if control_variate:
                z = z + jnp.where(active, jnp.dot(coef, mean_g[1] - gbar), 0.0)
            updates, new_state = tx.update(mean_g[0], state, x)
            x, state = _where(active, (optax.apply_updates(x, updates), new_state), (x, state))
            return (x, state, z, perm), None

        def segment(carry, inp):
            carry, _ = jax.lax.scan(step, carry, inp)
            return carry, problem.terminal_value(carry[0])

        init = (x0, tx.init(x0), jnp.zeros((), x0.dtype), perm0)
        (x, _, z, _), losses = jax.lax.scan(segment, init, (k_seg, b_seg) + cv_seg)
        return x, z, losses

    return _run_paths(problem, one_path, keys, x0, ends, record_every, control_variate)
