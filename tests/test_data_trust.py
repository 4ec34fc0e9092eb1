"""Numbers the data pipeline reports, checked on the real samples in ../shared/data by code written here:
no conversation on both sides of the split, true near-duplicates only, tool schemas carried into the
prompt, empty replies and repeated ids rejected, stable reasons, h2oGPT's exact prompt boundary."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from runner import api
from runner.errors import RecipeError
from runner.steps.reasons import REASONS
from tests.conftest import SHARED_DATA, needs_shared_data, sql_rows, write_jsonl

OASST = SHARED_DATA / "oasst"
INSTRUCT = SHARED_DATA / "instruct"


def parquet(path: Path, rows_sql: str) -> None:
    """A Parquet file of `select * from ROWS_SQL` (a VALUES list with its column names)."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"copy (select * from {rows_sql}) to '{path}' (format parquet)")
    con.close()


def apply(tmp_path: Path, body: str) -> tuple[api.Build, dict[str, Any]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "r.yaml").write_text(body)
    b = api.load(tmp_path / "r.yaml")
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    return b, {s.name: s.artifact.manifest for s in result.steps}


def query(b: api.Build, sql: str) -> list[dict[str, Any]]:
    return api.sql(b, sql).to_pylist()


# -- 1. the split keeps a conversation on one side ---------------------------------------------


def leaf_to_tree(path: Path) -> dict[str, str]:
    """Every message id -> the id of its tree's root, read from the raw export."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        root = rec["prompt"] if "prompt" in rec else rec
        todo = [root]
        while todo:
            m = todo.pop()
            out.setdefault(m["message_id"], root["message_id"])
            todo.extend(m.get("replies") or [])
    return out


@pytest.mark.parametrize(
    "name, extra",
    [
        ("oasst_en_100.trees.jsonl", ""),
        ("oasst2_openpaws_filtered.trees.jsonl", ", tree_states: null, require_review: false"),
    ],
)
@needs_shared_data
def test_split_never_puts_one_tree_on_both_sides(tmp_path: Path, name: str, extra: str) -> None:
    path = OASST / name
    b, manifests = apply(
        tmp_path,
        f"data:\n  sources: [{{name: o, format: oasst, path: {path}{extra}}}]\n  split: {{validation: 0.2, seed: 3}}\n",
    )
    tree = leaf_to_tree(path)
    sides = {
        side: [r["id"].split("/", 1)[1] for r in query(b, f"select id from split__{side}")]
        for side in ("train", "validation")
    }
    trees = {side: {tree[leaf] for leaf in leaves} for side, leaves in sides.items()}
    assert sides["validation"] and sides["train"]
    assert trees["train"] & trees["validation"] == set()
    metrics = manifests["split"]["metrics"]
    assert metrics["leaked_rows"] == 0
    assert metrics["train_groups"] == len(trees["train"]) and metrics["validation_groups"] == len(trees["validation"])
    # the old per-row split, still available, leaks: the manifest says by how much
    b2, m2 = apply(
        tmp_path / "rows",
        f"data:\n  sources: [{{name: o, format: oasst, path: {path}{extra}}}]\n"
        "  split: {validation: 0.2, seed: 3, group_by: row}\n",
    )
    val = {tree[r["id"].split("/", 1)[1]] for r in query(b2, "select id from split__validation")}
    train_rows = [tree[r["id"].split("/", 1)[1]] for r in query(b2, "select id from split__train")]
    val_rows = [tree[r["id"].split("/", 1)[1]] for r in query(b2, "select id from split__validation")]
    leaked = sum(1 for t in train_rows + val_rows if t in val and t in set(train_rows))
    assert m2["split"]["metrics"]["leaked_rows"] == leaked > 0


@needs_shared_data
def test_split_side_depends_only_on_seed_and_group(tmp_path: Path) -> None:
    path = OASST / "oasst_en_100.trees.jsonl"
    body = "data:\n  sources: [{{name: o, format: oasst, path: {p}{limit}}}]\n  split: {{validation: 0.3, seed: 1}}\n"
    full, _ = apply(tmp_path / "full", body.format(p=path, limit=""))
    half, _ = apply(tmp_path / "half", body.format(p=path, limit=", limit: 50"))
    side = lambda b: {r["id"]: s for s in ("train", "validation") for r in query(b, f"select id from split__{s}")}  # noqa: E731
    a, h = side(full), side(half)
    assert h and all(a[i] == s for i, s in h.items())
    # independent: md5 of "seed:group" as DuckDB's md5_number reads it (the low 128 bits, little-endian)
    groups = {r["id"]: r["group_id"] for r in query(full, "select id, group_id from format")}
    for row_id, s in a.items():
        digest = int.from_bytes(hashlib.md5(f"1:{groups[row_id]}".encode()).digest(), "little")
        assert (digest % 1_000_000 < 300_000) == (s == "validation")


@needs_shared_data
def test_split_by_a_table_column(tmp_path: Path) -> None:
    records = json.loads((INSTRUCT / "fastchat_dummy_conversation.sharegpt.json").read_text())
    rows = []
    for rec in records:  # each dialogue becomes one row per reply, sharing the dialogue id
        turns = rec["conversations"]
        for i in range(1, len(turns), 2):
            rows.append({"conv": rec["id"], "q": turns[i - 1]["value"], "a": turns[i]["value"]})
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    b, manifests = apply(
        tmp_path,
        "data:\n  sources: [{name: p, format: jsonl, path: pairs.jsonl, "
        "columns: {prompt: q, response: a}}]\n  split: {validation: 0.3, group_by: conv}\n",
    )
    conv = {f"p/{n}": r["conv"] for n, r in enumerate(rows, start=1)}
    train = {conv[r["id"]] for r in query(b, "select id from split__train")}
    val = {conv[r["id"]] for r in query(b, "select id from split__validation")}
    assert train and val and not train & val
    assert manifests["split"]["metrics"]["validation_groups"] == len(val)
    with pytest.raises(RecipeError, match="no table source"):
        apply(
            tmp_path / "o",
            f"data:\n  sources: [{{name: o, format: oasst, path: {OASST / 'oasst_en_100.trees.jsonl'}}}]\n"
            "  split: {group_by: conv}\n",
        )


# -- 2. near_dedup rejects only true near-duplicates ---------------------------------------------


def shingles(text: str, n: int = 3) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[j : j + n]) for j in range(max(1, len(words) - n + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def lsh_candidate_probability(s: float, threshold: float, num_perm: int) -> float:
    from datasketch.lsh import _optimal_param

    bands, rows = _optimal_param(threshold, num_perm, 0.5, 0.5)
    return 1 - (1 - s**rows) ** bands


@needs_shared_data
def test_near_dedup_on_real_dialogues_matches_brute_force(tmp_path: Path) -> None:
    files = {"f": "fastchat_dummy_conversation.sharegpt.json", "g": "glaive_toolcall_en_demo.sharegpt.json"}
    sources = ", ".join(f"{{name: {n}, format: sharegpt, path: {INSTRUCT / f}}}" for n, f in files.items())
    b, manifests = apply(
        tmp_path,
        f"data:\n  sources: [{sources}, {{name: i, format: alpaca, path: "
        f"{INSTRUCT / 'llamafactory_identity.json'}}}]\n"
        "  filters: [{kind: near_dedup, threshold: 0.8}]\n",
    )
    texts = [(r["id"], r["t"]) for r in query(b, "select id, text_of(turns) t from mix")]  # in the filter's order
    order = {row_id: n for n, (row_id, _) in enumerate(texts)}
    dropped = {r["id"]: r["detail"] for r in query(b, "select id, detail from filter_near_dedup__rejects")}
    assert dropped and set(r["reason"] for r in query(b, "select reason from filter_near_dedup__rejects")) == {
        "near_duplicate"
    }
    sets = {i: shingles(t) for i, t in texts}
    # no reject below the threshold, and each names an earlier kept row with the similarity it states
    for row_id, detail in dropped.items():
        other, stated = detail.removeprefix("of ").split(" (jaccard ")
        true = jaccard(sets[row_id], sets[other])
        assert true >= 0.8 and abs(true - float(stated.rstrip(")"))) < 1e-3
        assert other not in dropped and order[other] < order[row_id]
    assert "f/identity_334" not in dropped or "identity_316" not in dropped["f/identity_334"]
    # misses: kept rows with an earlier kept row above the threshold; LSH's S-curve bounds how many
    kept = [i for i, _ in texts if i not in dropped]
    misses, expected, duplicates = 0, 0.0, 0
    for n, i in enumerate(kept):
        best = max((jaccard(sets[i], sets[k]) for k in kept[:n]), default=0.0)
        if best >= 0.8:
            misses += 1
    for i in dropped:
        best = jaccard(sets[i], sets[dropped[i].removeprefix("of ").split(" (")[0]])
        duplicates += 1
        expected += 1 - lsh_candidate_probability(best, 0.8, 128)
    assert duplicates > 100
    assert misses <= expected + 3 * math.sqrt(max(expected, 1)) + 2, (misses, expected)
    assert manifests["filter.near_dedup"]["rows"]["rejects"] == len(dropped)


@needs_shared_data
def test_near_dedup_keeps_the_pair_the_issue_found(tmp_path: Path) -> None:
    path = INSTRUCT / "fastchat_dummy_conversation.sharegpt.json"
    records = {r["id"]: r for r in json.loads(path.read_text())}
    text = lambda r: "\n".join(t["value"] for t in r["conversations"])  # noqa: E731
    assert jaccard(shingles(text(records["identity_334"])), shingles(text(records["identity_316"]))) < 0.5
    b, _ = apply(
        tmp_path,
        f"data:\n  sources: [{{name: f, format: sharegpt, path: {path}}}]\n"
        "  filters: [{kind: near_dedup, threshold: 0.8}]\n",
    )
    dropped = {r["id"]: r["detail"] for r in query(b, "select id, detail from filter_near_dedup__rejects")}
    assert not dropped.get("f/identity_334", "").startswith("of f/identity_316 ")


@needs_shared_data
def test_near_dedup_signatures_from_workers_are_datasketchs_own() -> None:
    """The worker processes' MinHash values and shingle keys, block by block, are what datasketch and the
    shingles give for each real text in this process (keys: 64 bits of each shingle's SHA-1)."""
    import hashlib

    import numpy as np
    from datasketch import MinHash

    from runner.steps.minhash import signature_blocks

    records = json.loads((INSTRUCT / "alpaca_en_demo.json").read_text())
    texts = [r["output"] for r in records[:400]] + [None, "", "one", "two words", "Ünïcode wörds — ça va  bien"]
    # 3 blocks (the forked workers' path), each of several 64-text runs (the bulk computation's unit)
    blocks = list(signature_blocks(texts, 3, 128, 1, block=150))
    values = np.concatenate([v for v, _, _ in blocks])
    keys = [frozenset(k[b[r] : b[r + 1]].tolist()) for _, k, b in blocks for r in range(len(b) - 1)]
    assert len(values) == len(keys) == len(texts)
    for text, row, key in zip(texts, values, keys, strict=False):
        own = shingles(text or "")
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([s.encode() for s in own])
        assert np.array_equal(row, m.hashvalues)
        assert key == frozenset(
            int.from_bytes(hashlib.sha1(s.encode()).digest()[4:12], "little", signed=True) for s in own
        )


# -- 3. tool schemas reach the prompt -----------------------------------------------------------


@needs_shared_data
def test_tool_schemas_reach_the_prompt(tmp_path: Path) -> None:
    from runner.steps.prompts import TOOLS_LINE

    path = INSTRUCT / "glaive_toolcall_en_demo.sharegpt.json"
    records = json.loads(path.read_text())
    with_tools = sum(1 for r in records if json.loads(r["tools"]))
    assert with_tools == 191
    b, _ = apply(tmp_path, f"data:\n  sources: [{{name: g, format: sharegpt, path: {path}}}]\n")
    got = {r["id"]: r for r in query(b, "select s.id, s.tools, f.prompt from source_g s join format f using (id)")}
    assert sum(1 for r in got.values() if r["tools"]) == 191
    for n, rec in enumerate(records, start=1):
        row = got[f"g/{n}"]
        tools = json.loads(rec["tools"])
        if tools:
            first = row["prompt"].split("\n", 1)[0]
            assert first.startswith(TOOLS_LINE) and json.loads(first.removeprefix(TOOLS_LINE)) == tools
        else:
            assert row["tools"] is None and TOOLS_LINE not in row["prompt"]


@needs_shared_data
def test_tools_go_to_chat_templates(tmp_path: Path) -> None:
    from tests.test_data_steps_ml import make_tokenizer

    path = INSTRUCT / "glaive_toolcall_en_demo.sharegpt.json"
    records = json.loads(path.read_text())[:20]
    (tmp_path / "g.json").write_text(json.dumps(records))
    texts = [t["value"] for r in records for t in r["conversations"]]
    for name, template in (("with", "{% if tools %}<|tools|>{{ tools | tojson }}</s>{% endif %}"), ("without", "")):
        tok = make_tokenizer(tmp_path / name, texts)
        cfg = json.loads((tok / "tokenizer_config.json").read_text())
        chat = tok / "chat_template.jinja"
        base = chat.read_text() if chat.exists() else cfg["chat_template"]
        if chat.exists():
            chat.write_text(template + base)
        else:
            cfg["chat_template"] = template + base
            (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
        b, _ = apply(
            tmp_path / f"r-{name}",
            f"data:\n  sources: [{{name: g, format: sharegpt, path: {tmp_path / 'g.json'}}}]\n"
            f"  prompt: {{template: chat, tokenizer: {tok}}}\n",
        )
        prompts = {r["id"]: r["prompt"] for r in query(b, "select id, prompt from format")}
        for n, rec in enumerate(records, start=1):
            tools = json.loads(rec["tools"])
            if not tools:
                assert "Available tools" not in prompts[f"g/{n}"] and "<|tools|>" not in prompts[f"g/{n}"]
            elif name == "with":
                assert prompts[f"g/{n}"].startswith("<|tools|>") and tools[0]["name"] in prompts[f"g/{n}"]
            else:
                assert prompts[f"g/{n}"].startswith("<|system|>Available tools (JSON schemas): ")


# -- 4-6. empty replies, record ids of rejects, repeated ids ------------------------------------


@needs_shared_data
def test_empty_replies_are_rejected_in_every_format(tmp_path: Path) -> None:
    alpaca = json.loads((INSTRUCT / "alpaca_en_demo.json").read_text())[:40]
    for n in (3, 7, 11):
        alpaca[n]["output"] = "" if n != 7 else "  \n "
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    (tmp_path / "t.csv").write_text("prompt,response\nhello,\n,orphan\nfine,a reply\n")
    trees = [json.loads(line) for line in (OASST / "oasst_en_100.trees.jsonl").read_text().splitlines()]
    trees = [t for t in trees if not t["prompt"].get("synthetic")][:5]
    trees[0]["prompt"]["text"] = " "
    write_jsonl(tmp_path / "o.jsonl", trees)
    b, m = apply(
        tmp_path,
        "data:\n  sources: [{name: a, format: alpaca, path: a.json}, {name: t, format: csv, path: t.csv},"
        " {name: o, format: oasst, path: o.jsonl}]\n",
    )
    a = query(b, "select id, reason from source_a__rejects")
    assert {(r["id"], r["reason"]) for r in a} == {("a/4", "empty_text"), ("a/8", "empty_text"), ("a/12", "empty_text")}
    assert m["source.a"]["rows"] == {"in": 40, "rows": 37, "rejects": 3}
    t = query(b, "select id, reason from source_t__rejects order by id")
    assert [(r["id"], r["reason"]) for r in t] == [("t/1", "empty_text"), ("t/2", "empty_text")]
    root = trees[0]["prompt"]["message_id"]
    o = {r["id"]: r["reason"] for r in query(b, "select id, reason from source_o__rejects")}
    assert o[f"o/{root}"] == "empty_text"
    assert not query(b, f"select id from source_o where group_id = 'o/{root}'")
    for table in ("source_a", "source_t", "source_o"):
        assert not query(
            b,
            f"select id from {table} where list_bool_or(list_transform(turns, "
            "lambda t: t.role in ('user', 'assistant') and trim(t.text) = ''))",
        )


@needs_shared_data
def test_rejects_keep_their_record_id_and_repeated_ids_are_rejects(tmp_path: Path) -> None:
    records = json.loads((INSTRUCT / "fastchat_dummy_conversation.sharegpt.json").read_text())[:30]
    records[4]["conversations"] = records[4]["conversations"][:1]  # no reply left
    records.append(dict(records[2]))  # the same id again
    (tmp_path / "f.json").write_text(json.dumps(records))
    b, m = apply(tmp_path, "data:\n  sources: [{name: f, format: sharegpt, path: f.json}]\n")
    rejects = {r["id"]: r for r in query(b, "select * from source_f__rejects")}
    assert set(rejects) == {f"f/{records[4]['id']}", f"f/{records[2]['id']}"}
    assert rejects[f"f/{records[4]['id']}"]["reason"] == "no_reply"
    assert rejects[f"f/{records[4]['id']}"]["detail"] == "record 5: no assistant reply"
    dup = rejects[f"f/{records[2]['id']}"]
    assert dup["reason"] == "duplicate_id" and dup["detail"] == "record 31 repeats the id of record 3, which is kept"
    assert m["source.f"]["rows"] == {"in": 31, "rows": 29, "rejects": 2}
    trail = api.explain(b, f"f/{records[4]['id']}")
    assert trail == [
        {"step": "source.f", "table": "rejects", "reason": "no_reply", "detail": "record 5: no assistant reply"}
    ]


def test_repeated_ids_in_parquet_are_rejects(tmp_path: Path) -> None:
    parquet(
        tmp_path / "d.parquet",
        "(values ('u1', 'q1', 'a1'), ('u2', 'q2', 'a2'), ('u1', 'q3', 'a3'), ('u3', 'q4', '')) t(uid, q, a)",
    )
    b, m = apply(
        tmp_path,
        "data:\n  sources: [{name: p, format: parquet, path: d.parquet, columns: {prompt: q, response: a, id: uid}}]\n",
    )
    assert m["source.p"]["rows"] == {"in": 4, "rows": 2, "rejects": 2}
    got = [(r["id"], r["reason"]) for r in query(b, "select id, reason from source_p__rejects order by detail")]
    assert got == [("p/u1", "duplicate_id"), ("p/u3", "empty_text")]


@needs_shared_data
def test_parquet_source_keeps_file_order_across_row_groups(tmp_path: Path) -> None:
    """A parquet source without an id column keeps the file and reads its rows from it: over a file of many
    row groups, read in parallel, its rows are still the file's records in order, each as DuckDB wrote it,
    and the empty replies are the rejects."""
    import duckdb
    import pyarrow.parquet as pq

    alpaca = json.loads((INSTRUCT / "alpaca_en_demo.json").read_text())
    records = [
        (f"{r['instruction']} #{k}", "" if (k + n) % 97 == 0 else r["output"])
        for k in range(40)
        for n, r in enumerate(alpaca)
    ]
    con = duckdb.connect()
    con.execute(
        "create table t as select unnest($1::varchar[]) as q, unnest($2::varchar[]) as a",
        [[q for q, _ in records], [a for _, a in records]],
    )
    con.execute(f"copy t to '{tmp_path / 'd.parquet'}' (format parquet, row_group_size 2048)")
    assert pq.ParquetFile(tmp_path / "d.parquet").num_row_groups > 10
    b, m = apply(
        tmp_path, "data:\n  sources: [{name: p, format: parquet, path: d.parquet, columns: {prompt: q, response: a}}]\n"
    )
    rows = [tuple(r.values()) for r in query(b, "select id, turns[1].text, turns[2].text from source_p")]
    expected = [(f"p/{n}", q, a) for n, (q, a) in enumerate(records, start=1) if a.strip()]
    assert rows == expected
    rejects = query(b, "select id from source_p__rejects order by id")
    assert len(rejects) == len(records) - len(expected) > 0
    assert m["source.p"]["rows"] == {"in": len(records), "rows": len(expected), "rejects": len(rejects)}


@needs_shared_data
def test_parquet_source_view_is_the_rows_it_would_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same parquet file through the view of its copy and through rows written out (forced by a low row-group
    limit): the same rows, rejects, counts and filter results, column for column (system, score, lang, group)."""
    import duckdb

    from runner.steps import sources

    alpaca = json.loads((INSTRUCT / "alpaca_en_demo.json").read_text())
    con = duckdb.connect()
    con.execute(
        "create table t as select unnest($1::varchar[]) as q, unnest($2::varchar[]) as a, unnest($3::varchar[]) as sys, "
        "unnest($4::double[]) as s, unnest($5::varchar[]) as lang, unnest($6::bigint[]) as g",
        [
            [None if n % 101 == 0 else r["instruction"] for n, r in enumerate(alpaca)],
            ["  " if n % 89 == 0 else r["output"] for n, r in enumerate(alpaca)],
            ["Be brief." if n % 3 == 0 else "" for n in range(len(alpaca))],
            [(n * 37 % 100) / 100 for n in range(len(alpaca))],
            ["en" if n % 2 else "de" for n in range(len(alpaca))],
            [n // 4 for n in range(len(alpaca))],
        ],
    )
    con.execute(f"copy t to '{tmp_path / 'd.parquet'}' (format parquet, row_group_size 100)")
    recipe = (
        "data:\n  sources: [{name: p, format: parquet, path: d.parquet, columns: "
        "{prompt: q, response: a, system: sys, score: s, lang: lang, group: g}}]\n"
        "  filters: [{kind: length, min_chars: 40}, {kind: sql, where: \"score >= 0.3 and lang = 'en'\"}]\n"
    )
    (tmp_path / "r.yaml").write_text(recipe)
    seen = []
    for limit in (sources.VIEW_ROW_GROUP_LIMIT, 50):  # 50: the file's row groups are "too large" to view
        monkeypatch.setattr(sources, "VIEW_ROW_GROUP_LIMIT", limit)
        b = api.load(tmp_path / "r.yaml", cache_dir=tmp_path / f"cache-{limit}")
        result = api.apply(b)
        assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
        manifest = next(s.artifact.manifest for s in result.steps if s.name == "source.p")
        assert ("rows" in manifest["views"]) == (limit != 50) and ("rows" in manifest["tables"]) == (limit == 50)
        seen.append(
            {
                table: api.sql(b, f"select * from {table}")
                for table in ("source_p", "source_p__rejects", "filter_length", "filter_sql", "filter_sql__rejects")
            }
            | {"rows": [s.artifact.manifest["rows"] for s in result.steps]}
        )
    assert seen[0] == seen[1]
    rows = seen[0]["source_p"].to_pylist()
    kept = [(n, r) for n, r in enumerate(alpaca) if n % 101 and n % 89]  # independent of runner: no empty text
    assert [r["id"] for r in rows] == [f"p/{n + 1}" for n, _ in kept]
    assert [r["group_id"] for r in rows] == [f"p/{n // 4}" for n, _ in kept]
    assert [r["turns"][-1]["text"] for r in rows] == [r["output"] for _, r in kept]
    assert [len(r["turns"]) for r in rows] == [3 if n % 3 == 0 else 2 for n, _ in kept]


# -- 7. reasons are a short, documented list ----------------------------------------------------


@needs_shared_data
def test_reasons_are_stable_categories_with_details(tmp_path: Path) -> None:
    sources = (
        f"[{{name: o, format: oasst, path: {OASST / 'oasst2_openpaws_filtered.trees.jsonl'}}}, "
        f"{{name: a, format: alpaca, path: {INSTRUCT / 'alpaca_en_demo.json'}}}, "
        f"{{name: s, format: sharegpt, path: {INSTRUCT / 'sharegpt_v3_filtered_500_first_turn.json'}}}]"
    )
    filters = (
        "[{kind: clean}, {kind: profanity}, {kind: unhelpful}, {kind: length, min_chars: 20, max_chars: 3000},"
        " {kind: dedup}, {kind: near_dedup}, {kind: quality, min_score: 0.2}, {kind: compression},"
        " {kind: sql, where: \"lang is null or lang in ('en', 'es')\"}]"
    )
    b, manifests = apply(tmp_path, f"data:\n  sources: {sources}\n  filters: {filters}\n")
    total_rejects = 0
    reasons: dict[str, int] = {}
    tables = [
        r["name"]
        for r in query(b, "select table_name name from information_schema.tables where table_name like '%__rejects'")
    ]
    for t in tables:
        for r in query(b, f"select reason, detail from {t}"):
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            total_rejects += 1
    assert set(reasons) <= set(REASONS), set(reasons) - set(REASONS)
    assert total_rejects > 500 and len(reasons) < 20
    assert total_rejects == sum(m["rows"].get("rejects", 0) for m in manifests.values())
    details = {r["detail"] for t in tables for r in query(b, f"select distinct detail from {t}")}
    assert len(details) > 5 * len(reasons)


def test_reason_list_is_documented() -> None:
    from tests.conftest import ROOT

    docs = (ROOT / "docs" / "data.md").read_text()
    for reason in REASONS:
        assert f"`{reason}`" in docs, reason


# -- 8. a directory where a file is expected ---------------------------------------------------


def test_a_directory_for_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".hidden").write_text("{}\n")
    # a parquet source reads one file; a JSONL source reads a directory's files, but an empty one is a mistake
    for fmt, said in (("parquet", "expected a file"), ("jsonl", "is a directory with no files")):
        (tmp_path / "r.yaml").write_text(f"data:\n  sources: [{{name: s, format: {fmt}, path: data}}]\n")
        with pytest.raises(RecipeError) as err:
            api.load(tmp_path / "r.yaml")
        assert "'data' is a directory" in str(err.value) and said in str(err.value)
        assert "not found" not in str(err.value)


# -- 9. h2oGPT's prompt boundary ----------------------------------------------------------------


@needs_shared_data
def test_human_bot_prompt_ends_where_h2ogpt_ends_it(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from runner.steps.prompts import render_prompt

    path = SHARED_DATA / "h2ogpt" / "h2ogpt-personality.json"
    b, _ = apply(tmp_path, f"data:\n  sources: [{{name: p, format: h2ogpt, path: {path}}}]\n")
    rows = query(b, "select f.prompt, f.completion, s.turns from format f join source_p s using (id)")
    assert rows and all(r["prompt"].endswith("<bot>:") and r["completion"].startswith(" ") for r in rows)
    # the prompt a served model gets is the training prompt, character for character
    for r in rows:
        messages = [{"role": t["role"], "content": t["text"]} for t in r["turns"][:-1]]
        assert render_prompt("human_bot", messages) == r["prompt"]
    # h2oGPT's training text is `<human>: Q\n<bot>: A`, then the terminator
    records = json.loads(path.read_text())
    texts = sorted(r["prompt"] + r["completion"] for r in rows)
    expected = []
    for rec in records:
        q, a = rec["input"].split("<bot>:")
        expected.append(f"<human>: {q.removeprefix('<human>:').strip()}\n<bot>: {a.strip()}\n<human>:")
    assert texts == sorted(expected)
    # tokenized apart (as training does) or together (as the text is), the tokens agree at the boundary
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [r["prompt"] + r["completion"] for r in rows],
        trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    for r in rows:
        apart = tok.encode(r["prompt"]).ids + tok.encode(r["completion"]).ids
        assert apart == tok.encode(r["prompt"] + r["completion"]).ids


@needs_shared_data
@pytest.mark.parametrize("template", ["human_bot", "plain"])
def test_packaged_chat_template_prompts_as_training_did(tmp_path: Path, template: str) -> None:
    """The chat template saved beside packaged models renders each real multi-turn OpenAssistant prompt exactly as
    the format step wrote it for training."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from runner.steps.prompts import CHAT_TEMPLATES

    b, _ = apply(
        tmp_path,
        f"data:\n  sources: [{{name: o, format: oasst, path: {OASST / 'oasst_en_100.trees.jsonl'}}}]\n"
        f"  prompt: {{template: {template}}}\n",
    )
    rows = query(b, "select f.prompt, s.turns from format f join source_o s using (id)")
    assert len(rows) > 100 and sum(len(r["turns"]) > 2 for r in rows) > 50
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    tok.chat_template = CHAT_TEMPLATES[template]
    for r in rows:
        messages = [{"role": t["role"], "content": t["text"]} for t in r["turns"][:-1]]
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == r["prompt"]


def test_a_parquet_column_name_with_a_quote_is_read_and_named_in_rejects(tmp_path: Path) -> None:
    """Column names reach the SQL quoted, in the rows and in a reject's detail alike."""
    parquet(tmp_path / "d.parquet", "(values ('hi', 'hello there'), (null, 'x'), ('q', 'answer')) t(\"it's\", a)")
    b, _ = apply(
        tmp_path,
        'data:\n  sources: [{name: p, format: parquet, path: d.parquet, columns: {prompt: "it\'s", response: a}}]\n',
    )
    assert sql_rows(b, "select reason, detail from source_p__rejects") == [
        ("missing_field", "record 2: missing field it's")
    ]
    assert [r[0] for r in sql_rows(b, "select prompt_of(turns) from source_p")] == ["hi", "q"]
