"""Data steps on Ray against the same steps in one process and against datatrove's own Ray executor, in one
run, on a Ray cluster this script starts on this machine (one node, 2 CPUs: 2 workers; every address on
loopback; stopped at the end):

- chain: bench_filters' source and five filters (length, profanity, unhelpful, SQL, exact dedup) on --rows;
- near_dedup: bench_dedup's rows (Alpaca replies and edited copies) through runner's near_dedup (threshold
  0.8, 128 permutations) against datatrove's MinHash (4 stages, 11 x 11 bands, no exact check) on
  --near-rows.

runner local and runner on Ray must write the very same bytes (the output hashes are compared); datatrove
must keep as many rows in the chain (its dedup keeps one row per text, not always the first). Times are of
the whole apply (fresh cache) for the chain, of the near_dedup step alone for near_dedup (its source step
is not counted), and of all datatrove stages. Each Ray step's log gives its stages' task times; the rest
of the step is the driver's (planning shards, writing the step's files): the figures the cluster page's
extrapolation uses.

    python benchmarks/bench_cluster.py [--rows 1000000] [--near-rows 1000000] [--only chain,near]
        [--sides local,ray,datatrove]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dedup
import bench_filters

HOST = "127.0.0.2"  # loopback that Ray takes as given (it turns 127.0.0.1 into the interface address)


class Cluster:
    """`ray start --head --block --num-cpus 2` in its own process group."""

    def __init__(self, port: int = 26379) -> None:
        self.address = f"{HOST}:{port}"
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
        )  # fmt: skip
        os.environ.update({"RAY_ADDRESS": self.address, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
        deadline = time.time() + 120
        while "Active:" not in subprocess.run(["ray", "status"], capture_output=True, text=True, env=env).stdout:
            if time.time() > deadline:
                raise SystemExit("the Ray cluster did not start")
            time.sleep(1)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.temp, ignore_errors=True)


def stage_seconds(log: Path) -> float:
    """The seconds a Ray step's tasks took, stage by stage (from the step's log)."""
    if not log.exists():
        return 0.0
    return sum(float(m) for m in re.findall(r"tasks in ([0-9.]+) s", log.read_text()))


def runner_apply(work: Path, recipe: str, target: str, executor: str) -> dict[str, Any]:
    from runner import api

    (work / "r.yaml").write_text(recipe)
    cache = work / f"cache-{executor.split(':')[0]}"
    shutil.rmtree(cache, ignore_errors=True)
    build = api.load(work / "r.yaml", cache_dir=cache, targets=[target])
    started = time.perf_counter()
    result = api.apply(build, executor=executor)
    total = time.perf_counter() - started
    assert result.ok, [s.error for s in result.steps]
    steps = {s.name: s for s in result.steps}
    art = steps[target].artifact
    assert art is not None
    tasks = sum(stage_seconds(cache / "logs" / f"{s.key}.log") for s in result.steps if s.key)
    log = cache / "logs" / f"{steps[target].key}.log"
    return {
        "stages": re.findall(r"(\w+): (\d+) tasks in ([0-9.]+) s", log.read_text()) if log.exists() else [],
        "seconds": total,
        "step": steps[target].seconds,
        "tasks": tasks,
        "hash": art.output_hash,
        "rows": art.manifest["rows"]["rows"],
    }


def chain(work: Path, rows: int, sides: list[str], address: str) -> dict[str, dict[str, Any]]:
    if not (work / "data.parquet").exists():
        bench_filters.make_data(work, rows)
    recipe = (
        "data:\n  sources:\n    - {name: s, format: parquet, path: data.parquet, "
        "columns: {prompt: prompt, response: response, score: score}}\n  filters:" + bench_filters.FILTERS
    )
    out: dict[str, dict[str, Any]] = {}
    if "local" in sides:
        out["local"] = runner_apply(work, recipe, "filter.dedup", "local")
    if "ray" in sides:
        out["ray"] = runner_apply(work, recipe, "filter.dedup", f"ray:{address}")
    if "datatrove" in sides:
        out["datatrove"] = datatrove(lambda ex: bench_filters.run_datatrove(work, work / "dt.parquet", ex))
        import pyarrow.parquet as pq

        out["datatrove"]["rows"] = pq.read_metadata(work / "dt.parquet").num_rows
    return out


def near(work: Path, rows: int, sides: list[str], address: str) -> dict[str, dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = bench_dedup.rows(rows)
    pq.write_table(pa.Table.from_pylist(data), work / "near.parquet", row_group_size=100_000)
    recipe = (
        "data:\n  sources: [{name: s, format: parquet, path: near.parquet, "
        "columns: {prompt: prompt, response: response}}]\n"
        "  filters: [{kind: near_dedup, field: response, threshold: 0.8}]\n"
    )
    out: dict[str, dict[str, Any]] = {}
    if "local" in sides:
        out["local"] = runner_apply(work, recipe, "filter.near_dedup", "local")
    if "ray" in sides:
        out["ray"] = runner_apply(work, recipe, "filter.near_dedup", f"ray:{address}")
    if "datatrove" in sides:
        texts = [r["response"] for r in data]

        def run(executor: Any) -> None:
            d = work / "dt-near"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            out["removed"] = {"rows": len(bench_dedup.by_datatrove(texts, d, executor))}

        out["datatrove"] = datatrove(run)
        out["datatrove"]["rows"] = rows - out.pop("removed")["rows"]
    return out


def datatrove(run: Any) -> dict[str, Any]:
    """`run(executor)` with datatrove's RayPipelineExecutor (2 workers), timed."""
    import ray
    from datatrove.executor.ray import RayPipelineExecutor
    from loguru import logger

    logger.remove()

    def executor(pipeline: list[Any], **kw: Any) -> Any:
        return RayPipelineExecutor(pipeline, **{"workers": 2, **kw, "mem_per_cpu_gb": 1})

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level=40, log_to_driver=False)
    try:
        started = time.perf_counter()
        run(executor)
        return {"seconds": time.perf_counter() - started}
    finally:
        ray.shutdown()


def report(name: str, rows: int, got: dict[str, dict[str, Any]]) -> None:
    print(f"\n{name}, {rows:,} rows in")
    for side, r in got.items():
        extra = ""
        if side == "ray":
            extra = f"  (Ray tasks {r['tasks']:.1f} s, the driver the rest)"
            if name == "near_dedup":
                extra += "; stages: " + ", ".join(f"{st} {n} tasks {sec} s" for st, n, sec in r["stages"])
        step = f", step {r['step']:.1f} s" if "step" in r else ""
        print(f"  {side:<10} {r['seconds']:8.1f} s{step}  rows out {r['rows']:,}{extra}")
    if "local" in got and "ray" in got:
        same = got["local"]["hash"] == got["ray"]["hash"]
        print(f"  Ray's output {'is' if same else 'IS NOT'} the local bytes")
        assert same
        key = "step" if name == "near_dedup" else "seconds"
        print(f"  Ray / local: {got['ray'][key] / got['local'][key]:.2f}x the time")
    if "ray" in got and "datatrove" in got:
        key = "step" if name == "near_dedup" else "seconds"
        print(f"  datatrove on Ray / runner on Ray: {got['datatrove']['seconds'] / got['ray'][key]:.2f}x the time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--near-rows", type=int, default=1_000_000)
    ap.add_argument("--only", default="chain,near")
    ap.add_argument("--sides", default="local,ray,datatrove")
    args = ap.parse_args()
    sides = args.sides.split(",")
    cluster = Cluster()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if "chain" in args.only:
                report("chain", args.rows, chain(work, args.rows, sides, cluster.address))
            if "near" in args.only:
                report("near_dedup", args.near_rows, near(work, args.near_rows, sides, cluster.address))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
