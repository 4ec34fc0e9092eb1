"""A fully cached `runner apply` does no work: how long does it take, against DVC and bare imports?

Runs `runner apply recipes/quickstart.yaml` once to fill a temp cache, then times N more (all cached), each as
a pair: with the no-op memo removed first (the normal path: load, plan, check every artifact; it leaves the
memo) and then as it is (the memo replayed, as on a user's second run), interleaved with DVC on the same graph (one dvc.yaml stage per runner step, the same dependencies between
them, each stage a small copy command; `dvc repro` once to build, then `dvc status` and a no-op
`dvc repro`) and with `python -c "import duckdb, yaml, pydantic"`, and prints medians and ratios.
Target: under 0.5 s wall on a 2-core machine, and faster than DVC.

    python benchmarks/bench_cached_apply.py [-n 15] [--recipe recipes/quickstart.yaml]   (needs the bench extra: dvc)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def dvc_project(recipe: str, where: Path) -> None:
    """A git + DVC repo whose dvc.yaml has the recipe's steps as stages, with the same dependencies."""
    import yaml

    from runner import api

    graph = api.load(ROOT / recipe).graph
    (where / "in.txt").write_text("input\n")
    stages = {}
    for name in graph.order:
        node = graph.nodes[name]
        deps = [f"out/{d}.txt" for d in node.inputs] or ["in.txt"]
        out = f"out/{name}.txt"
        stages[name.replace(".", "_")] = {
            "cmd": f"mkdir -p out && cat {' '.join(deps)} > {out} && echo {name} >> {out}",
            "deps": deps,
            "outs": [out],
        }
    (where / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "repro", "-q"],
    ):
        subprocess.run(cmd, check=True, cwd=where, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=15)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as dvc_dir:
        # a copy of the recipe's directory: a complete apply writes its lock beside the recipe
        copy = Path(cache) / "recipes"
        shutil.copytree(Path(args.recipe).resolve().parent, copy)
        recipe = str(copy / Path(args.recipe).name)
        # bytecode written and read, as on a user's machine (a shell with PYTHONDONTWRITEBYTECODE set recompiles
        # every module of runner's on each run; DVC's come precompiled from its wheel either way)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["RUNNER_CACHE"] = str(Path(cache) / "cache")
        apply = [sys.executable, "-m", "runner", "apply", recipe]
        baseline = [sys.executable, "-c", "import duckdb, yaml, pydantic"]
        first = wall(apply, env)
        dvc_project(recipe, Path(dvc_dir))
        runs: dict[str, list[float]] = {
            "runner apply (cached)": [],
            "runner apply (no memo)": [],
            "dvc status": [],
            "dvc repro (no-op)": [],
            "import duckdb, yaml, pydantic": [],
        }
        for _ in range(args.n):  # interleaved, so machine noise hits all alike
            shutil.rmtree(Path(env["RUNNER_CACHE"]) / "noop", ignore_errors=True)
            runs["runner apply (no memo)"].append(wall(apply, env))
            runs["runner apply (cached)"].append(wall(apply, env))
            runs["dvc status"].append(wall(["dvc", "status", "-q"], env, cwd=Path(dvc_dir)))
            runs["dvc repro (no-op)"].append(wall(["dvc", "repro", "-q"], env, cwd=Path(dvc_dir)))
            runs["import duckdb, yaml, pydantic"].append(wall(baseline, env))
    ours = statistics.median(runs["runner apply (cached)"])
    print(f"first apply (builds everything): {first:.3f} s; then median (min-max) of {args.n}:")
    for name, times in runs.items():
        med = statistics.median(times)
        print(f"  {name:<30} {med:6.3f} s ({min(times):.3f}-{max(times):.3f})  {med / ours:5.2f}x runner's")
    print(f"target < 0.5 s: {'met' if ours < 0.5 else 'MISSED'}")
    status = statistics.median(runs["dvc status"])
    print(f"target <= 0.5x dvc status ({0.5 * status:.3f} s): {'met' if ours <= 0.5 * status else 'MISSED'}")


if __name__ == "__main__":
    main()
