from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the public sample data the tests read (../shared/data/SOURCES.md); elsewhere with $RUNNER_TEST_SHARED_DATA
SHARED_DATA = Path(os.environ.get("RUNNER_TEST_SHARED_DATA") or ROOT.parent / "shared" / "data")
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"needs the sample data in {SHARED_DATA}")


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


SAMPLE = ROOT / "recipes" / "data" / "sample.oasst.jsonl"  # the project's own oasst-format sample


def tiny_model_recipe(
    *,
    arch: str = "falcon",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int | None = 0,
    vocab: int = 400,
    head: str = "",
    data: str = "",
    model: str = "",
    rest: str = "",
) -> str:
    """A recipe's text: SAMPLE's English conversations tuning a model built from a scaled-down config (random
    weights, no download) with a tokenizer trained on them. `head` goes before `data:`, `data` and `model` add
    lines to those sections, `rest` is the sections after them."""
    seeded = "" if seed is None else f", seed: {seed}"
    return f"""
{head}data:
  sources: [{{name: s, format: oasst, path: {SAMPLE}, lang: [en]}}]
{data}model:
  base: {{from_config: {{architecture: {arch}, hidden_size: {hidden}, layers: {layers}, heads: {heads}{seeded}}}}}
  tokenizer: {{train: {{vocab_size: {vocab}}}}}
{model}{rest}"""


def apply_json(cli: Callable[..., tuple[int, str, str]], *args: str) -> dict[str, Any]:
    """`runner apply ARGS --json` in-process; its summary (the apply must succeed)."""
    code, out, err = cli("apply", *args, "--json")
    assert code == 0, err
    return dict(json.loads(out))


def step_states(summary: dict[str, Any]) -> dict[str, str]:
    """Step name -> built / cached / … from an apply's JSON summary."""
    return {s["step"]: s["state"] for s in summary["steps"]}


def popen_apply(recipe: Path, cache: Path) -> subprocess.Popen[str]:
    """`runner apply RECIPE --json` started in its own process (to be killed, or raced), into `cache`."""
    return subprocess.Popen(
        [sys.executable, "-m", "runner", "apply", str(recipe), "--json"],
        cwd=ROOT,
        env={**os.environ, "RUNNER_CACHE": str(cache)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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


def sql_rows(build: Any, query: str) -> list[tuple[Any, ...]]:
    """`api.sql`'s result as row tuples, columns in order."""
    from runner import api

    table = api.sql(build, query)
    return list(zip(*(c.to_pylist() for c in table.columns), strict=True))


# -- the browser tests (test_ui, test_report) ---------------------------------------------------------

# the browser's program: Debian's chromium (CI installs it); RUNNER_REQUIRE_BROWSER=1 makes its absence a failure
CHROMIUM = os.environ.get("RUNNER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def browser_or_skip() -> str:
    if CHROMIUM is None:
        if os.environ.get("RUNNER_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH (apt-get install chromium), and RUNNER_REQUIRE_BROWSER is set")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    pytest.importorskip("playwright", reason="the browser tests drive Chromium with Playwright (dev extra)")
    return CHROMIUM


def shots(tmp: Path) -> Path:
    """Where screenshots go: $RUNNER_SCREENSHOTS when set (docs/img is refreshed so), else the test's tmp dir."""
    out = Path(os.environ.get("RUNNER_SCREENSHOTS") or tmp)
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = browser_or_skip()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def family_hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An HF_HOME whose hub cache holds every family of `tests.hubmodels` under its hub id (real tokenizers and
    templates, scaled-down real configs, random weights): (HF_HOME, family -> commit). Built once per session."""
    from tests import hubmodels

    if not hubmodels.available():
        pytest.skip(f"needs llama.cpp's vocab files at {hubmodels.MODELS} (RUNNER_GGUF_CONVERTER, see .ci/run)")
    home = tmp_path_factory.mktemp("hf_home")
    return home, {name: hubmodels.write_snapshot(home, name)[0] for name in hubmodels.FAMILIES}
