"""A sweep over two processes on JAX's distributed runtime (CPU, coordinator on a free local
port): each process computes a disjoint set of chunks of one results folder, the merged result
equals the single-process one, and a rerun after losing a chunk recomputes only that chunk."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jaxsched as js

STEPS = 20
GRID = dict(lr=[0.05, 0.1, 0.2, 0.3], samples=[60.0, 120.0])


def _problem():
    import jax.numpy as jnp

    return js.DiagonalGaussianRegression(jnp.asarray([1.0, 0.3, 0.05]), jnp.asarray([1.0, -2.0, 3.0]),
                                         0.5)


WORKER = textwrap.dedent("""
    import json, sys
    import jax
    port, pid, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid)
    import jax.numpy as jnp
    import jaxsched as js
    problem = js.DiagonalGaussianRegression(jnp.asarray([1.0, 0.3, 0.05]),
                                            jnp.asarray([1.0, -2.0, 3.0]), 0.5)
    computed = []
    grid = js.grid(lr=jnp.asarray(%(lr)s), samples=jnp.asarray(%(samples)s))
    res = js.sweep(problem, grid, steps=%(steps)d, results_dir=folder, chunk_size=2,
                   progress=False, wait_timeout=120,
                   callback=lambda name, done, total: computed.append(name))
    with open(f"{folder}/computed-{pid}-{len(sys.argv)}.json", "w") as f:
        json.dump({"computed": computed, "gain": [float(g) for g in res.on_grid("gain").ravel()]}, f)
""") % dict(lr=GRID["lr"], samples=GRID["samples"], steps=STEPS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(folder, script, tag):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(pid), str(folder)]
                              + ["x"] * tag, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for pid in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    return [json.load(open(folder / f"computed-{pid}-{4 + tag}.json")) for pid in (0, 1)]


@pytest.mark.slow
def test_two_processes_share_one_folder_and_resume(tmp_path):
    import jax.numpy as jnp

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    folder = tmp_path / "results"
    first = _run_two(folder, script, 0)
    chunks = [set(r["computed"]) for r in first]
    assert not chunks[0] & chunks[1]  # no chunk computed twice
    names = {n for n in os.listdir(folder) if n.startswith("chunk-")}
    assert chunks[0] | chunks[1] == names and len(names) == 4
    reference = js.sweep(_problem(), js.grid(lr=jnp.asarray(GRID["lr"]), samples=jnp.asarray(GRID["samples"])),
                         steps=STEPS, progress=False)
    ref = np.asarray(reference.on_grid("gain")).ravel()
    for r in first:  # every process returns the merged result
        np.testing.assert_allclose(r["gain"], ref, rtol=1e-12)
    merged = js.load_sweep(folder)
    np.testing.assert_allclose(np.asarray(merged.on_grid("gain")).ravel(), ref, rtol=1e-12)

    lost = sorted(names)[1]
    os.remove(folder / lost)
    again = _run_two(folder, script, 1)
    assert sorted(again[0]["computed"] + again[1]["computed"]) == [lost]
    np.testing.assert_allclose(again[0]["gain"], ref, rtol=1e-12)
