"""Wall time of ``jaxsched optimize`` cold (empty compilation cache) and warm (the cache the cold run
filled), side by side, as subprocesses as a user runs it; plus a run with ``--no-cache``.

For each run: wall time, the split interpreter start / ``import jaxsched`` / tracing and lowering /
XLA compilation (including persistent-cache reads) / the rest (computing, writing, plotting), and
the cache folder's size afterwards. Compile figures come from JAX's own log (``JAX_LOG_COMPILES``:
"Finished tracing + transforming", "Finished jaxpr to MLIR module conversion", "Finished XLA
compilation"); tracing of nested jitted functions is counted inside their caller too, so the
tracing column is an upper bound.

    python experiments/bench_cli.py                 # the default job (diabetes, 400 steps)
    python experiments/bench_cli.py --steps 40 --samples 320 --method exact
    python experiments/bench_cli.py --compare 80d5b5c   # and the same rows for an older commit
    python experiments/bench_cli.py --tree DIR      # a package tree DIR (holding jaxsched/) instead

With ``--compare REV`` the commit's ``jaxsched`` package is exported (``git archive``) into a
temporary folder and run the same way, in the same session, so the ratios hold under the same
machine load; the load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

WRAPPER = """
import sys, time
t0 = time.perf_counter()
from jaxsched.cli import main
t1 = time.perf_counter()
code = main(sys.argv[1:])
t2 = time.perf_counter()
print(f"BENCH import={t1 - t0:.4f} run={t2 - t1:.4f}", file=sys.stderr)
sys.exit(code)
"""

_PATTERNS = {
    "trace": re.compile(r"Finished tracing \+ transforming .* in ([0-9.eE+-]+) sec"),
    "lower": re.compile(r"Finished jaxpr to MLIR module conversion .* in ([0-9.eE+-]+) sec"),
    "compile": re.compile(r"Finished XLA compilation of .* in ([0-9.eE+-]+) sec"),
}


def _folder_size(path: str) -> tuple[int, int]:
    files = size = 0
    for root, _, names in os.walk(path):
        for n in names:
            files += 1
            size += os.path.getsize(os.path.join(root, n))
    return files, size


def run_once(args: list[str], cache_home: str, out: str, no_cache: bool, tree: str | None = None
             ) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAXSCHED_NO_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env |= {"XDG_CACHE_HOME": cache_home, "JAX_LOG_COMPILES": "1"}
    if tree is not None:  # ahead of the installed package on sys.path
        env["PYTHONPATH"] = os.pathsep.join([tree, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-c", WRAPPER, "optimize", "--out", out, "--quiet", *args]
    if no_cache:
        cmd.append("--no-cache")
    t0 = time.perf_counter()
    # cwd: a folder without a jaxsched/ of its own (python -c puts the cwd first on sys.path)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(out))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"jaxsched optimize failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    found = re.search(r"BENCH import=([0-9.]+) run=([0-9.]+)", proc.stderr)
    imp, run = float(found.group(1)), float(found.group(2))
    sums = {k: sum(float(m) for m in p.findall(proc.stderr)) for k, p in _PATTERNS.items()}
    programs = len(_PATTERNS["compile"].findall(proc.stderr))
    files, size = _folder_size(os.path.join(cache_home, "jaxsched"))
    return {
        "wall": wall,
        "start": wall - imp - run,
        "import": imp,
        "trace+lower": sums["trace"] + sums["lower"],
        "xla compile": sums["compile"],
        "rest": run - sums["trace"] - sums["lower"] - sums["compile"],
        "programs": programs,
        "cache files": files,
        "cache MB": size / 2**20,
    }


def export_commit(rev: str, folder: str) -> str:
    """``git archive`` of ``rev``'s ``jaxsched/`` into ``folder``; returns ``folder``."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    archive = subprocess.run(["git", "archive", rev, "jaxsched"], capture_output=True, check=True,
                             cwd=root).stdout
    os.makedirs(folder, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def measure(rest: list[str], tmp: str, label: str, tree: str | None) -> dict:
    cache_home = os.path.join(tmp, f"xdg-{label}")
    return {
        "cold": run_once(rest, cache_home, os.path.join(tmp, f"{label}-o1"), False, tree),
        "warm": run_once(rest, cache_home, os.path.join(tmp, f"{label}-o2"), False, tree),
        "no-cache": run_once(rest, os.path.join(tmp, f"xdg-{label}-none"),
                             os.path.join(tmp, f"{label}-o3"), True, tree),
    }


def table(title: str, rows: dict) -> None:
    keys = list(rows["cold"])
    print(title)
    print(f"{'':<12}" + "".join(f"{k:>10}" for k in rows))
    for k in keys:
        print(f"{k:<12}" + "".join(f"{rows[r][k]:>10.3g}" for r in rows))
    cold, warm = rows["cold"], rows["warm"]
    print(f"warm / cold wall: {warm['wall'] / cold['wall']:.2f}; "
          f"warm / cold xla compile: {warm['xla compile'] / max(cold['xla compile'], 1e-9):.2f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", metavar="REV", help="also run this git commit's package")
    parser.add_argument("--tree", metavar="DIR", help="run the package under DIR (not the installed)")
    known, rest = parser.parse_known_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        now = measure(rest, tmp, "now", known.tree)
        table(f"jaxsched optimize {' '.join(rest) or '(defaults)'} --quiet "
              f"[{known.tree or 'installed'}]; seconds unless named", now)
        if known.compare:
            tree = export_commit(known.compare, os.path.join(tmp, "tree"))
            old = measure(rest, tmp, "old", tree)
            table(f"the same at {known.compare}", old)
            for r in ("cold", "warm", "no-cache"):
                print(f"{r:<9} wall now / {known.compare}: {now[r]['wall'] / old[r]['wall']:.2f} "
                      f"({now[r]['wall']:.2f} s vs {old[r]['wall']:.2f} s)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
