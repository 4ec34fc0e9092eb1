"""Filters on real data, each result checked by independent Python written here; `in = out + rejected` everywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from runner import api
from runner.steps.filters import UNHELPFUL
from tests.conftest import SHARED_DATA, needs_shared_data, sql_rows, write_jsonl

ALPACA = SHARED_DATA / "instruct" / "alpaca_en_demo.json"


def alpaca_records() -> list[tuple[str, str, str]]:
    """(row id, prompt, response) as the alpaca source builds them, computed independently."""
    out = []
    for n, r in enumerate(json.loads(ALPACA.read_text()), start=1):
        prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"].strip() else "")
        out.append((f"a/{n}", prompt, r["output"]))
    return out


def run(tmp_path: Path, filters: str, source: str | None = None) -> tuple[api.Build, dict[str, dict[str, int]]]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data:\n  sources: [{source or f'{{name: a, format: alpaca, path: {ALPACA}}}'}]\n  filters: {filters}\n"
    )
    b = api.load(recipe)
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    counts = {s.name: s.artifact.manifest["rows"] for s in result.steps}
    for name, c in counts.items():  # the invariant, for every data step
        c = dict(c)
        n_in = c.pop("in")
        used = c.pop("messages_used", None) or c.pop("rows_used", None)
        if name == "split":
            assert n_in == c["train"] + c["validation"]
        else:
            assert n_in == (used if used is not None else c["rows"]) + c["rejects"], (name, c)
    return b, counts


def kept_ids(b: api.Build, view: str) -> set[str]:
    return {r[0] for r in sql_rows(b, f"select id from {view}")}


@needs_shared_data
def test_length_bounds(tmp_path: Path) -> None:
    b, counts = run(tmp_path, "[{kind: length, field: response, min_chars: 100, max_words: 120}]")
    expected = {i for i, _, r in alpaca_records() if len(r) >= 100 and len(r.split()) <= 120}
    assert kept_ids(b, "filter_length") == expected
    assert counts["filter.length"]["rejects"] == 999 - len(expected)


@needs_shared_data
def test_profanity_with_a_shared_word_list(tmp_path: Path) -> None:
    words_file = SHARED_DATA / "profanity" / "ldnoobw_en.txt"
    b, _ = run(tmp_path, f"[{{kind: profanity, default_list: false, words_file: {words_file}}}]")
    words = [w.strip().lower() for w in words_file.read_text().splitlines() if w.strip()]
    pattern = re.compile(
        r"(?<![^\W_])(?:" + "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words) + r")(?![^\W_])", re.IGNORECASE
    )
    dropped = {i for i, p, r in alpaca_records() if pattern.search(p + "\n" + r)}
    assert dropped, "the real data has some"
    assert kept_ids(b, "filter_profanity") == {i for i, _, _ in alpaca_records()} - dropped


@needs_shared_data
def test_default_profanity_list_and_extra_words(tmp_path: Path) -> None:
    b, _ = run(tmp_path, "[{kind: profanity, extra_words: [photosynthesis]}]")
    reasons = set(sql_rows(b, "select reason, detail from filter_profanity__rejects"))
    assert ("profanity", "photosynthesis") in reasons


@needs_shared_data
def test_unhelpful_and_dedup_and_sql(tmp_path: Path) -> None:
    b, _ = run(
        tmp_path,
        "[{kind: unhelpful, extra_phrases: ['I am sorry']}, {kind: dedup, field: prompt},"
        ' {kind: sql, where: "length(response_of(turns)) % 2 = 0"}]',
    )
    phrases = [p.lower() for p in [*UNHELPFUL, "I am sorry"]]
    recs = [r for r in alpaca_records() if not any(p in r[2].lower() for p in phrases)]
    seen: set[str] = set()
    deduped = []
    for i, p, r in recs:
        key = re.sub(r"\s+", " ", p.strip().lower())
        if key not in seen:
            seen.add(key)
            deduped.append((i, p, r))
    assert kept_ids(b, "filter_unhelpful") == {i for i, _, _ in recs}
    assert kept_ids(b, "filter_dedup") == {i for i, _, _ in deduped}
    assert kept_ids(b, "filter_sql") == {i for i, _, r in deduped if len(r) % 2 == 0}


@needs_shared_data
def test_quality_from_oasst_labels(tmp_path: Path) -> None:
    path = SHARED_DATA / "oasst" / "oasst2_openpaws_filtered.trees.jsonl"
    source = f"{{name: o, format: oasst, path: {path}, tree_states: null, require_review: false}}"
    b, _ = run(tmp_path, "[{kind: quality, min_score: 0.6, missing: drop}]", source)
    scored = sql_rows(b, "select id, score from source_o")
    expected = {i for i, s in scored if s is not None and s >= 0.6}
    assert 0 < len(expected) < len(scored)
    assert kept_ids(b, "filter_quality") == expected


@needs_shared_data
def test_regex_sample_limit_truncate(tmp_path: Path) -> None:
    b, counts = run(
        tmp_path,
        "[{kind: regex, pattern: '(?i)\\bpython\\b', field: text, action: drop},"
        " {kind: truncate, max_chars: 50, roles: [assistant]}, {kind: sample, n: 300, seed: 3},"
        " {kind: limit, n: 100}]",
    )
    kept = {i for i, p, r in alpaca_records() if not re.search(r"(?i)\bpython\b", p + "\n" + r)}
    assert kept_ids(b, "filter_regex") == kept
    lengths = sql_rows(b, "select max(length(response_of(turns))), max(length(prompt_of(turns))) from filter_truncate")[
        0
    ]
    assert lengths[0] <= 50 and lengths[1] > 50
    assert counts["filter.sample"]["rows"] == 300 and counts["filter.limit"]["rows"] == 100
    # the sample is stable: same seed, same rows
    (tmp_path / "again").mkdir()
    b2, _ = run(
        tmp_path / "again",
        "[{kind: regex, pattern: '(?i)\\bpython\\b', field: text, action: drop},"
        " {kind: truncate, max_chars: 50, roles: [assistant]}, {kind: sample, n: 300, seed: 3}, {kind: limit, n: 100}]",
    )
    assert kept_ids(b2, "filter_sample") == kept_ids(b, "filter_sample")


@needs_shared_data
def test_near_dedup_finds_edited_copies(tmp_path: Path) -> None:
    base = [r for _, _, r in alpaca_records() if len(r.split()) > 40][:50]
    rows: list[dict[str, Any]] = [{"prompt": f"q{i}", "response": t} for i, t in enumerate(base)]
    rows += [{"prompt": f"copy{i}", "response": t.replace(".", "!", 1)} for i, t in enumerate(base[:10])]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    b, _counts = run(
        tmp_path,
        "[{kind: near_dedup, field: response, threshold: 0.7}]",
        f"{{name: s, format: jsonl, path: {tmp_path / 'rows.jsonl'}}}",
    )
    dropped = dict(sql_rows(b, "select id, detail from filter_near_dedup__rejects"))
    assert set(dropped) >= {f"s/{51 + i}" for i in range(10)}
    assert dropped["s/51"].startswith("of s/1 (jaccard 0.")


@needs_shared_data
def test_compression_drops_repetitive_text(tmp_path: Path) -> None:
    rows = [{"prompt": "laugh", "response": "ha " * 200}, {"prompt": "explain", "response": alpaca_records()[5][2] * 1}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    b, _ = run(
        tmp_path,
        "[{kind: compression, field: response, min_ratio: 0.2, min_bytes: 10}]",
        f"{{name: s, format: jsonl, path: {tmp_path / 'rows.jsonl'}}}",
    )
    assert kept_ids(b, "filter_compression") == {"s/2"}


def test_language_identification(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Where is the station?", "response": "The station is two streets north of the market."},
        {"prompt": "¿Dónde está la estación?", "response": "La estación está a dos calles al norte del mercado."},
        {"prompt": "Wo ist der Bahnhof?", "response": "Der Bahnhof ist zwei Straßen nördlich vom Markt."},
    ]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    b, _ = run(
        tmp_path, "[{kind: language, keep: [en, es]}]", f"{{name: s, format: jsonl, path: {tmp_path / 'rows.jsonl'}}}"
    )
    assert kept_ids(b, "filter_language") == {"s/1", "s/2"}
    assert sql_rows(b, "select reason, detail from filter_language__rejects") == [
        ("language", "language de not in [en, es]")
    ]


@needs_shared_data
def test_dedup_normalisation_is_the_regex_it_stands_for(tmp_path: Path) -> None:
    """dedup's key text is `regexp_replace(lower(trim(x)), '\\s+', ' ', 'g')`, computed without the regex for
    speed: the same string for real prompts and for random mixes of every kind of white space; and dedup of
    real prompts given white-space/case variants keeps exactly the first of each (checked in Python)."""
    import random

    import duckdb

    from runner.steps.filters import normalise_sql

    rng = random.Random(7)
    alphabet = ["a", "B", "é", " ", "  ", "\t", "\n", "\r", "\f", "\v", "\u00a0", "\u2003", "\u3000", "\r\n"]
    prompts = [p for _, p, _ in alpaca_records()]
    texts = prompts + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    texts += [" \t " + p.replace(" ", "  \n ", 3) + "\f " for p in prompts[:200]]
    con = duckdb.connect()
    con.execute("create table t as select unnest($1::varchar[]) as x", [texts])
    old, new = "regexp_replace(lower(trim(x)), '\\s+', ' ', 'g')", normalise_sql("x")
    assert con.execute(f"select count(*) from t where {old} is distinct from {new}").fetchall() == [(0,)]
    assert con.execute(f"select count(*) from t where {new} <> x").fetchall()[0][0] > 5000  # it does change text

    # dedup of variants of real prompts: only the ASCII white space RE2 calls \s collapses, ends lose spaces
    variants = [(" " + p.upper() + "  ", p.replace(" ", "\t\n "), p.replace(" ", "\v")) for p in prompts[:150]]
    records = [{"prompt": v, "response": f"reply {i}-{j}"} for i, vs in enumerate(variants) for j, v in enumerate(vs)]
    write_jsonl(tmp_path / "v.jsonl", records)
    b, counts = run(tmp_path, "[{kind: dedup, field: prompt}]", "{name: v, format: jsonl, path: v.jsonl}")
    seen: set[str] = set()
    expected = set()
    for n, r in enumerate(records, start=1):
        key = re.sub(r"[\t\n\f\r ]+", " ", r["prompt"].strip(" ").lower())
        if key not in seen:
            seen.add(key)
            expected.add(f"v/{n}")
    assert kept_ids(b, "filter_dedup") == expected
    assert counts["filter.dedup"]["rejects"] == len(records) - len(expected) >= 140
