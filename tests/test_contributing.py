"""CONTRIBUTING.md's recipes, followed as a contributor would: its steps, in its files, with nothing else."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pytest

from runner import api, docs, registry
from runner.cli.main import build_parser
from runner.errors import RecipeError
from runner.steps import reasons
from runner.steps.filter_base import FilterBase, filter_kind
from runner.steps.reasons import rejected
from stores.sql import sql_string
from tests.conftest import ROOT, sql_rows, write_jsonl


def test_contributing_names_files_that_exist() -> None:
    """Every repository path CONTRIBUTING.md tells a contributor to touch is there."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    paths = set(re.findall(r"`((?:runner|stores|tests)/[\w/.]+\.py)", text))
    assert len(paths) > 15
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []


def test_a_new_filter_as_contributing_says(tmp_path: Path) -> None:
    """ "A filter kind": the class with `@filter_kind()`, `kind` and `reject_sql`; a new reason code in REASONS
    (refused until it is there); the generated lists then name it, so the docs test would fail until
    `runner reference --update` is run; the recipe accepts the kind and its step keeps exactly the rows a few
    lines of Python keep. Taken out again, the recipe refuses it."""
    with pytest.raises(AssertionError, match="add it to REASONS"):
        rejected("has_digit")

    reasons.REASONS["has_digit"] = "the reply holds a digit"  # step 2

    @filter_kind()  # step 1
    class NoDigitsFilter(FilterBase):
        """Drop rows whose reply holds a digit."""

        kind: Literal["no_digits"]

        def reject_sql(self) -> str:
            digit = "regexp_extract(response_of(turns), '[0-9]')"
            return f"case when {digit} <> '' then {rejected('has_digit', sql_string('a digit: ') + ' || ' + digit)} end"

    try:
        # step 3: every generated list names the kind and its reason; the committed docs do not
        for doc in ("README.md", "docs/data.md"):
            text = (ROOT / doc).read_text()
            assert "no_digits" not in text and "no_digits" in docs.update_markers(text, build_parser()), doc
        assert "| `no_digits` | Drop rows whose reply holds a digit. |" in docs.filter_kinds()
        assert "| `has_digit` | the reply holds a digit |" in docs.reject_reasons()

        # step 4: the step on rows, checked by independent Python
        replies = ["forty-two", "42", "seven", "it is 7 o'clock", "none at all", "R2-D2", "", "nine"]
        rows = [{"prompt": f"question {i}", "response": r} for i, r in enumerate(replies)]
        write_jsonl(tmp_path / "rows.jsonl", rows)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            "data:\n  sources: [{name: s, format: jsonl, path: rows.jsonl}]\n  filters: [{kind: no_digits}]\n"
        )
        result = api.apply(api.load(recipe))
        assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
        b = api.load(recipe)
        read = {f"s/{n}" for n, r in enumerate(replies, start=1) if r.strip()}  # an empty reply is the source's reject
        expected = {i for i in read if not re.search("[0-9]", replies[int(i[2:]) - 1])}
        assert {r[0] for r in sql_rows(b, "select id from filter_no_digits")} == expected
        dropped = dict(sql_rows(b, "select id, detail from filter_no_digits__rejects where reason = 'has_digit'"))
        assert dropped == {"s/2": "a digit: 4", "s/4": "a digit: 7", "s/6": "a digit: 2"}
        counts = next(s.artifact.manifest["rows"] for s in result.steps if s.name == "filter.no_digits")
        assert counts["in"] == len(read) == counts["rows"] + counts["rejects"]
    finally:
        registry.remove_entry("filter", NoDigitsFilter)
        del reasons.REASONS["has_digit"]
    with pytest.raises(RecipeError, match="no_digits"):
        api.load(recipe)
    assert "no_digits" not in docs.filter_kinds()
