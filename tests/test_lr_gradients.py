"""Reverse-mode gradients in the learning rate equal central differences (issue: they were wrong
by 60 orders of magnitude while the horizon and the jump times were ``lr * k``; the ODEs now run
in step units, docs/theory.md §8).

Tolerance 1e-5 relative: the solves run at rtol 1e-12, so the adaptive solver's step-size
changes between ``lr +- eps`` perturb the central difference by about ``1e-12 / eps = 1e-8``
relative, and its truncation error is ``O(eps^2) ~ 1e-8``; both are far below 1e-5, while the
old bug gave errors of order 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nonquadratic_problem, random_data, random_gaussian

import jaxsched as js

STEPS = 20
LR = 0.05
EPS = 1e-4
TOL = dict(rtol=1e-12, atol=1e-14)
PROBLEMS = {
    "gaussian": lambda: random_gaussian(3, 7),
    "data": lambda: random_data(40, 3, 3),
    "nonquadratic": nonquadratic_problem,
}
# The eigenbasis method on both quadratic problems, the dense adjoint on the data problem (its
# covariance is the data-set one, a different code path from the Gaussian's) and on the
# non-quadratic one; dense on the Gaussian problem would repeat the data problem's check.
METHODS = {"gaussian": ["eigen"], "data": ["dense", "eigen"], "nonquadratic": ["dense"]}


def central(f, x, eps=EPS):
    return (f(x + eps) - f(x - eps)) / (2 * eps)


def check(f, shape=(), has_aux=False):
    """Reverse-mode derivatives of ``f`` (output of ``shape``) at ``LR`` against central
    differences; returns ``f``'s aux output at ``LR - eps`` and ``LR + eps`` when ``has_aux``.

    One compiled program, the pullback ``(h, cotangent) -> (f(h), aux, cotangent . f'(h))`` with
    the lr and the cotangent as traced arguments, gives every output's derivative (one call per
    unit cotangent) and the finite-difference values, so each check compiles one reverse pass
    (a ``jacrev`` would compile a vmapped one, about 1.3x the compile time here)."""
    def pullback(h, cotangent):
        if has_aux:
            value, vjp, aux = jax.vjp(f, h, has_aux=True)
        else:
            (value, vjp), aux = jax.vjp(f, h), None
        return value, aux, vjp(cotangent)[0]

    pullback = jax.jit(pullback)
    size = int(np.prod(shape))
    units = np.eye(size).reshape((size,) + tuple(shape))
    g = np.stack([pullback(jnp.asarray(LR), jnp.asarray(u))[2] for u in units])
    lo, hi = (pullback(jnp.asarray(LR + s * EPS), jnp.zeros(shape)) for s in (-1, 1))
    fd = np.reshape((np.asarray(hi[0]) - np.asarray(lo[0])) / (2 * EPS), (size,))
    np.testing.assert_allclose(g, fd, rtol=1e-5)
    assert np.all(np.abs(g) > 0)  # a derivative that vanished identically would pass trivially
    return lo[1], hi[1]


@pytest.fixture(scope="module", params=sorted(PROBLEMS))
def problem(request):
    return request.param, PROBLEMS[request.param]()


def test_expected_loss(problem):
    _, p = problem
    b = jnp.linspace(2.0, 9.0, STEPS)
    check(lambda h: js.expected_loss(p, b, lr=h, **TOL))


def test_first_order_parts_sensitivity_and_optimal_schedule(problem):
    """``first_order_parts`` (hence ``sensitivity``, its ``phi``) and
    ``optimal_schedule(...).predicted_loss``, checked together: ``optimal_schedule`` computes its
    parts with ``first_order_parts(problem, lr, steps, method)`` and returns them, so one compiled
    program differentiates both (the parts' solves are not compiled twice)."""
    name, p = problem
    b = jnp.linspace(2.0, 9.0, STEPS)
    kw = dict(steps=STEPS, samples=10 * STEPS, **TOL)
    for method in METHODS[name]:
        def outputs(h, m=method):
            opt = js.optimal_schedule(p, lr=h, sensitivity=m, **kw)
            # base_loss, correction, phi (through a weighted sum with unequal weights: every
            # step's phi enters) and the optimum's predicted loss; the batch sizes as aux
            return jnp.stack([opt.base_loss, opt.correction, jnp.sum(opt.phi / b),
                              opt.predicted_loss]), opt.batch_sizes

        b_lo, b_hi = check(outputs, shape=(4,), has_aux=True)
        # The integer schedule is piecewise constant in lr: the check of predicted_loss is
        # meaningful only where it does not jump between lr - eps and lr + eps.
        np.testing.assert_array_equal(b_lo, b_hi)


def test_momentum_and_lr_schedule_gradients():
    p = random_gaussian(3, 7)
    b = jnp.linspace(2.0, 9.0, STEPS)
    decay = jnp.linspace(1.0, 0.3, STEPS)

    def loss(mu, scale):
        return js.expected_loss(p, b, optimizer=js.SGD(LR * scale * decay, momentum=mu), **TOL)

    g_mu, g_scale = jax.grad(loss, argnums=(0, 1))(jnp.asarray(0.5), jnp.asarray(1.0))
    np.testing.assert_allclose(g_mu, central(lambda m: loss(m, 1.0), 0.5), rtol=1e-5)
    np.testing.assert_allclose(g_scale, central(lambda s: loss(0.5, s), 1.0), rtol=1e-5)
