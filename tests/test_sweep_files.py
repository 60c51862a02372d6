"""Results folders and statuses of sweeps (issue 13 items 1, 7, 8, 12, 13; issue 12 item 4): the
fingerprint covers the problem's values, unreadable chunks are recomputed, gradient descent
divergence is its own status, chunks are padded only as far as needed, files are 0644, pictures.

All sweeps here share one compiled core (one builder, four configurations, 20 steps)."""

import json
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsched as js
from jaxsched._sweep import core as _core, driver as _driver

STEPS = 20
LAM = jnp.arange(1.0, 7.0) ** -1.0  # lam_max = 1: gradient descent diverges at lr >= 2


def make_builder(v0_scale=1.0):
    v0 = jnp.linspace(1.0, -1.0, 6) * v0_scale  # closed over: not a configuration column

    def build(noise_var):
        return js.DiagonalGaussianRegression(LAM, v0, noise_var)

    return build


BUILD = make_builder()
CFG = js.grid(lr=[0.1, 2.5], noise_var=[0.2, 0.5], samples=[60])


def count_chunks(mp):
    calls = []
    original = _driver._run_chunk

    def counting(shared, builder, cols, params, members, *args):
        calls.append(tuple(int(i) for i in members))
        return original(shared, builder, cols, params, members, *args)

    mp.setattr(_driver, "_run_chunk", counting)
    return calls


@pytest.fixture(scope="module")
def reference():
    return js.sweep(BUILD, CFG, steps=STEPS, progress=False)


def test_gd_divergence_has_its_own_status_and_is_never_ok(reference):
    res = reference
    lr = res.configs.columns["lr"]
    # Independent rule: gradient descent on a quadratic diverges iff |1 - lr lam| > 1 for some lam,
    # i.e. lr * max(lam) > 2; lr = 2.5 diverges, lr = 0.1 does not.
    diverges = lr * float(jnp.max(LAM)) > 2
    assert np.array_equal(res.status == js.SweepStatus.GD_DIVERGES, diverges)
    assert not res.ok[diverges].any() and res.ok[~diverges].all()
    assert (res.result[diverges] == js.RESULTS.gd_diverges._value).all()
    assert (res.result[~diverges] == js.RESULTS.successful._value).all()
    assert all("gradient descent diverges" in r for r in res.reason[diverges])
    assert res.gain[diverges].tolist() == [0.0, 0.0]  # never a headline number
    assert res.message(int(np.flatnonzero(diverges)[0])) == js.RESULTS[js.RESULTS.gd_diverges]


def test_small_sweeps_pad_chunks_only_to_what_is_needed(tmp_path, monkeypatch, reference):
    rows = []
    original = _core._sharded_core

    def recording(builder, shared, batch, *args):
        rows.append(batch["lr"].shape[0])
        return original(builder, shared, batch, *args)

    monkeypatch.setattr(_core, "_sharded_core", recording)
    # With a results folder the default chunk is 1024 configurations; 4 need 4 rows, not 1024.
    res = js.sweep(BUILD, CFG, steps=STEPS, results_dir=tmp_path, progress=False)
    assert rows == [4]
    np.testing.assert_array_equal(res.gain, reference.gain)


def test_files_have_the_usual_permissions(tmp_path, reference):
    old = os.umask(0o022)
    try:
        js.sweep(BUILD, CFG, steps=STEPS, results_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    names = sorted(os.listdir(tmp_path))
    assert "manifest.json" in names and "results.npz" in names
    for name in names:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_changed_problem_values_are_refused_naming_what_changed(tmp_path, reference):
    js.sweep(BUILD, CFG, steps=STEPS, results_dir=tmp_path, progress=False)
    other = make_builder(2.0)  # same code and shapes, another closed-over x0
    with pytest.raises(ValueError, match="results_dir") as info:
        js.sweep(other, CFG, steps=STEPS, results_dir=tmp_path, progress=False)
    text = str(info.value)
    assert str(tmp_path) in text and "constant" in text and ".x0" in text
    # A changed setting is named with its old and new value.
    with pytest.raises(ValueError, match=r"setting nodes: 8 -> 9"):
        js.sweep(BUILD, CFG, steps=STEPS, nodes=9, results_dir=tmp_path, progress=False)
    # A fixed problem: every leaf counts, not only the builder's code.
    fixed = js.DiagonalGaussianRegression(LAM, jnp.ones(6), 0.3)
    cfg = js.configurations(lr=[0.1], samples=[60])
    js.sweep(fixed, cfg, steps=STEPS, results_dir=tmp_path / "fixed", progress=False)
    with pytest.raises(ValueError, match=r"problem\.noise_var"):
        js.sweep(js.DiagonalGaussianRegression(LAM, jnp.ones(6), 0.4), cfg, steps=STEPS,
                 results_dir=tmp_path / "fixed", progress=False)
    # overwrite=True starts again and returns the new problem's results.
    again = js.sweep(other, CFG, steps=STEPS, results_dir=tmp_path, overwrite=True,
                     progress=False)
    fresh = js.sweep(other, CFG, steps=STEPS, progress=False)
    np.testing.assert_array_equal(again.predicted_loss, fresh.predicted_loss)
    assert not np.array_equal(again.predicted_loss, reference.predicted_loss)


def test_unreadable_chunk_is_recomputed_and_bad_manifest_named(tmp_path, monkeypatch, capsys,
                                                               reference):
    cfg = js.grid(lr=[0.1, 0.2], noise_var=[0.2, 0.5], samples=[60])
    js.sweep(BUILD, cfg, steps=STEPS, chunk_size=2, results_dir=tmp_path, progress=False)
    chunk = tmp_path / "chunk-s20-00001.npz"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # a crash or a full disk mid-write
    (tmp_path / "results.npz").unlink()
    partial = js.load_sweep(tmp_path)  # reading an unfinished folder skips the bad chunk
    assert (partial.status == -1).sum() == 2
    computed = count_chunks(monkeypatch)
    res = js.sweep(BUILD, cfg, steps=STEPS, chunk_size=2, results_dir=tmp_path, progress=False)
    assert computed == [(2, 3)]
    err = capsys.readouterr().err
    assert "chunk-s20-00001.npz" in err and "unreadable" in err
    full = js.sweep(BUILD, cfg, steps=STEPS, chunk_size=2, progress=False)
    np.testing.assert_array_equal(res.predicted_loss, full.predicted_loss)
    (tmp_path / "manifest.json").write_text('{"fingerprint": ')
    with pytest.raises(ValueError, match="manifest.json"):
        js.sweep(BUILD, cfg, steps=STEPS, chunk_size=2, results_dir=tmp_path, progress=False)


def test_plot_shows_the_grid_values_and_pngs_are_written(tmp_path, reference):
    from jaxsched._sweep.plot import write_pngs

    res = reference
    ax = res.plot("gain")
    shown = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    # lr x noise_var are the two widest axes (2 and 2; samples has 1): the image is the grid
    # itself, failed (divergent) configurations masked.
    expected = np.where(res.ok, res.gain, np.nan).reshape(2, 2, 1)[:, :, 0]
    np.testing.assert_array_equal(shown, expected)
    np.testing.assert_array_equal(shown[0], res.on_grid("gain")[0, :, 0])
    last = res.plot("last_batch").images[0].get_array()
    assert last[0, 0] == res.batch_sizes[0, STEPS - 1]
    paths = write_pngs(res, tmp_path)
    assert sorted(os.path.basename(p) for p in paths) == ["first_batch.png", "gain.png",
                                                         "last_batch.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".")]
    with pytest.raises(ValueError, match="value"):
        res.plot("colour")
    with pytest.raises(ValueError, match="axes"):
        res.plot("gain", axes=("lr", "decay"))
    json.dumps(res.rows()[0])  # the table stays JSON-friendly
