"""Exports to training frameworks: each artefact is parsed back here with a reader written from the
framework's documented semantics (not with jaxsched's code), replayed step by step, and checked for
the exact budget, the format's constraints and the objective the command prints."""

import itertools
import json
import math
import re

import numpy as np
import pytest

import jaxsched as js
from jaxsched.cli import export as export_cli

LR, STEPS = 0.05, 100


@pytest.fixture(scope="module")
def diabetes():
    """Two SCHEDULE.json records on the diabetes problem (800 and 3200 samples: same phi, one
    compile) and the problem itself."""
    problem = js.datasets.diabetes_problem()
    specs = {}
    for samples in (800, 3200):
        opt = js.optimal_schedule(problem, lr=LR, steps=STEPS, samples=samples)
        specs[samples] = js.schedule_json(opt, lr=LR, samples=samples)
    return problem, specs


def _objective(spec, b):
    return float(np.sum(np.asarray(spec["phi"]) / np.asarray(b)))


def _check_budget(spec, b, multiple=1):
    b = np.asarray(b)
    assert b.shape == (spec["steps"],)
    assert int(b.sum()) == spec["samples"]
    assert np.all(b >= spec["min_batch"]) and np.all(b % multiple == 0)


def _printed_objective(text):
    return float(re.search(r"objective .*?: export ([0-9.eE+-]+)", text).group(1))


def _run_cli(args, capsys):
    code = export_cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Megatron-LM: --step-batch-size-schedule "THRESHOLD:BS ..."; the batch of a step is that of the
# last threshold <= samples consumed so far (thresholds in tokens are divided by --seq-length).
# ---------------------------------------------------------------------------------------------
def _megatron_value(text):
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
    if text[-1] in scale:
        return int(text[:-1]) * scale[text[-1]]
    return int(text)


def _megatron_replay(schedule, steps, seq_length=None):
    pairs = [p.split(":") for p in schedule.split()]
    thresholds = [_megatron_value(t) for t, _ in pairs]
    batches = [int(b) for _, b in pairs]
    assert thresholds[0] == 0 and all(b > a for a, b in itertools.pairwise(thresholds))
    if seq_length is not None:
        thresholds = [t // seq_length for t in thresholds]
    consumed, out = 0, []
    for _ in range(steps):
        bs = [b for t, b in zip(thresholds, batches, strict=True) if t <= consumed][-1]
        out.append(bs)
        consumed += bs
    return np.array(out), batches


@pytest.mark.parametrize(
    ("samples", "micro", "dp", "seq"), [(800, 1, 1, None), (3200, 2, 4, None), (3200, 2, 4, 2048)]
)
def test_megatron_parses_back(diabetes, capsys, tmp_path, samples, micro, dp, seq):
    _, specs = diabetes
    spec = specs[samples]
    res = js.export_schedule(
        spec, format="megatron", micro_batch=micro, data_parallel=dp, tokens_per_sample=seq
    )
    b, stage_batches = _megatron_replay(res.settings["step_batch_size_schedule"], spec["steps"], seq)
    _check_budget(spec, b, micro * dp)
    assert len(stage_batches) <= 4
    np.testing.assert_array_equal(b, res.batch_sizes)
    assert res.objective == pytest.approx(_objective(spec, b), rel=1e-12)  # same sum, reordered at most
    assert res.objective >= res.optimum_objective * (1 - 1e-12)  # a constrained optimum
    # The command prints the same artefact and objective (12 significant digits printed).
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(spec))
    args = [str(path), "--format", "megatron", "--micro-batch", str(micro), "--data-parallel", str(dp)]
    code, out, _ = _run_cli(args + (["--tokens-per-sample", str(seq)] if seq else []), capsys)
    assert code == 0
    assert res.settings["step_batch_size_schedule"] in out
    assert _printed_objective(out) == pytest.approx(_objective(spec, b), rel=1e-11)


def test_megatron_stages_match_compress_stages(diabetes):
    """Megatron's fit is the exact stage compression (an independent route: brute force of it is
    tested in test_schedules), so the two objectives coincide."""
    _, specs = diabetes
    spec = specs[3200]
    res = js.export_schedule(spec, format="megatron", micro_batch=2, data_parallel=4)
    _, obj, _ = js.compress_stages(np.asarray(spec["phi"]), 3200, stages=4, multiple_of=8)
    assert res.objective == pytest.approx(obj, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# OLMo-core: BatchSizeSchedulerCallback(batch_sizes=[tokens], schedule=[Duration]); the latest due
# event applies; an increase by an integer factor waits until the data position is aligned to
# the new batch; every change must be by an integer factor.
# ---------------------------------------------------------------------------------------------
def _olmo_replay(settings, steps, tokens_per_sample):
    batches = settings["batch_sizes"]
    events = settings["schedule"]
    assert events[0]["value"] == 0
    assert all(b["value"] > a["value"] for a, b in itertools.pairwise(events))
    for a, b in itertools.pairwise(batches):
        assert a != b and (b % a == 0 if b > a else a % b == 0)  # integer factors only
    current, tokens, out = batches[0], 0, []
    for step in range(steps):
        seen = tokens if events[0]["unit"] == "tokens" else step
        target = [bs for bs, ev in zip(batches, events, strict=True) if ev["value"] <= seen][-1]
        if target < current or (target > current and tokens % target == 0):
            current = target
        out.append(current // tokens_per_sample)
        tokens += current
    return np.array(out)


@pytest.mark.parametrize(("samples", "micro", "unit"), [(800, 1, "tokens"), (3200, 2, "steps")])
def test_olmo_core_parses_back(diabetes, capsys, tmp_path, samples, micro, unit):
    _, specs = diabetes
    spec, tps = specs[samples], 512
    res = js.export_schedule(
        spec, format="olmo-core", tokens_per_sample=tps, micro_batch=micro, duration_unit=unit
    )
    settings = json.loads(res.text)
    b = _olmo_replay(settings, spec["steps"], tps)
    _check_budget(spec, b, micro)
    np.testing.assert_array_equal(b, res.batch_sizes)
    assert len(settings["batch_sizes"]) <= 4
    # The callback scales an Adam learning rate by sqrt(new/old) at each change: cumulative factors.
    ratios = np.asarray(settings["batch_sizes"]) / settings["batch_sizes"][0]
    np.testing.assert_allclose(settings["lr_factors"], np.sqrt(ratios), rtol=1e-15)
    assert res.objective == pytest.approx(_objective(spec, b), rel=1e-12)
    assert res.objective >= res.optimum_objective * (1 - 1e-12)
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(spec))
    args = [str(path), "--format", "olmo-core", "--tokens-per-sample", str(tps), "--micro-batch", str(micro)]
    code, out, _ = _run_cli(args + ["--duration-unit", unit], capsys)
    assert code == 0
    assert _printed_objective(out) == pytest.approx(_objective(spec, b), rel=1e-11)


def _tiny_spec(phi, samples, optimum, **extra):
    return {
        "steps": len(phi),
        "samples": samples,
        "phi": list(map(float, phi)),
        "schedules": {"optimal": {"batch_sizes": list(map(int, optimum))}},
        "min_batch": 1,
        **extra,
    }


def test_olmo_core_fit_is_optimal_brute_force():
    """Exhaustive check on small cases: every schedule of <= S stages with integer-factor changes
    whose increases fall on aligned positions, exact budget; the fit equals the minimum."""
    rng = np.random.default_rng(0)
    steps = 6
    for _ in range(5):
        phi = rng.exponential(size=steps) * np.linspace(0.3, 3.0, steps) ** 2
        samples = int(rng.integers(12, 31))
        opt = js.integer_optimum(phi, samples)
        best = np.inf
        for n_stages in (1, 2, 3):
            for cuts in itertools.combinations(range(1, steps), n_stages - 1):
                lengths = np.diff([0, *cuts, steps])
                for levels in itertools.product(range(1, samples + 1), repeat=n_stages):
                    if np.dot(lengths, levels) != samples or any(
                        a == b for a, b in itertools.pairwise(levels)
                    ):
                        continue
                    consumed = np.cumsum(lengths * np.array(levels))[:-1]
                    ok = all(
                        (b % a == 0 and c % b == 0) if b > a else a % b == 0
                        for a, b, c in zip(levels[:-1], levels[1:], consumed, strict=True)
                    )
                    if ok:
                        best = min(best, float(np.sum(phi / np.repeat(levels, lengths))))
        spec = _tiny_spec(phi, samples, np.asarray(opt))
        if not np.isfinite(best):
            with pytest.raises(ValueError, match="stages"):
                js.export_schedule(spec, format="olmo-core", stages=3, tokens_per_sample=1)
            continue
        res = js.export_schedule(spec, format="olmo-core", stages=3, tokens_per_sample=1)
        assert res.objective == pytest.approx(best, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# MaxText: per_device_batch_size_start / _increment / per_device_batch_size (end) and
# global_rampup_samples; after each step the used samples are accumulated and, once they reach
# global_rampup_samples / increments, the batch grows by one increment and the counter resets.
# ---------------------------------------------------------------------------------------------
def _maxtext_replay(settings, steps, devices):
    if not settings["enable_rampup_batch_size"]:
        return np.full(steps, devices * settings["per_device_batch_size"])
    start = devices * settings["per_device_batch_size_start"]
    inc = devices * settings["per_device_batch_size_increment"]
    end = devices * settings["per_device_batch_size"]
    per_increment = settings["global_rampup_samples"] / ((end - start) // inc)
    current, accum, out = start, 0, []
    for _ in range(steps):
        out.append(current)
        accum += current
        if accum >= per_increment:
            current, accum = min(current + inc, end), 0
    return np.array(out)


def _parse_yaml_lines(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        out[key] = {"true": True, "false": False}.get(
            value, value if not value.lstrip("-").isdigit() else int(value)
        )
    return out


@pytest.mark.parametrize(("samples", "micro", "devices"), [(800, 1, 1), (3200, 1, 4)])
def test_maxtext_parses_back(diabetes, capsys, tmp_path, samples, micro, devices):
    _, specs = diabetes
    spec = specs[samples]
    res = js.export_schedule(spec, format="maxtext", micro_batch=micro, data_parallel=devices)
    settings = _parse_yaml_lines(res.text)
    b = _maxtext_replay(settings, spec["steps"], devices)
    _check_budget(spec, b, micro * devices)
    np.testing.assert_array_equal(b, res.batch_sizes)
    assert np.all(np.diff(b) >= 0)  # a ramp
    assert res.objective == pytest.approx(_objective(spec, b), rel=1e-12)
    assert res.objective >= res.optimum_objective * (1 - 1e-12)
    if samples % (spec["steps"] * micro * devices) == 0:  # the constant batch is a candidate
        assert res.objective <= np.sum(spec["phi"]) * spec["steps"] / samples * (1 + 1e-12)
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(spec))
    code, out, _ = _run_cli([str(path), "--format", "maxtext", "--data-parallel", str(devices)], capsys)
    assert code == 0
    assert _printed_objective(out) == pytest.approx(_objective(spec, b), rel=1e-11)


# ---------------------------------------------------------------------------------------------
# CSV and stages-json
# ---------------------------------------------------------------------------------------------
def test_csv_and_stages_json_parse_back(diabetes):
    _, specs = diabetes
    spec = specs[800]
    res = js.export_schedule(spec, format="csv")
    rows = [list(map(int, r.split(","))) for r in res.text.strip().splitlines()[1:]]
    steps, b, before = (np.array(c) for c in zip(*rows, strict=True))
    np.testing.assert_array_equal(steps, np.arange(STEPS))
    np.testing.assert_array_equal(
        b, spec["schedules"]["optimal"]["batch_sizes"]
    )  # no constraint: the optimum
    np.testing.assert_array_equal(before, np.concatenate([[0], np.cumsum(b)[:-1]]))
    assert res.objective == pytest.approx(res.optimum_objective, rel=1e-15)

    res = js.export_schedule(spec, format="stages-json", micro_batch=4)
    stages = json.loads(res.text)["stages"]
    b = np.concatenate([np.full(st["steps"], st["batch_size"]) for st in stages])
    _check_budget(spec, b, 4)
    consumed = np.cumsum([0] + [st["steps"] * st["batch_size"] for st in stages])[:-1]
    np.testing.assert_array_equal([st["samples_consumed"] for st in stages], consumed)
    # Multiples of 4 without a stage limit: the integer optimum in units of 4 (theory 4.2).
    ref = 4 * np.asarray(js.integer_optimum(np.asarray(spec["phi"]), 200))
    assert res.objective == pytest.approx(_objective(spec, ref), rel=1e-12)


def test_predicted_loss_equals_expansion(diabetes):
    """The printed predicted loss of an export is the expansion's E F(x_K) for that schedule: the
    prediction is affine in 1/b (theory 4.1), checked against an independent integration."""
    problem, specs = diabetes
    res = js.export_schedule(specs[3200], format="megatron", micro_batch=2, data_parallel=4)
    direct = float(js.expected_loss(problem, res.batch_sizes, lr=LR))
    # Both sides come from ODE solves at the library's default tolerances (~1e-10 relative).
    assert res.predicted_loss == pytest.approx(direct, rel=1e-8)


# ---------------------------------------------------------------------------------------------
# bad combinations: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------
def _bad_cases(tmp_path, diabetes_spec):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(diabetes_spec))
    small = tmp_path / "small.json"
    small.write_text(json.dumps(_tiny_spec([1.0, 2.0, 3.0], 8, [2, 3, 3])))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in diabetes_spec.items() if k != "phi"}))
    return [
        ([str(good), "--format", "megatron", "--micro-batch", "3"], "--micro-batch"),  # 3 does not divide 800
        ([str(small), "--format", "megatron", "--stages", "1"], "samples"),  # 8 in 3 equal steps
        ([str(small), "--format", "olmo-core", "--stages", "1", "--tokens-per-sample", "4"], "--stages"),
        ([str(good), "--format", "olmo-core"], "--tokens-per-sample"),
        ([str(broken), "--format", "csv"], "not valid JSON"),
        ([str(missing), "--format", "csv"], "phi"),
        ([str(tmp_path / "absent.json"), "--format", "csv"], "cannot read"),
        ([str(good), "--format", "pytorch"], "--format"),
        ([str(good), "--format", "csv", "--out", str(tmp_path / "no" / "such" / "x.csv")], "--out"),
    ]


def test_bad_combinations_exit_2_one_line_nothing_written(diabetes, capsys, tmp_path):
    _, specs = diabetes
    for args, needle in _bad_cases(tmp_path, specs[800]):
        out_file = tmp_path / "export.txt"
        full = args if "--out" in args else [*args, "--out", str(out_file)]
        before = sorted(p.name for p in tmp_path.iterdir())
        code, out, err = _run_cli(full, capsys)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxsched export: error:") and needle in lines[0], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
        assert out == ""


def test_out_file_written(diabetes, capsys, tmp_path):
    _, specs = diabetes
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(specs[800]))
    out_file = tmp_path / "megatron.txt"
    code, out, _ = _run_cli([str(path), "--format", "megatron", "--out", str(out_file)], capsys)
    assert code == 0 and out_file.read_text().startswith("--step-batch-size-schedule")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_library_validation_names_the_argument(diabetes):
    _, specs = diabetes
    spec = specs[800]
    with pytest.raises(ValueError, match="^format"):
        js.export_schedule(spec, format="deepspeed")
    with pytest.raises(ValueError, match="^micro_batch"):
        js.export_schedule(spec, format="megatron", micro_batch=3)
    with pytest.raises(ValueError, match="^stages"):
        js.export_schedule(spec, format="megatron", stages=0)
    with pytest.raises(ValueError, match="^schedule"):
        js.export_schedule({**spec, "samples": 801}, format="csv")
    assert math.isfinite(js.export_schedule(spec, format="csv").objective)
