"""Trace and XLA-compile time of the dense method, with the ODE vector fields jitted (the library's
``_common.vector_field``) and plain, side by side in one process.

A Runge-Kutta step calls its field once per stage (15 for the dense method's DOP853) and diffrax
traces the step several times; a jitted field is traced once per signature and its jaxpr, and
its derivatives, are reused at every call. This script measures what that saves for
``first_order_parts`` on a 2-d non-quadratic problem with a state-dependent noise covariance
(the forward program and the reverse-mode gradient in the learning rate), and checks that both
variants give the same numbers.

    python experiments/bench_compile.py            # 20 steps
    python experiments/bench_compile.py --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

import jaxsched as js  # noqa: E402
from jaxsched._expansion import adaptive, adjoint, matrix_free, moments  # noqa: E402

# The fields the library wraps with _common.vector_field, by module.
_FIELDS = {
    adjoint: ("_flow_field", "_adjoint_field"),
    moments: ("_moment_field",),
    matrix_free: ("_second_variation_field", "_flow_field", "_flow_correction_field"),
    adaptive: ("_continuous_field",),
}


@contextlib.contextmanager
def plain_fields():
    """The vector fields unwrapped (their ``__wrapped__``), restored afterwards."""
    saved = {(m, n): getattr(m, n) for m, names in _FIELDS.items() for n in names}
    try:
        for (m, n), f in saved.items():
            setattr(m, n, f.__wrapped__)
        yield
    finally:
        for (m, n), f in saved.items():
            setattr(m, n, f)


def problem():
    def loss(x):
        return jnp.log(jnp.cosh(x[0] - 1.0)) + 0.5 * x[1] ** 2 + 0.3 * jnp.sin(x[0]) * x[1] ** 2

    def noise_cov(x):
        g = jnp.array([jnp.tanh(x[0]), x[1]])
        return 0.5 * jnp.eye(2) + jnp.outer(g, g)

    return js.Problem(loss, noise_cov, jnp.array([2.5, -1.0]))


def measure(fn, x):
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(x)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    value = jax.block_until_ready(compiled(x))
    return t1 - t0, t2 - t1, value


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
    jax.config.update("jax_enable_compilation_cache", False)
    p, K = problem(), args.steps
    b = jnp.linspace(2.0, 9.0, K)

    def predicted(h):
        parts = js.first_order_parts(p, lr=h, steps=K, method="dense", rtol=1e-10, atol=1e-12)
        return parts.base_loss + h * (parts.correction + jnp.sum(parts.phi / b))

    jobs = {"forward": predicted, "grad in lr": jax.grad(predicted)}
    print(f"dense first_order_parts, 2-d non-quadratic problem, {K} steps, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'program':<12}{'fields':<8}{'trace s':>9}{'compile s':>11}{'value':>24}")
    rows = {}
    for name, fn in jobs.items():
        for variant in ("plain", "jitted"):
            jax.clear_caches()
            ctx = plain_fields() if variant == "plain" else contextlib.nullcontext()
            with ctx:
                tr, co, v = measure(fn, jnp.asarray(0.05))
            rows[name, variant] = (tr, co, float(v))
            print(f"{name:<12}{variant:<8}{tr:>9.1f}{co:>11.1f}{float(v):>24.15e}")
    for name in jobs:
        (tp, cp, vp), (tj, cj, vj) = rows[name, "plain"], rows[name, "jitted"]
        print(f"{name}: trace plain/jitted {tp / tj:.1f}x, compile {cp / cj:.2f}x, "
              f"trace + compile {(tp + cp) / (tj + cj):.2f}x; values differ by "
              f"{abs(vp - vj) / abs(vp):.1e} relative")


if __name__ == "__main__":
    main()
