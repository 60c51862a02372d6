"""The README's Python blocks run, in order, in one namespace (as a reader pastes them), in a
scratch folder. A block that breaks after an API change fails here, not in a user's session."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 3


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # say which block broke
            raise AssertionError(f"README python block {i + 1} failed: {type(e).__name__}: {e}") from e
