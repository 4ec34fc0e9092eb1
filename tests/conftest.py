from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache; nothing touches the user's ~/.cache/runner."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RUNNER_CACHE", str(cache))
    return cache


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from runner.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_subprocess(
    *args: str, cache: Path, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNNER_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RECIPE = """\
name: t
data:
  sources:
    - name: s
      format: jsonl
      path: rows.jsonl
  filters:
    - kind: length
      min_chars: 5
    - kind: dedup
  split:
    validation: 0.25
"""


@pytest.fixture
def small_recipe(tmp_path: Path) -> Path:
    """A recipe over 40 rows: 3 have short replies, 2 are duplicates."""
    rows = [{"prompt": f"question {i}", "response": f"answer number {i}"} for i in range(35)]
    rows += [{"prompt": f"short {i}", "response": "no"} for i in range(3)]
    rows += [
        {"prompt": "question 1", "response": "answer number 1"},
        {"prompt": "question 2", "response": "answer number 2"},
    ]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(RECIPE)
    return recipe
