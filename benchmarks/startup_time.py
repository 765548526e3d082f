"""Start-up time of the `flowmap` command: `flowmap --help`, `import flowmap_convert.cli`, `import flowmap_convert`.

Each is timed as a fresh interpreter, wall clock and CPU time (user + system: less moved by other
processes on a shared machine), median of `-n` runs. With `--before DIR` (a checkout of an
earlier commit, e.g. `git archive <commit> | tar -x -C DIR`) both trees are timed in turn, run by run, so that a
change in the machine's load falls on both alike; PYTHONPATH selects the tree. Also prints which heavy
dependencies each import loads.

    python benchmarks/startup_time.py --before /tmp/base -n 25
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "flowmap --help": "import sys; sys.argv = ['flowmap', '--help']; from flowmap_convert.cli import main; main()",
    "import flowmap_convert.cli": "import flowmap_convert.cli",
    "import flowmap_convert": "import flowmap_convert",
}
HEAVY = ("torch", "numpy", "safetensors", "huggingface_hub", "PIL", "triton", "accelerate", "diffusers", "transformers")


def run(tree: Path, code: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh interpreter running `code` (CPU: user + system, the child's own)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd="/", check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def loaded(tree: Path, module: str) -> list[str]:
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", check=True, capture_output=True, text=True)
    return out.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="an earlier checkout to time against this one")
    parser.add_argument("-n", type=int, default=15, help="runs per command and tree (default 15)")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": ROOT} if args.before else {"now": ROOT}
    times = {(c, t): [] for c in COMMANDS for t in trees}
    for code in COMMANDS.values():
        run(ROOT, code)  # warm the file cache once
    for _ in range(args.n):
        for c, code in COMMANDS.items():
            for t, tree in trees.items():
                times[(c, t)].append(run(tree, code))
    print(f"| command | clock | {' | '.join(trees)} |{' change |' if args.before else ''}")
    print(f"|---|---|{'---|' * len(trees)}{'---|' if args.before else ''}")
    for c in COMMANDS:
        for i, clock in enumerate(("wall", "CPU")):
            med = [statistics.median(x[i] for x in times[(c, t)]) for t in trees]
            change = f" {(med[1] / med[0] - 1) * 100:+.1f}% |" if args.before else ""
            print(f"| `{c}` | {clock} | {' | '.join(f'{m * 1000:.0f} ms' for m in med)} |{change}")
    print(f"\nmedian of {args.n} runs each, interleaved; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for t, tree in trees.items():
        for module in ("flowmap_convert", "flowmap_convert.cli"):
            print(f"{t}: `import {module}` loads {', '.join(loaded(tree, module)) or 'none'} of {', '.join(HEAVY)}")


if __name__ == "__main__":
    main()
