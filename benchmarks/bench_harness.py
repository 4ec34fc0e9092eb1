"""lm-evaluation-harness tasks, scored by runner in-process (`eval.harness`: a step per task and model) against the
harness's own CLI run by hand (`lm_eval --model hf`, once on the base model's directory and once on the merged
model's), on the same tasks, examples and batch size, in one run.

The quickstart's tiny Falcon (trained once, cached), the six local tasks of recipes/tasks/ over the shared samples
(../shared/data/eval; PIQA's labels joined in), --limit examples each. Each repeat starts runner from a copy of
the cache with everything built but the harness steps. Prints the median seconds of each of --repeats runs and
the ratio.

    python benchmarks/bench_harness.py [--limit 200] [--repeats 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RUNNER_TEST_SHARED_DATA") or ROOT.parent / "shared" / "data")
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "winogrande"]


def local_tasks(folder: Path) -> None:
    folder.mkdir()
    for t in TASKS:
        shutil.copy(ROOT / "recipes" / "tasks" / f"{t}_local.yaml", folder)
        if t != "piqa":
            (folder / f"{t}.jsonl").symlink_to(SHARED / "eval" / f"{t}.jsonl")
    rows = (SHARED / "eval" / "piqa.jsonl").read_text().splitlines()
    labels = (SHARED / "eval" / "piqa-labels.lst").read_text().split()
    with (folder / "piqa.jsonl").open("w") as f:
        for r, x in zip(rows, labels, strict=True):
            f.write(json.dumps({**json.loads(r), "label": int(x)}) + "\n")


def runner(*args: str, cache: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "RUNNER_CACHE": str(cache)},
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-harness-"))
    tasks = work / "tasks"
    local_tasks(tasks)
    recipe = str(ROOT / "recipes" / "quickstart.yaml")
    listed = ", ".join(str(tasks / f"{t}_local.yaml") for t in TASKS)
    harness = f"eval.harness={{tasks: [{listed}], limit: {args.limit}, batch_size: {args.batch_size}}}"
    built = work / "built"
    runner("apply", recipe, "--set", "train.merge=true", cache=built)  # everything but the harness steps
    merged = runner("show", recipe, "merge", "--path", "--set", "train.merge=true", cache=built).strip()
    init = runner("show", recipe, "model.init", "--path", "--set", "train.merge=true", cache=built).strip()
    tok = runner("show", recipe, "tokenizer", "--path", "--set", "train.merge=true", cache=built).strip()

    def run_runner() -> float:
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(built, cache, symlinks=True)
        start = time.perf_counter()
        runner("apply", recipe, "--set", "train.merge=true", "--set", harness, cache=cache)
        return time.perf_counter() - start

    def run_cli() -> float:
        start = time.perf_counter()
        for model_args in (f"pretrained={init}/model,tokenizer={tok}/tokenizer", f"pretrained={merged}/model"):
            subprocess.run(
                [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks",
                 ",".join(f"{t}_local.yaml" for t in TASKS), "--limit", str(args.limit), "--batch_size",
                 str(args.batch_size)],
                cwd=tasks, check=True, capture_output=True,
            )  # fmt: skip
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"runner": [], "lm_eval": []}
    for _ in range(args.repeats):
        times["runner"].append(run_runner())
        times["lm_eval"].append(run_cli())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"6 tasks x {args.limit} examples, base and tuned, batch {args.batch_size}, median of {args.repeats}")
    for k, v in times.items():
        print(f"  {k:8s} {med[k]:7.1f} s   ({', '.join(f'{t:.1f}' for t in v)})")
    print(f"  runner / lm_eval: {med['runner'] / med['lm_eval']:.2f}x the time")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
