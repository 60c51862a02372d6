"""Monte Carlo of real minibatch Adam and RMSprop (docs/theory.md §9).

Each path runs the optimizer's own optax transformation (``optax.adam`` /
``optax.rmsprop(eps_in_sqrt=False)``, from :meth:`AbstractAdaptiveOptimizer.optax_transform`) on the
minibatch gradients ``g_k = mean_{j < b_k} grad l(x_k; xi_kj)``, vmapped over paths. Samples follow
the protocol of :mod:`jaxsched._check.simulate`: fresh samples for an online problem, example indices
drawn uniformly *with replacement* for a finite data set; the randomness is keyed the same way (path
``i`` uses ``fold_in(key, i)``, step ``k`` ``fold_in(path_key, k)``, sample ``j``
``fold_in(step_key, j)``), so results do not depend on ``num_paths`` or ``chunk_size``.

Batch sizes, learning rates, ``b1``, ``b2`` and ``eps`` are traced: one compiled function serves
every schedule of a given length and every setting of the optimizer.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._optimizer import AbstractAdaptiveOptimizer
from .._problem.base import AbstractProblem
from ._common import (
    SimulationResult,
    _check_batch_sizes,
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
from .simulate import _blocked_sum, _default_chunk, _where

__all__ = ["simulate_adaptive"]


def simulate_adaptive(problem: AbstractProblem, batch_sizes, *, optimizer: AbstractAdaptiveOptimizer,
                      num_paths: int, key, lr=None, replace: bool | None = None,
                      record_every: int | None = None, chunk_size: int | None = None,
                      control_variate: bool = False) -> SimulationResult:
    """Monte Carlo of real minibatch Adam / RMSprop (docs/theory.md §9), ``num_paths`` paths.

    Args:
        problem: an online problem (``sample_gradient``, e.g. ``GaussianLinearRegression``) or a
            finite data set (``per_example_gradients``), sampled with replacement.
        batch_sizes: ``(K,)`` integer batch sizes ``>= 1`` (traced values allowed).
        optimizer: :class:`jaxsched.Adam` or :class:`jaxsched.RMSprop` (``lr`` a scalar or ``(K,)``).
        num_paths: number of independent runs.
        key: JAX PRNG key.
        lr: must be ``None`` (the optimizer holds its learning rate); accepted so that
            ``simulate_sgd(..., optimizer=js.Adam(...))`` forwards here unchanged.
        replace: ``None`` or ``True`` (sampling with replacement, the only protocol of §9).
        record_every: also record every path's loss at steps ``0, r, 2r, ..., K``.
        chunk_size: largest block of per-sample gradients held at once (results do not depend on
            it up to rounding).
        control_variate: also return ``final_loss_cv = F(x_K) - Z``, ``Z`` the linear response
            of ``F`` to the gradient noise along the moment model's mean path of §9.2 (same
            samples, gradients also taken at the mean path's points), which has mean exactly zero.

    Returns:
        :class:`jaxsched.SimulationResult`.

    Raises:
        ValueError: naming the argument, for a problem without samples, a data set sampled
            without replacement (the moment model of §9 assumes replacement), a non-adaptive
            ``optimizer``, bad batch sizes, ``num_paths``, key, ``record_every`` or ``chunk_size``.
            Traced batch sizes that are not integers ``>= 1`` are refused when the program runs.
    """
    if not isinstance(optimizer, AbstractAdaptiveOptimizer):
        raise ValueError(f"optimizer: expected js.Adam or js.RMSprop, got {type(optimizer).__name__}")
    if lr is not None:
        raise ValueError("lr: give either lr= or optimizer=, not both (the optimizer holds its lr)")
    if replace is not None and replace is not True:
        raise ValueError(f"replace: the Adam/RMSprop Monte Carlo samples with replacement, got {replace!r}")
    data = _is_data_problem(problem)
    if not data and not _is_online_problem(problem):
        raise ValueError(
            f"problem: {type(problem).__name__} has no samples to draw; the Monte Carlo needs a data "
            "problem (per_example_gradients) or an online one (sample_gradient)")
    if data and not bool(getattr(problem, "replace", True)):
        raise ValueError("problem: the Adam/RMSprop Monte Carlo samples with replacement; build the "
                         "data problem with replace=True")
    num_paths = _check_positive_int("num_paths", num_paths)
    record_every = _check_positive_int("record_every", record_every, allow_none=True)
    chunk_size = _check_positive_int("chunk_size", chunk_size, allow_none=True)
    if not isinstance(control_variate, bool):
        raise ValueError(f"control_variate: must be a bool, got {control_variate!r}")
    batch_sizes = _check_batch_sizes(batch_sizes, integer=True)
    steps = batch_sizes.shape[0]
    dtype = problem.x0.dtype
    opt = optimizer.astype(dtype)
    rates = opt.step_sizes(steps)
    if chunk_size is None:
        chunk_size = _default_chunk(num_paths, problem.dim + 1)
    keys = _path_keys(key, num_paths)
    return _adaptive_core(problem, batch_sizes, rates, opt, keys, data=data, chunk=chunk_size,
                          record_every=record_every, control_variate=control_variate)


def _control_inputs(problem, batch_sizes, opt):
    """``xbar_k``, ``grad f(xbar_k)`` and ``c_k = dF/d xi_k`` along the moment model's mean path."""
    from .._expansion.adaptive import mean_path_response

    return mean_path_response(problem, batch_sizes.astype(problem.x0.dtype), opt)


@eqx.filter_jit
def _adaptive_core(problem, batch_sizes, rates, opt, keys, *, data, chunk, record_every,
                   control_variate):
    batch_sizes = eqx.error_if(batch_sizes, jnp.any(batch_sizes < 1),
                               "batch_sizes: Adam needs integer batch sizes >= 1")
    tx = opt.optax_transform(rates)
    b_seg, ends, _ = _segments(batch_sizes, record_every, 0)
    k_seg = jnp.arange(b_seg.size, dtype=jnp.int32).reshape(b_seg.shape)
    x0 = problem.x0
    d = x0.shape[0]
    rows = 2 if control_variate else 1
    if control_variate:
        cv_inputs = _control_inputs(problem, batch_sizes, opt)
        pad = b_seg.size - batch_sizes.shape[0]
        cv_inputs = tuple(jnp.concatenate([a, jnp.zeros((pad, d), a.dtype)]) for a in cv_inputs)
    else:
        cv_inputs = tuple(jnp.zeros((b_seg.size, d), x0.dtype) for _ in range(3))
    cv_seg = tuple(a.reshape(b_seg.shape + (d,)) for a in cv_inputs)

    if data:
        grads_of = _example_gradients_fn(problem)
        n = _num_examples(problem)

        def block_fn(X, skey):
            def block(j, mask):
                idx = jax.vmap(lambda jj: jax.random.randint(
                    jax.random.fold_in(skey, jj), (), 0, n, jnp.int32))(j)
                g = jax.vmap(lambda xx: grads_of(xx, idx))(X)  # (rows, size, d)
                return jnp.where(mask[None, :, None], g, 0.0).sum(1)
            return block
    else:
        grad_of = _online_gradient_fn(problem)

        def block_fn(X, skey):
            def one(jj):
                return jax.vmap(grad_of, in_axes=(0, None))(X, jax.random.fold_in(skey, jj))

            def block(j, mask):
                g = jnp.swapaxes(jax.vmap(one)(j), 0, 1)
                return jnp.where(mask[None, :, None], g, 0.0).sum(1)
            return block

    def one_path(pkey):
        def step(carry, inp):
            x, state, z = carry
            k, b, xbar, gbar, coef = inp
            X = jnp.stack([x, xbar]) if control_variate else x[None]
            total = _blocked_sum(block_fn(X, jax.random.fold_in(pkey, k)), b, chunk,
                                 jnp.zeros((rows, d), x.dtype))
            active = b > 0  # b == 0 pads the last segment: nothing changes
            mean_g = total / jnp.maximum(b, 1).astype(x.dtype)
            if control_variate:
                z = z + jnp.where(active, jnp.dot(coef, mean_g[1] - gbar), 0.0)
            updates, new_state = tx.update(mean_g[0], state, x)
            x, state = _where(active, (optax.apply_updates(x, updates), new_state), (x, state))
            return (x, state, z), None

        def segment(carry, inp):
            carry, _ = jax.lax.scan(step, carry, inp)
            return carry, problem.terminal_value(carry[0])

        init = (x0, tx.init(x0), jnp.zeros((), x0.dtype))
        (x, _, z), losses = jax.lax.scan(segment, init, (k_seg, b_seg) + cv_seg)
        return x, z, losses

    return _run_paths(problem, one_path, keys, x0, ends, record_every, control_variate)
