"""A corpus of malformed recipes: each gives exit 2 and one paragraph naming file:line, never a traceback."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import run_subprocess

OK_SOURCES = "data:\n  sources:\n    - name: s\n      format: jsonl\n      path: rows.jsonl\n"


def with_filter(body: str) -> str:
    return OK_SOURCES + "  filters:\n" + body


# (case id, recipe text or bytes, --set overrides, substring the message must contain)
CASES: list[tuple[str, str | bytes, list[str], str]] = [
    # YAML itself
    ("tab-indent", "data:\n\tsources: []\n", [], "invalid YAML"),
    ("unclosed-bracket", "data: {sources: [\n", [], "invalid YAML"),
    ("empty-file", "", [], "empty"),
    ("top-level-list", "- a\n- b\n", [], "top level must be a mapping"),
    ("top-level-scalar", "hello\n", [], "top level must be a mapping"),
    ("duplicate-key", OK_SOURCES + "data: {}\n", [], "duplicate key"),
    ("non-string-key", "1: x\n" + OK_SOURCES, [], "keys must be plain strings"),
    ("bad-utf8", b"data:\n  sources: \xff\xfe\n", [], "not UTF-8"),
    ("unclosed-quote", 'name: "abc\n' + OK_SOURCES, [], "invalid YAML"),
    ("mapping-in-scalar", "name: a: b\n" + OK_SOURCES, [], "invalid YAML"),
    ("undefined-alias", "name: *nope\n" + OK_SOURCES, [], "invalid YAML"),
    # schema: top level and sources
    ("unknown-top-key", "datta: 1\n" + OK_SOURCES, [], "unknown key 'datta'"),
    ("missing-data", "name: x\n", [], "a recipe needs data: (to train) and/or index:"),
    ("no-sources", "data:\n  sources: []\n", [], "at least 1"),
    ("sources-not-list", "data:\n  sources: rows.jsonl\n", [], "expected a list"),
    ("source-no-name", "data:\n  sources:\n    - format: jsonl\n      path: rows.jsonl\n", [], "'name'"),
    ("source-no-path", "data:\n  sources:\n    - name: s\n      format: jsonl\n", [], "'path'"),
    ("source-bad-format", OK_SOURCES.replace("jsonl\n", "xml\n"), [], "'xml'"),
    ("source-bad-name", OK_SOURCES.replace("name: s", "name: my source"), [], "pattern"),
    ("source-unknown-key", OK_SOURCES + "      pth: x\n", [], "did you mean 'path'"),
    ("source-limit-zero", OK_SOURCES + "      limit: 0\n", [], "greater than or equal to 1"),
    ("source-limit-text", OK_SOURCES + "      limit: ten\n", [], "expected an integer"),
    ("columns-unknown", OK_SOURCES + "      columns: {question: q}\n", [], "unknown key 'question'"),
    ("columns-not-text", OK_SOURCES + "      columns: {prompt: 5}\n", [], "expected text"),
    (
        "duplicate-source-names",
        OK_SOURCES + "    - name: s\n      format: jsonl\n      path: rows.jsonl\n",
        [],
        "unique",
    ),
    # filters
    ("filter-unknown-kind", with_filter("    - kind: magic\n"), [], "'magic'"),
    ("filter-missing-kind", with_filter("    - min_chars: 3\n"), [], "kind"),
    ("length-no-bounds", with_filter("    - kind: length\n"), [], "at least one of"),
    ("length-negative", with_filter("    - kind: length\n      min_chars: -1\n"), [], "greater than or equal to 0"),
    ("length-text", with_filter("    - kind: length\n      min_chars: abc\n"), [], "expected an integer"),
    ("length-bad-field", with_filter("    - kind: length\n      field: body\n      min_chars: 1\n"), [], "'body'"),
    ("sql-empty-where", with_filter("    - kind: sql\n      where: ''\n"), [], "at least 1 character"),
    ("sql-missing-where", with_filter("    - kind: sql\n"), [], "'where'"),
    ("dedup-bad-bool", with_filter("    - kind: dedup\n      normalize: maybe\n"), [], "true or false"),
    ("regex-no-pattern", with_filter("    - kind: regex\n"), [], "'pattern'"),
    ("sample-zero", with_filter("    - kind: sample\n      n: 0\n"), [], "greater than or equal to 1"),
    ("filters-mapping", OK_SOURCES + "  filters:\n    kind: dedup\n", [], "expected a list"),
    ("filter-bad-name", with_filter("    - kind: dedup\n      name: a b\n"), [], "pattern"),
    (
        "filter-names-clash",
        with_filter("    - kind: dedup\n      name: x\n    - kind: dedup\n      name: x\n"),
        [],
        "two steps are named",
    ),
    # prompt, split, top-level values
    ("prompt-bad-template", OK_SOURCES + "  prompt:\n    template: chatml2\n", [], "'chatml2'"),
    ("chat-without-a-model", OK_SOURCES + "  prompt: {template: chat}\n", [], "name a base model (model.base)"),
    (
        "chat-with-a-trained-tokenizer",
        OK_SOURCES
        + "  prompt: {template: chat}\nmodel:\n  base: {from_config: {architecture: llama}}\n"
        + "  tokenizer: {train: {vocab_size: 300}}\n",
        [],
        "a tokenizer trained on the recipe's text has none",
    ),
    ("tokenizer-without-chat", OK_SOURCES + "  prompt: {template: plain, tokenizer: x}\n", [], "only template: chat"),
    ("split-too-big", OK_SOURCES + "  split:\n    validation: 1.5\n", [], "less than 1"),
    ("split-text", OK_SOURCES + "  split:\n    validation: half\n", [], "expected a number"),
    ("split-seed-float", OK_SOURCES + "  split:\n    seed: 1.5\n", [], "integer"),
    ("recipe-bad-name", "name: my recipe!\n" + OK_SOURCES, [], "pattern"),
    ("vars-list", "vars: [1, 2]\n" + OK_SOURCES, [], "expected a mapping"),
    # files
    ("missing-data-file", OK_SOURCES.replace("rows.jsonl", "nope.jsonl"), [], "not found"),
    ("data-path-is-dir", OK_SOURCES.replace("rows.jsonl", ".").replace("jsonl", "parquet"), [], "is a directory"),
    ("extends-missing", "extends: nope.yaml\n" + OK_SOURCES, [], "not found"),
    ("extends-self", "extends: bad.yaml\n" + OK_SOURCES, [], "cycle"),
    ("extends-cycle", "extends: other.yaml\n" + OK_SOURCES, [], "cycle"),
    ("extends-number", "extends: 5\n" + OK_SOURCES, [], "expected a recipe path"),
    # interpolation
    ("interp-missing", "name: ${vars.nope}\n" + OK_SOURCES, [], "does not exist"),
    ("interp-cycle", "vars:\n  a: ${vars.b}\n  b: ${vars.a}\n" + OK_SOURCES, [], "cycle"),
    ("interp-mapping-in-text", "vars:\n  m: {x: 1}\nname: a${vars.m}\n" + OK_SOURCES, [], "only scalars"),
    # --set
    ("set-no-equals", OK_SOURCES, ["data.split.seed"], "KEY.PATH=VALUE"),
    ("set-bad-yaml", OK_SOURCES, ["data.split.seed=[1"], "not valid YAML"),
    ("set-index-range", OK_SOURCES, ["data.sources.5.limit=1"], "list of 1 items"),
    ("set-unknown-key", OK_SOURCES, ["data.nope=1"], "unknown key 'nope'"),
    ("set-wrong-type", OK_SOURCES, ["data.split.validation=abc"], "expected a number"),
    ("set-into-scalar", "name: x\n" + OK_SOURCES, ["name.y=1"], "cannot set inside"),
    ("set-empty-segment", OK_SOURCES, ["data..x=1"], "empty segment"),
    ("set-missing-file", OK_SOURCES, ["data.sources.0.path=gone.jsonl"], "not found"),
    # extends as a list
    ("extends-list-missing", "extends: [gone.yaml]\n" + OK_SOURCES, [], "base recipe 'gone.yaml' not found"),
    ("extends-list-of-numbers", "extends: [1, 2]\n" + OK_SOURCES, [], "expected a recipe path"),
    # hostile recipes: bounded in time and memory, one clear message
    (
        "yaml-billion-laughs",
        "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['x'] * 9)}]\n" for i in range(8))
        + OK_SOURCES,
        [],
        "more than 100,000 values",
    ),
    ("yaml-recursive-alias", "vars: {a: &a [*a]}\n" + OK_SOURCES, [], "refers to a value that contains it"),
    ("yaml-recursive-mapping", "vars: &v {self: *v}\n" + OK_SOURCES, [], "refers to a value that contains it"),
    ("yaml-deep-nesting", "vars: {x: " + "[" * 600 + "]" * 600 + "}\n" + OK_SOURCES, [], "nested too deeply"),
    ("yaml-huge-integer", "vars: {n: " + "9" * 5000 + "}\n" + OK_SOURCES, [], "invalid value"),
    ("set-huge-integer", OK_SOURCES, ["data.split.seed=" + "9" * 5000], "not valid YAML"),
    (
        "interp-doubling",
        "vars:\n  v0: ab\n"
        + "".join(f"  v{i}: ${{vars.v{i - 1}}}${{vars.v{i - 1}}}\n" for i in range(1, 27))
        + OK_SOURCES,
        [],
        "interpolation makes a string",
    ),
    (
        "recipe-too-big",
        OK_SOURCES + "vars:\n" + "".join(f"  k{i}: {'x' * 80}\n" for i in range(130_000)),
        [],
        "a recipe over 1,000,000 bytes",
    ),
]

LOCATION = re.compile(r"(bad|other)\.yaml:\d+|--set ")


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 50
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("text", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_recipe(
    tmp_path: Path, cli, text: str | bytes, overrides: list[str], expected: str, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "other.yaml").write_text("extends: bad.yaml\n" + OK_SOURCES)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = ["validate", str(bad.name)] + [x for o in overrides for x in ("--set", o)]
    started = time.perf_counter()
    code, out, err = cli(*args)
    assert time.perf_counter() - started < 5, "bounded: a hostile recipe is refused quickly"
    assert code == 2, err
    assert err.startswith("error: ")
    assert "Traceback" not in err and "Traceback" not in out
    assert "\n\n" not in err.strip(), "one paragraph"
    assert LOCATION.search(err), f"no file:line in {err!r}"
    assert expected in err, err


def test_recipe_file_missing(cli) -> None:
    code, _, err = cli("validate", "definitely-missing.yaml")
    assert code == 2 and "definitely-missing.yaml" in err and "not found" in err


def test_exit_code_and_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(with_filter("    - kind: length\n      min_chars: abc\n"))
    (tmp_path / "rows.jsonl").write_text("{}\n")
    proc = run_subprocess("plan", str(tmp_path / "bad.yaml"), cache=tmp_path / "c")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.search(r"bad\.yaml:8: data\.filters\[0\]\.min_chars: expected an integer, got 'abc'", proc.stderr)
