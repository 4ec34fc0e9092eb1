"""A fully cached `runner apply` does no work: how long does it take, against bare imports?

Runs `runner apply recipes/quickstart.yaml` once to fill a temp cache, then times N more
(all cached) against `python -c "import duckdb, yaml, pydantic"` in the same run, and
prints the medians and their ratio. Target: under 0.5 s wall on a 2-core machine.

    python benchmarks/bench_cached_apply.py [-n 15] [--recipe recipes/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=15)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "RUNNER_CACHE": cache}
        apply = [sys.executable, "-m", "runner", "apply", args.recipe]
        baseline = [sys.executable, "-c", "import duckdb, yaml, pydantic"]
        first = wall(apply, env)
        runs, base = [], []
        for _ in range(args.n):  # interleaved, so machine noise hits both alike
            runs.append(wall(apply, env))
            base.append(wall(baseline, env))
    med, med_base = statistics.median(runs), statistics.median(base)
    print(f"first apply (builds everything): {first:.3f} s")
    print(f"cached apply, median of {args.n}:    {med:.3f} s  (min {min(runs):.3f}, max {max(runs):.3f})")
    print(f"python -c 'import duckdb, yaml, pydantic': {med_base:.3f} s")
    print(f"ratio cached apply / bare imports: {med / med_base:.2f}x")
    print(f"target < 0.5 s: {'met' if med < 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
