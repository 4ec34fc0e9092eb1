"""Filters on a real Ray cluster (a head and a second node on this machine, see `raycluster`), shards through a
real S3 server (SeaweedFS): the same bytes and manifests as a local run, on real text; a worker killed
mid-step; the head lost mid-step, then the next apply resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SHARED_DATA, needs_shared_data
from tests.raycluster import RayCluster
from tests.test_gitops import Seaweed

pytestmark = [needs_shared_data, pytest.mark.skipif(not __import__("shutil").which("ray"), reason="the ray extra")]

FILTERS = """
    - {kind: length, field: response, min_chars: 20}
    - {kind: profanity}
    - {kind: unhelpful}
    - {kind: sql, where: "length(prompt_of(turns)) > 10"}
    - {kind: dedup}
    - {kind: clean}
    - {kind: compression, min_ratio: 0.2}
    - {kind: near_dedup, threshold: 0.7}
    - {kind: truncate, max_chars: 600}
    - {kind: limit, n: 1000}
    - {kind: sample, n: 800, seed: 3}
"""
NOT_KEPT = ("timings", "memory", "manifest_hash")  # when and how long, not what


def real_rows() -> list[dict[str, str]]:
    """Alpaca's demo (999 instructions, its first 150 twice: exact duplicates) and SQuAD 2.0's first five
    articles as question -> paragraph (each paragraph answers several questions: near duplicates)."""
    rows = []
    alpaca = json.loads((SHARED_DATA / "instruct" / "alpaca_en_demo.json").read_text())
    for r in alpaca + alpaca[:150]:
        rows.append({"prompt": (r["instruction"] + "\n" + r["input"]).strip(), "response": r["output"]})
    squad = json.loads((SHARED_DATA / "rag" / "squad2_dev_first5articles.json").read_text())
    for article in squad["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append({"prompt": qa["question"], "response": para["context"]})
    return rows


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    c = RayCluster().start()
    yield c
    c.stop()


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Seaweed]:
    server = Seaweed(tmp_path / "weed")
    server.root.mkdir()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "runner-test-key",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-printed",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.s3}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    server.start()
    yield server
    server.kill()


def recipe(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "recipe"
    d.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(real_rows()), d / "rows.parquet", row_group_size=200)
    (d / "r.yaml").write_text(
        "data:\n  sources:\n    - {name: real, format: parquet, path: rows.parquet, "
        "columns: {prompt: prompt, response: response}}\n  filters:" + FILTERS
    )
    return d / "r.yaml"


def apply(path: Path, cache: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "apply", str(path), "--cache-dir", str(cache), "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**RayCluster.env(), "RUNNER_SHARD_ROWS": "400", **(env or {})},
    )


def finished(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, dict[str, Any], str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, (json.loads(out) if out.strip() else {}), err


def manifests(cache: Path, summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from stores.cache import ArtifactCache

    c = ArtifactCache(cache)
    out = {}
    for step in summary["steps"]:
        art = c.get(step["key"])
        assert art is not None, step
        out[step["step"]] = {k: v for k, v in art.manifest.items() if k not in NOT_KEPT}
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("local")
    path = recipe(tmp)
    code, summary, err = finished(apply(path, tmp / "cache"))
    assert code == 0, err
    return path, manifests(tmp / "cache", summary)


@pytest.mark.slow
def test_filters_on_ray_write_the_local_bytes_and_manifests(
    cluster: RayCluster, s3: Seaweed, local_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, local = local_run
    rows = local["filter.sample"]["rows"]
    dropped = {name: m["rows"].get("rejects", 0) for name, m in local.items()}
    # the real text makes every kind of filter work: something to drop for each that compares rows
    assert dropped["filter.dedup"] > 100 and dropped["filter.near_dedup"] > 10 and rows["rows"] == 800, dropped

    env = {"RAY_ADDRESS": cluster.address}
    plan = subprocess.run(
        [sys.executable, "-m", "runner", "plan", str(path), "--executor", "ray", "--json"],
        capture_output=True,
        text=True,
        env={**RayCluster.env(), **env},
        cwd=ROOT,
    )
    where = {row["step"]: row["runs_on"] for row in json.loads(plan.stdout)}
    assert {s for s, w in where.items() if w == "ray"} == {s for s in local if s.startswith("filter.")}
    assert where["source.real"] == "driver"

    url = "s3://runner-ci/cluster-cache"
    code, summary, err = finished(apply(path, tmp_path / "cache", "--executor", "ray", "--cache-remote", url, env=env))
    assert code == 0, err
    assert manifests(tmp_path / "cache", summary) == local
    fs = s3.fs()
    shards = fs.find(f"{url}/shards") if fs.exists(f"{url}/shards") else []
    assert not [f for f in shards if f.endswith((".parquet", ".done"))]  # a built step leaves no shards


def ray_task_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::_run_task"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_a_worker_killed_mid_step_is_retried_and_the_bytes_hold(
    cluster: RayCluster, local_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, local = local_run
    proc = apply(path, tmp_path / "cache", "--executor", "ray", env={"RAY_ADDRESS": cluster.address})
    killed = None
    deadline = time.time() + 300
    while killed is None and proc.poll() is None and time.time() < deadline:
        pids = ray_task_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    code, summary, err = finished(proc)
    assert killed is not None, "no task ran"
    assert code == 0, err
    assert manifests(tmp_path / "cache", summary) == local
    assert not list((tmp_path / "cache").glob("shards/*/*"))


@pytest.mark.slow
def test_the_head_lost_mid_step_fails_in_one_line_and_the_next_apply_resumes(
    cluster: RayCluster, local_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, local = local_run
    lost = RayCluster(nodes=1).start()
    try:
        cache = tmp_path / "cache"
        # the executor from the recipe this time (--set: the recipe's data.executor)
        proc = apply(path, cache, "--set", "data.executor=ray", env={"RAY_ADDRESS": lost.address})
        deadline = time.time() + 300
        while not list(cache.glob("shards/*/nd/sig/*.done")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        lost.stop_head()  # near_dedup is running: some of its first stage's tasks are done
        code, failed, err = finished(proc, timeout=120)
    finally:
        lost.stop()
    assert code != 0
    errors = [s["error"] for s in failed["steps"] if s["state"] == "failed"]
    assert len(errors) == 1 and "\n" not in errors[0], failed
    assert "lost the Ray cluster" in errors[0] and "apply again to resume" in errors[0], errors
    assert list(cache.glob("shards/*/nd/sig/*.done"))  # what the tasks committed stays for the next apply

    # the next apply, on another cluster (the test's), starts near_dedup from the tasks done before
    code, summary, err = finished(apply(path, cache, "--executor", "ray", env={"RAY_ADDRESS": cluster.address}))
    assert code == 0, err
    assert manifests(cache, summary) == local
    key = next(s["key"] for s in summary["steps"] if s["step"] == "filter.near_dedup")
    assert "minhash: " in (cache / "logs" / f"{key}.log").read_text()  # "N of M tasks were done by an earlier ..."


@pytest.mark.slow
def test_a_directory_source_on_ray_reads_a_file_per_task(cluster: RayCluster, s3: Seaweed, tmp_path: Path) -> None:
    from tests.test_sources_real import alpaca_parts

    parts, _ = alpaca_parts(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  sources: [{{name: a, format: alpaca, path: {parts}}}]\n  filters: [{{kind: dedup}}]\n")
    env = {"RAY_ADDRESS": cluster.address}
    code, local, err = finished(apply(recipe, tmp_path / "local"))
    assert code == 0, err
    plan = subprocess.run(
        [sys.executable, "-m", "runner", "plan", str(recipe), "--executor", "ray", "--json"],
        capture_output=True, text=True, env={**RayCluster.env(), **env}, cwd=ROOT,
    )  # fmt: skip
    assert {row["step"]: row["runs_on"] for row in json.loads(plan.stdout)}["source.a"] == "ray"
    url = "s3://runner-ci/dir-source"
    code, summary, err = finished(apply(recipe, tmp_path / "ray", "--executor", "ray", "--cache-remote", url, env=env))
    assert code == 0, err
    assert manifests(tmp_path / "ray", summary) == manifests(tmp_path / "local", local)


def test_a_cluster_that_does_not_answer_or_an_unknown_executor_is_one_line(cli, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a question here", "response": "an answer long enough"}\n')
    recipe.write_text("data:\n  sources: [{name: s, format: jsonl, path: rows.jsonl}]\n  filters: [{kind: dedup}]\n")
    started = time.time()
    code, _, err = cli("apply", str(recipe), "--executor", "ray:127.0.0.2:1")
    assert code == 1 and time.time() - started < 30  # Ray alone would retry for minutes
    assert "filter.dedup" in err and "cannot reach the Ray cluster at 127.0.0.2:1" in err
    code, _, err = cli("plan", str(recipe), "--executor", "spark")
    assert code == 2 and "unknown executor 'spark'" in err
    recipe.write_text(recipe.read_text() + "  executor: dask\n")
    code, _, err = cli("plan", str(recipe))
    assert code != 0 and "data.executor" in err and "unknown executor 'dask'" in err
