"""Test configuration and shared builders: float64 everywhere, so tolerances reflect the
mathematics, not rounding; a monkeypatch-based trace counter."""

import atexit
import collections
import gc
import os
import shutil
import tempfile


def _share_compiled_programs_between_processes():
    """One persistent compilation cache for the whole test run, in a scratch folder removed at the
    end: the xdist workers, the subprocesses (CLI, notebooks, the device check's smoke run) and
    each module after :func:`_release_compiled_programs` load a program another one compiled
    instead of compiling it again. The folder travels in the environment, so the first process
    (the xdist controller) makes it and every later one inherits it. Commands run with
    ``--no-cache`` / ``JAXSCHED_NO_CACHE=1`` still compile from scratch (the CLI turns the
    persistent cache off then), so the tests that need a cold run get one."""
    folder = os.environ.get("JAXSCHED_TEST_COMPILATION_CACHE")
    if not folder:
        folder = tempfile.mkdtemp(prefix="jaxsched-tests-xla-")
        os.environ["JAXSCHED_TEST_COMPILATION_CACHE"] = folder
        atexit.register(shutil.rmtree, folder, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    # every program, however quick its compile (JAX's default keeps only those over 1 s)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    return folder


_CACHE_FOLDER = _share_compiled_programs_between_processes()


def _one_compute_thread_per_process():
    """XLA's CPU runtime runs each process's kernels on a thread pool as wide as the machine, whose
    idle threads spin before they sleep. The suite runs two xdist workers (and their subprocesses)
    on two cores, so those pools fight over the cores: beside tests/test_float32.py, the quickstart
    notebook took 144 s instead of 53 s with one compute thread per process (measured on the 2-core
    box; compile-bound files are unaffected). The parallelism is in the workers, so each process
    computes on one thread. Subprocesses inherit the setting; the tests that strip ``XLA_FLAGS``
    (the sharded sweep, the sweep deadlock check) keep XLA's default threading on purpose."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
        one = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{flags} {one}".strip()


_one_compute_thread_per_process()

import jax  # noqa: E402  (after the cache and thread settings, which JAX reads from the environment)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", _CACHE_FOLDER)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA's CPU backend maps every kernel of
    an executable into its own memory region (a diffrax solve holds about 250 of them) and keeps it
    until the executable is released; one process running the whole suite otherwise accumulates
    more than Linux's default of 65,530 mappings per process (``vm.max_map_count``) and the next
    compile segfaults inside XLA. Modules share compiled functions through their own
    module-scoped fixtures, so nothing a module reuses is lost."""
    yield
    jax.clear_caches()
    gc.collect()  # executables held only by reference cycles (closures of fixtures) go too


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


# ------------------------------------------------------------------------------------------------
# shared problem builders (small shapes, so that tests share compiled functions)


def random_gaussian(d, seed, noise_var=0.5):
    """Gaussian linear regression with a random rotation and eigenvalues in [0.05, 2]."""
    import jax.numpy as jnp
    import numpy as np

    import jaxsched as js

    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.exp(rng.uniform(np.log(0.05), np.log(2.0), size=d))
    cov = (Q * lam) @ Q.T
    return js.GaussianLinearRegression(
        jnp.asarray(0.5 * (cov + cov.T)), rng.normal(size=d), rng.normal(size=d), noise_var
    )


def random_data(n, d, seed, replace=True):
    """Least squares on ``n`` random examples (features standard normal, targets noisy linear)."""
    import numpy as np

    import jaxsched as js

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    return js.LinearRegressionData(X, y, rng.normal(size=d), replace=replace)


def nonquadratic_problem():
    """A 2-d non-quadratic loss with a state-dependent Sigma (docs/theory.md §4's check)."""
    import jax.numpy as jnp

    import jaxsched as js

    def loss(x):
        return jnp.log(jnp.cosh(x[0] - 1.0)) + 0.5 * x[1] ** 2 + 0.3 * jnp.sin(x[0]) * x[1] ** 2

    def noise_cov(x):
        g = jnp.array([jnp.tanh(x[0]), x[1]])
        return 0.5 * jnp.eye(2) + jnp.outer(g, g)

    return js.Problem(loss, noise_cov, jnp.array([2.5, -1.0]))


# The files that take longest (compiles and subprocesses), started first so that the two xdist
# workers (pyproject's addopts) do not end with one long file running alone; within a file the
# order is unchanged, so module-scoped fixtures are still built once.
_LONG_FIRST = (
    "test_readme.py", "test_float32.py", "test_device_check.py", "test_notebooks.py",
    "test_lr_gradients.py", "test_expansion.py", "test_conformance.py", "test_data_problem.py",
    "test_sweep.py", "test_cli.py", "test_momentum_control.py", "test_cli_optimizers.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
