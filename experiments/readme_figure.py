"""The README's picture: ``jaxsched optimize --stages 4 --multiple-of 4`` on the default problem
(diabetes, lr 0.05, 400 steps, 3200 samples), its ``schedule.png`` copied to ``docs/schedule.png``.

    python experiments/readme_figure.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from jaxsched import cli

ARGS = ["optimize", "--stages", "4", "--multiple-of", "4"]


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.path.join(root, "docs", "schedule.png")
    with tempfile.TemporaryDirectory() as tmp:
        code = cli.main([*ARGS, "--out", tmp])
        if code:
            return code
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(tmp, "schedule.png"), target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
