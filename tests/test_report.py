"""runner report on real data (Alpaca, the shared profanity list), opened in Chromium with networking off: the
charts render and show the manifests' numbers, which independent Python recomputes from the source file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner import api
from tests.conftest import SHARED_DATA, needs_shared_data, shots, write_jsonl

pytest.importorskip("plotly", reason="runner report needs the ui extra")
ALPACA = SHARED_DATA / "instruct" / "alpaca_en_demo.json"
TRAP = "<img src=x onerror=\"document.title='pwned'\">"


def recipe(tmp: Path, name: str, min_chars: int) -> Path:
    write_jsonl(tmp / "extra.jsonl", [{"prompt": "Say hi", "response": f"hi {TRAP}"}])
    words = SHARED_DATA / "profanity" / "ldnoobw_en.txt"
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"""name: {name}
data:
  sources:
    - {{name: a, format: alpaca, path: {ALPACA}}}
    - {{name: 0x, format: jsonl, path: extra.jsonl}}
  filters:
    - {{kind: length, field: response, min_chars: {min_chars}, max_words: 120}}
    - {{kind: profanity, words_file: {words}}}
    - {{kind: dedup}}
  split: {{validation: 0.05, seed: 1}}
model:
  base: {{from_config: {{architecture: falcon, hidden_size: 64, layers: 2, heads: 4, seed: 0}}}}
  tokenizer: {{train: {{vocab_size: 400}}}}
train: {{seq_len: 64, batch_size: 8, lr: 5.0e-3, max_steps: 12, seed: 1, eval_every: 4, checkpoint_every: 4}}
eval: {{max_new_tokens: 8}}
"""
    )
    return path


def alpaca_kept_by_length(min_chars: int) -> int:
    """Alpaca rows the length filter keeps, counted here from the JSON file."""
    return sum(
        len(r["output"]) >= min_chars and len(r["output"].split()) <= 120 for r in json.loads(ALPACA.read_text())
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("report")
    a, b = recipe(tmp, "short", 100), recipe(tmp, "long", 150)
    cache = tmp / "cache"
    for r in (a, b):
        assert api.apply(api.load(r, cache_dir=cache)).ok
    return a, b, cache


def open_offline(browser: Any, path: Path) -> tuple[Any, list[str]]:
    """The file in a browser that can reach nothing: every request but the file itself is refused."""
    context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.route(re.compile(r"^(?!file://).*"), lambda route: (problems.append(route.request.url), route.abort()))
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (problems.append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length > 0")
    return page, problems


def chart(page: Any, div: str) -> list[dict[str, Any]]:
    """The traces a chart drew: name, x, y, and how many bars or points of it are in the page."""
    return list(
        page.evaluate(
            """id => { const d = document.getElementById(id);
                return d.data.map((t, i) => ({name: t.name, x: Array.from(t.x || []), y: Array.from(t.y || []),
                  drawn: d.querySelectorAll('.trace')[i] ? d.querySelectorAll('.trace')[i].querySelectorAll(
                    '.point, path.js-line').length : 0})) }""",
            div,
        )
    )


@needs_shared_data
def test_a_build_report_opens_offline_and_shows_the_manifests(
    built: tuple[Path, Path, Path], cli: Callable[..., tuple[int, str, str]], tmp_path: Path, browser: Any
) -> None:
    a, _, cache = built
    out = tmp_path / "report.html"
    code, _, err = cli("report", str(a), "-o", str(out), "--cache-dir", str(cache))
    assert code == 0, err
    build = api.load(a, cache_dir=cache)
    manifests = {n: api.artifact(build, n).manifest for n in build.graph.nodes}  # type: ignore[union-attr]

    page, problems = open_offline(browser, out)
    drawn = page.evaluate(
        "() => [...document.querySelectorAll('.plotly-graph-div')].map(d => [d.id, d.querySelectorAll('.main-svg').length])"
    )
    assert {d for d, n in drawn if n} == {"chart-steps", "chart-rows", "chart-loss", "chart-metrics"}, drawn

    rows = {t["name"]: t for t in chart(page, "chart-rows")}
    steps = rows["in"]["x"]
    assert steps == [
        "source.a",
        "source.0x",
        "mix",
        "filter.length",
        "filter.profanity",
        "filter.dedup",
        "format",
        "split",
    ]
    for trace in rows.values():
        assert trace["drawn"] == len(steps), "a bar per data step"
    for step, n_in, n_out, rejected in zip(
        steps, rows["in"]["y"], rows["out"]["y"], rows["rejected"]["y"], strict=True
    ):
        m = manifests[step]["rows"]
        assert (n_in, rejected) == (m.get("in"), m.get("rejects", 0)), step
        assert n_out == m.get("rows", m.get("train", 0) + m.get("validation", 0)), step
    # the length filter's bars, recomputed from Alpaca's file (the extra row is short: rejected too)
    i = steps.index("filter.length")
    assert rows["out"]["y"][i] == alpaca_kept_by_length(100)
    assert rows["rejected"]["y"][i] == 999 + 1 - alpaca_kept_by_length(100)

    train = json.loads(api.artifact(build, "train").file("train_result.json").read_text())  # type: ignore[union-attr]
    loss = {t["name"]: t for t in chart(page, "chart-loss")}
    assert loss["training loss"]["y"] == pytest.approx(train["losses"])
    assert loss["validation loss"]["y"] == pytest.approx(train["validation"]["losses"])
    metrics = manifests["eval"]["metrics"]
    text = page.inner_text("body")
    assert f"{metrics['val_loss']:.4g}" in text and f"{metrics['val_loss_stderr']:.4g}" in text
    lo = metrics["val_loss"] - 1.959963984540054 * metrics["val_loss_stderr"]
    assert f"{lo:.4g} to" in text

    assert f"hi {TRAP}" in text, "a rejected row's text is shown as text"
    assert page.title() != "pwned" and page.locator("img").count() == 0
    for g in api.table(build, "eval", "generations").to_pylist():
        assert g["prompt"] in text
    page.screenshot(path=str(shots(tmp_path) / "report.png"), full_page=True)
    assert not problems, problems


@needs_shared_data
def test_two_recipes_report_their_difference(
    built: tuple[Path, Path, Path], cli: Callable[..., tuple[int, str, str]], tmp_path: Path, browser: Any
) -> None:
    a, b, cache = built
    out = tmp_path / "diff.html"
    code, _, err = cli("report", str(a), str(b), "-o", str(out), "--cache-dir", str(cache))
    assert code == 0, err

    page, problems = open_offline(browser, out)
    loss = [t["name"] for t in chart(page, "chart-loss")]
    assert loss == [
        "A: short training loss",
        "A: short validation loss",
        "B: long training loss",
        "B: long validation loss",
    ]
    text = page.inner_text("body")
    # A's rows that B's longer minimum drops, from Alpaca's file (of those A kept to the end)
    outputs = {f"a/{n}": r["output"] for n, r in enumerate(json.loads(ALPACA.read_text()), start=1)}
    kept = {r["id"] for r in api.table(api.load(a, cache_dir=cache), "filter.dedup").to_pylist()}
    removed = sum(100 <= len(outputs[i]) < 150 for i in kept if i in outputs)
    heading = page.locator("h3", has_text="rows in A, not in B")
    assert heading.inner_text().startswith(f"{removed} rows"), "recomputed from Alpaca's file"
    table = heading.locator("xpath=following-sibling::table[1]")
    assert set(table.locator("tbody td:nth-child(2)").all_inner_texts()) == {"filter.length"}
    assert "data.filters[0].min_chars\t100\t150" in text and "val_loss" in text
    assert not problems, problems


def test_a_report_of_an_unbuilt_recipe_is_a_clear_error(
    tmp_path: Path, cli: Callable[..., tuple[int, str, str]]
) -> None:
    r = tmp_path / "r.yaml"
    r.write_text(f"data:\n  sources: [{{name: a, format: alpaca, path: {ALPACA}}}]\n")
    code, _, err = cli("report", str(r), "-o", str(tmp_path / "x.html"))
    assert code == 2 and "runner apply" in err and not (tmp_path / "x.html").exists()
    code, _, err = cli("report", str(r), str(r), str(r))
    assert code == 2 and "one recipe, or two" in err
