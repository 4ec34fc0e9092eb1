"""The no-op memo: an unchanged, fully cached apply answers without loading the recipe, and anything that could
change a key, an artifact or the lock sends it down the normal path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runner import noop
from tests.conftest import ROOT

# the apply runs in a process of its own and says whether it loaded the recipe's schema (the normal path does)
PROBE = """
import json, sys
from runner.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": "runner.schema" in sys.modules}))
"""


def apply(recipe: Path, cache: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """`runner apply RECIPE EXTRA...`: (whether the recipe was loaded, what it printed on stderr)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "apply", str(recipe), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "RUNNER_CACHE": str(cache), **(env or {})},
        timeout=120,
    )
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["code"] == 0, proc.stderr
    return out["loaded"], proc.stderr


def test_a_second_cached_apply_replays_the_first_and_loads_nothing(small_recipe: Path, _isolated_cache: Path) -> None:
    loaded, built = apply(small_recipe, _isolated_cache)
    assert loaded and "built" in built
    loaded, cached = apply(small_recipe, _isolated_cache)  # the normal path: it leaves the memo
    assert loaded and "built" not in cached and "done: 5 cached" in cached
    loaded, replayed = apply(small_recipe, _isolated_cache)
    assert not loaded
    assert replayed == cached
    # another command line is another memo; the first stays
    loaded, _ = apply(small_recipe, _isolated_cache, "--target", "split")
    assert loaded
    assert apply(small_recipe, _isolated_cache)[0] is False


def test_what_could_change_a_key_or_the_lock_goes_the_normal_way(small_recipe: Path, _isolated_cache: Path) -> None:
    apply(small_recipe, _isolated_cache)
    apply(small_recipe, _isolated_cache)
    assert apply(small_recipe, _isolated_cache)[0] is False
    # a variable runner reads
    assert apply(small_recipe, _isolated_cache, env={"RUNNER_DUCKDB_MEMORY": "1GB"})[0] is True
    # the data: one row more is rebuilt from the source on
    rows = small_recipe.parent / "rows.jsonl"
    with rows.open("a") as f:
        f.write(json.dumps({"prompt": "one more", "response": "a new answer"}) + "\n")
    loaded, err = apply(small_recipe, _isolated_cache)
    assert loaded and "built" in err
    apply(small_recipe, _isolated_cache)
    assert apply(small_recipe, _isolated_cache)[0] is False
    # the lock: removed, it is written again
    lock = small_recipe.with_name(small_recipe.name + ".lock")
    before = lock.read_text()
    lock.unlink()
    assert apply(small_recipe, _isolated_cache)[0] is True
    assert lock.read_text() == before
    # an artifact: a file of a step's output removed, the normal path finds it gone and builds the step again
    apply(small_recipe, _isolated_cache)
    assert apply(small_recipe, _isolated_cache)[0] is False
    ref = json.loads(next((_isolated_cache / "refs").glob("t-*.json")).read_text())
    art = _isolated_cache / "artifacts" / ref["steps"]["split"]["key"][:2] / ref["steps"]["split"]["key"]
    victim = next(p for p in art.rglob("*.parquet"))
    victim.parent.chmod(0o755)
    victim.unlink()
    loaded, err = apply(small_recipe, _isolated_cache)
    assert loaded and "built" in err and "split" in err
    # a recipe edit
    apply(small_recipe, _isolated_cache)
    small_recipe.write_text(small_recipe.read_text().replace("min_chars: 5", "min_chars: 6"))
    loaded, err = apply(small_recipe, _isolated_cache)
    assert loaded and "built" in err


def test_only_plain_applies_are_memoised(tmp_path: Path, monkeypatch) -> None:
    assert noop.memo_path(["apply", "r.yaml"]) is not None
    assert noop.memo_path(["apply", "r.yaml", "--set", "a.b=1", "--target=split", "--locked"]) is not None
    for argv in (
        ["apply", "r.yaml", "--json"],
        ["apply", "r.yaml", "--verify"],
        ["apply", "r.yaml", "--dry"],  # an abbreviation argparse would take: the normal path decides
        ["apply", "r.yaml", "--cache-remote", "s3://b"],
        ["plan", "r.yaml"],
        ["apply"],
    ):
        assert noop.memo_path(argv) is None, argv
    monkeypatch.setenv("RUNNER_CACHE_REMOTE", str(tmp_path))
    assert noop.memo_path(["apply", "r.yaml"]) is None
    assert noop.memo_path(["apply", "r.yaml", "--cache-dir", str(tmp_path)]) is None
    monkeypatch.delenv("RUNNER_CACHE_REMOTE")
    where = noop.memo_path(["apply", "r.yaml", "--cache-dir", str(tmp_path)])
    assert where is not None and where.parent == tmp_path / "noop"


def test_a_file_changed_after_it_was_read_is_not_vouched_for(tmp_path: Path, _isolated_cache: Path) -> None:
    """The memo keeps each input's stat from when the apply read it: an edit between that read and the memo's
    writing sends the next apply down the normal path."""
    (tmp_path / "d").mkdir()  # beside the cache, not its parent: the memo's directory appears in the cache
    data = tmp_path / "d" / "rows.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    argv = ["apply", str(tmp_path / "d" / "r.yaml")]
    lines = [("[dim]cached[/]  s", "cached  s")]
    with noop.Recorder() as recorder:
        data.read_text()
    noop.write(argv, recorder.paths, [], lines)
    assert noop.replay(argv) == 0
    with noop.Recorder() as recorder:
        data.read_text()
    data.write_text('{"prompt": "a", "response": "c"}\n')  # after the read, before the memo
    noop.write(argv, recorder.paths, [], lines)
    assert noop.replay(argv) is None
