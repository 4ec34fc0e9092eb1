"""kill -9 at random moments and concurrent applies: the cache is never corrupted, nothing is built twice."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from stores.cache import ArtifactCache
from tests.conftest import popen_apply, write_jsonl

RECIPE = """\
data:
  sources:
    - {name: big, format: jsonl, path: big.jsonl}
  filters:
    - {kind: clean}
    - {kind: length, min_chars: 8}
    - {kind: dedup}
  split: {validation: 0.1, seed: 7}
"""


@pytest.fixture
def big_recipe(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = [
        {"prompt": " ".join(rng.choices(words, k=8)), "response": " ".join(rng.choices(words, k=rng.randint(1, 30)))}
        for _ in range(40_000)
    ]
    write_jsonl(tmp_path / "big.jsonl", rows)
    (tmp_path / "big.yaml").write_text(RECIPE)
    return tmp_path / "big.yaml"


def finish(recipe: Path, cache: Path) -> dict:
    proc = popen_apply(recipe, cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out)


def data_files(cache: Path, summary: dict) -> dict[str, bytes]:
    out = {}
    for s in summary["steps"]:
        d = cache / "artifacts" / s["key"][:2] / s["key"] / "data"
        out.update({f"{s['step']}/{p.relative_to(d)}": p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()})
    return out


def assert_sound(cache: Path) -> None:
    c = ArtifactCache(cache)
    for key in c.keys():
        assert c.problems(key, deep=True) == [], f"partial or corrupt artifact {key}"
    c.stat_cache.close()


@pytest.mark.slow
def test_kill_9_at_random_moments(big_recipe: Path, tmp_path: Path) -> None:
    ref_cache = tmp_path / "reference"
    started = time.time()
    reference = finish(big_recipe, ref_cache)
    duration = time.time() - started
    expected = data_files(ref_cache, reference)
    rng = random.Random(20261122)
    cache = tmp_path / "killed"
    killed_mid_build = 0
    for trial in range(20):
        shutil.rmtree(cache, ignore_errors=True)
        proc = popen_apply(big_recipe, cache)
        time.sleep(rng.uniform(0.05, duration))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        tmp_dirs = list((cache / "tmp").glob("*")) if (cache / "tmp").exists() else []
        killed_mid_build += bool(tmp_dirs)
        assert_sound(cache)
        summary = finish(big_recipe, cache)
        assert [s["key"] for s in summary["steps"]] == [s["key"] for s in reference["steps"]], f"trial {trial}"
        assert data_files(cache, summary) == expected, f"trial {trial}: outputs differ"
        assert list((cache / "tmp").iterdir()) == [], "leftover temp dirs were cleaned"
    assert killed_mid_build >= 3, "the kills should land inside builds, not only at start-up"


@pytest.mark.slow
def test_two_concurrent_applies_build_each_step_once(big_recipe: Path, tmp_path: Path) -> None:
    cache = tmp_path / "shared"
    procs = [popen_apply(big_recipe, cache), popen_apply(big_recipe, cache)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    steps = [s["step"] for s in outs[0]["steps"]]
    for i, step in enumerate(steps):
        built = [o["steps"][i]["state"] for o in outs].count("built")
        assert built == 1, f"{step} built {built} times"
        assert outs[0]["steps"][i]["key"] == outs[1]["steps"][i]["key"]
    assert_sound(cache)
