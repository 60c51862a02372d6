"""``jaxsched sweep`` config errors (issue 13 item 10): each bad key gives one line naming it, exit 2,
no traceback and no output folder; nothing here compiles a sweep."""

import json

import pytest

from jaxsched.cli import sweep as cli

GOOD = {
    "problem": {"kind": "gaussian", "dim": 4, "decay": 1.0},
    "grid": {"lr": [0.1], "samples": [40]},
    "sweep": {"steps": 10, "output": "out"},
}


def with_change(section, key, value):
    cfg = json.loads(json.dumps(GOOD))
    if section is None:
        cfg[key] = value
    elif key is None:
        cfg[section] = value
    else:
        cfg[section][key] = value
    return cfg


BAD = [
    # (section, key, value, the key the message must name)
    ("problem", "replase", True, "problem.replase"),
    ("sweep", "steps", [10, 20], "sweep.steps"),
    ("problem", None, "str", "problem"),
    ("sweep", None, 5, "sweep"),
    ("problem", "dim", [3], "problem.dim"),
    ("grid", "samples", {"start": [1, 2], "stop": 80, "num": 3}, "grid.samples.start"),
    ("grid", "samples", {"start": 40, "stop": 80, "num": -3}, "grid.samples.num"),
    ("sweep", "steps", "abc", "sweep.steps"),
    ("sweep", "steps", 100.7, "sweep.steps"),
    ("sweep", "min_batch", "one", "sweep.min_batch"),
    ("sweep", "exact", "no", "sweep.exact"),
    ("sweep", "path", "fast", "sweep.path"),
    ("sweep", "colour", 1, "sweep.colour"),
    ("grid", "lr", "fast", "grid.lr"),
    (None, "extra", {}, "config.extra"),
]


@pytest.mark.parametrize(("section", "key", "value", "named"), BAD)
def test_bad_config_key_gives_one_line_and_exit_2(tmp_path, capsys, section, key, value, named):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(with_change(section, key, value)))
    assert cli.main(["sweep", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"jaxsched sweep: error: {named}:"), err
    assert not (tmp_path / "out").exists()


def test_good_config_passes_the_schema():
    cli.check_config(GOOD)  # the reference the bad ones differ from by one key
    cli.check_config(with_change("grid", "samples", {"start": 40, "stop": 80, "num": 3,
                                                     "scale": "log"}))
