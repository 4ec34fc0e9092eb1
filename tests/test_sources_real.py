"""Sources on the real files in ../shared/data, each count checked by independent code written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner import api
from tests.conftest import SHARED_DATA, needs_shared_data

OASST = SHARED_DATA / "oasst"


def build(tmp_path: Path, sources: str, filters: str = "[]") -> tuple[api.Build, dict[str, Any]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  sources: {sources}\n  filters: {filters}\n")
    b = api.load(recipe)
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    return b, {s.name: s.artifact.manifest["rows"] for s in result.steps}


def rows(b: api.Build, query: str) -> list[dict[str, Any]]:
    return api.sql(b, query).to_pylist()


def read_trees(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append((rec["prompt"], rec.get("tree_state")) if "prompt" in rec else (rec, None))
    return out


def count_messages(m: dict[str, Any]) -> int:
    return 1 + sum(count_messages(c) for c in m.get("replies") or [])


def expected_conversations(path: Path, keep, top: bool = False) -> tuple[set[str], set[str]]:
    """(leaf ids of the conversations, ids of the messages they use), written independently of the source."""
    leaves: set[str] = set()
    used: set[str] = set()
    seen: set[str] = set()
    for root, state in read_trees(path):
        if root["message_id"] in seen or root["role"] != "prompter":
            continue
        seen.add(root["message_id"])

        def walk(m: dict[str, Any], path: list[dict[str, Any]]) -> None:
            path = [*path, m]
            kids = [c for c in m.get("replies") or [] if keep(c, state)]  # noqa: B023 (called at once)
            if top and m["role"] == "prompter" and kids:
                best = min(c.get("rank") if c.get("rank") is not None else 99 for c in kids)
                kids = [next(c for c in kids if (c.get("rank") if c.get("rank") is not None else 99) == best)]
            if not kids:
                while path and path[-1]["role"] != "assistant":
                    path = path[:-1]
                if path:
                    leaves.add(path[-1]["message_id"])
                    used.update(x["message_id"] for x in path)
            for c in kids:
                walk(c, path)

        if keep(root, state):
            walk(root, [])
    return leaves, used


def default_keep(m: dict[str, Any], state: str | None) -> bool:
    return (
        state in (None, "ready_for_export")
        and not m.get("deleted")
        and m.get("review_result") is True
        and not m.get("synthetic")
    )


@needs_shared_data
def test_oasst_en100_trees_all_paths(tmp_path: Path) -> None:
    path = OASST / "oasst_en_100.trees.jsonl"
    b, counts = build(tmp_path, f"[{{name: o, format: oasst, path: {path}}}]")
    leaves, used = expected_conversations(path, default_keep)
    total = sum(count_messages(r) for r, _ in read_trees(path))
    assert total == 1167
    got = rows(b, "select id, turns from source_o")
    assert {r["id"] for r in got} == {f"o/{leaf}" for leaf in leaves}
    assert counts["source.o"] == {
        "in": 1167,
        "rows": len(leaves),
        "messages_used": len(used),
        "rejects": 1167 - len(used),
    }
    # synthetic trees are rejected: each root as synthetic, the messages below as its children
    trees = [r for r, _ in read_trees(path) if r.get("synthetic")]
    reasons = rows(b, "select reason, detail, count(*) n from source_o__rejects group by all")
    by_reason = {(r["reason"], r["detail"]): r["n"] for r in reasons}
    assert by_reason[("synthetic", "model_name chip20b")] == len(trees) == 5
    assert (
        by_reason[("parent_dropped", "synthetic: model_name chip20b")]
        == sum(count_messages(r) - 1 for r in trees)
        == 17
    )
    assert all(r["turns"][-1]["role"] == "assistant" and r["turns"][0]["role"] == "user" for r in got)


@needs_shared_data
def test_oasst_nested_messages_export_gives_the_same_conversations(tmp_path: Path) -> None:
    a, _ = build(tmp_path / "a", f"[{{name: o, format: oasst, path: {OASST / 'oasst_en_100.trees.jsonl'}}}]")
    b, _ = build(tmp_path / "b", f"[{{name: o, format: oasst, path: {OASST / 'oasst_en_100.messages_nested.jsonl'}}}]")
    q = "select id, turns from source_o order by id"
    assert rows(a, q) == rows(b, q)


@needs_shared_data
def test_oasst_flat_message_list_gives_the_same_conversations(tmp_path: Path) -> None:
    flat = tmp_path / "flat.jsonl"
    with open(flat, "w") as f:
        for root, state in read_trees(OASST / "oasst_en_100.trees.jsonl"):
            todo = [root]
            while todo:
                m = todo.pop()
                todo.extend(m.get("replies") or [])
                f.write(json.dumps({k: v for k, v in m.items() if k != "replies"} | {"tree_state": state}) + "\n")
    a, _ = build(tmp_path / "a", f"[{{name: o, format: oasst, path: {OASST / 'oasst_en_100.trees.jsonl'}}}]")
    b, counts = build(tmp_path / "b", f"[{{name: o, format: oasst, path: {flat}}}]")
    q = "select id, turns from source_o order by id"
    assert rows(a, q) == rows(b, q)
    assert counts["source.o"]["in"] == 1167


@needs_shared_data
def test_oasst_top_ranked_mode(tmp_path: Path) -> None:
    path = OASST / "oasst_en_100.trees.jsonl"
    b, counts = build(tmp_path, f"[{{name: o, format: oasst, path: {path}, mode: top}}]")
    leaves, used = expected_conversations(path, default_keep, top=True)
    assert {r["id"] for r in rows(b, "select id from source_o")} == {f"o/{leaf}" for leaf in leaves}
    assert counts["source.o"]["messages_used"] == len(used)
    n_not_top = rows(
        b, "select count(*) n from source_o__rejects where reason = 'rank' and detail like 'not the top-ranked%'"
    )[0]["n"]
    assert n_not_top > 0


@needs_shared_data
def test_oasst2_deleted_languages_states_and_repeated_trees(tmp_path: Path) -> None:
    path = OASST / "oasst2_openpaws_filtered.trees.jsonl"
    b, counts = build(tmp_path, f"[{{name: o, format: oasst, path: {path}, tree_states: null, require_review: false}}]")

    def keep(m: dict[str, Any], state: str | None) -> bool:
        return not m.get("deleted") and not m.get("synthetic")

    leaves, used = expected_conversations(path, keep)
    trees = read_trees(path)
    total = sum(count_messages(r) for r, _ in trees)
    assert total == 1552
    assert counts["source.o"] == {
        "in": 1552,
        "rows": len(leaves),
        "messages_used": len(used),
        "rejects": 1552 - len(used),
    }
    # deleted messages in first copies of trees, whose ancestors are all kept
    first: dict[str, dict[str, Any]] = {}
    for root, _ in trees:
        first.setdefault(root["message_id"], root)

    def deleted_roots(m: dict[str, Any]) -> int:
        if m.get("deleted"):
            return 1
        return sum(deleted_roots(c) for c in m.get("replies") or [])

    expected_deleted = sum(deleted_roots(r) for r in first.values())
    got = rows(b, "select count(*) n from source_o__rejects where reason = 'deleted'")[0]["n"]
    assert got == expected_deleted > 0
    repeated = sum(count_messages(r) for r, _ in trees) - sum(count_messages(r) for r in first.values())
    got = rows(b, "select count(*) n from source_o__rejects where reason = 'duplicate_tree'")[0]["n"]
    assert got == repeated == 52
    langs = {r["lang"] for r in rows(b, "select distinct lang from source_o")}
    assert len(langs) > 5


@needs_shared_data
def test_oasst2_language_filter(tmp_path: Path) -> None:
    path = OASST / "oasst2_openpaws_filtered.trees.jsonl"
    b, _ = build(
        tmp_path, f"[{{name: o, format: oasst, path: {path}, tree_states: null, require_review: false, lang: [es]}}]"
    )

    def keep(m: dict[str, Any], state: str | None) -> bool:
        return not m.get("deleted") and not m.get("synthetic") and m.get("lang") == "es"

    leaves, _ = expected_conversations(path, keep)
    got = rows(b, "select id, lang from source_o")
    assert {r["id"] for r in got} == {f"o/{leaf}" for leaf in leaves} and {r["lang"] for r in got} == {"es"}


@needs_shared_data
def test_alpaca(tmp_path: Path) -> None:
    path = SHARED_DATA / "instruct" / "alpaca_en_demo.json"
    records = json.loads(path.read_text())
    b, counts = build(tmp_path, f"[{{name: a, format: alpaca, path: {path}}}]")
    assert counts["source.a"] == {"in": 999, "rows": 999, "rejects": 0}
    with_input = sum(1 for r in records if r["input"].strip())
    assert with_input == 412
    got = rows(b, "select id, prompt_of(turns) p, response_of(turns) r from source_a")
    by_id = {r["id"]: r for r in got}
    for n, rec in enumerate(records, start=1):
        expected = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"].strip() else "")
        assert by_id[f"a/{n}"]["p"] == expected and by_id[f"a/{n}"]["r"] == rec["output"]


@needs_shared_data
def test_sharegpt_with_tool_roles(tmp_path: Path) -> None:
    path = SHARED_DATA / "instruct" / "glaive_toolcall_en_demo.sharegpt.json"
    records = json.loads(path.read_text())
    b, counts = build(tmp_path, f"[{{name: g, format: sharegpt, path: {path}}}]")
    mapping = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    expected: dict[str, int] = {}
    for rec in records:
        turns = [mapping[t["from"]] for t in rec["conversations"]]
        while turns and turns[-1] != "assistant":
            turns.pop()
        for role in turns:
            expected[role] = expected.get(role, 0) + 1
    got = rows(b, "select t.role, count(*) n from (select unnest(turns) t from source_g) group by 1")
    assert {r["role"]: r["n"] for r in got} == expected
    assert counts["source.g"]["rows"] == 300


@needs_shared_data
def test_sharegpt_ids_and_prompt_only_file(tmp_path: Path) -> None:
    fastchat = SHARED_DATA / "instruct" / "fastchat_dummy_conversation.sharegpt.json"
    first_turn = SHARED_DATA / "instruct" / "sharegpt_v3_filtered_500_first_turn.json"
    b, counts = build(
        tmp_path,
        f"[{{name: f, format: sharegpt, path: {fastchat}}}, {{name: s, format: sharegpt, path: {first_turn}}}]",
    )
    ids = {f"f/{r['id']}" for r in json.loads(fastchat.read_text())}
    assert {r["id"] for r in rows(b, "select id from source_f")} == ids
    assert counts["source.s"] == {"in": 500, "rows": 0, "rejects": 500}
    got = rows(b, "select id, reason, detail from source_s__rejects")
    assert {r["reason"] for r in got} == {"no_reply"}
    assert {r["id"] for r in got} == {f"s/{r['id']}" for r in json.loads(first_turn.read_text())}
    assert {r["detail"] for r in got} == {f"record {n}: no assistant reply" for n in range(1, 501)}
    assert counts["mix"] == {"in": 500, "rows": 500, "rejects": 0}


@needs_shared_data
def test_h2ogpt_text_and_faq(tmp_path: Path) -> None:
    personality = SHARED_DATA / "h2ogpt" / "h2ogpt-personality.json"
    faq = SHARED_DATA / "h2ogpt" / "dai_faq.json"
    b, counts = build(
        tmp_path, f"[{{name: p, format: h2ogpt, path: {personality}}}, {{name: q, format: alpaca, path: {faq}}}]"
    )
    records = json.loads(personality.read_text())
    assert counts["source.p"]["rows"] == len(records) == 128
    got = {r["id"]: r for r in rows(b, "select id, prompt_of(turns) p, response_of(turns) r from source_p")}
    for n, rec in enumerate(records, start=1):
        human, bot = rec["input"].split("<bot>:")
        assert got[f"p/{n}"]["p"] == human.replace("<human>:", "").strip()
        assert got[f"p/{n}"]["r"] == bot.strip()
    assert counts["source.q"]["rows"] == 95


def alpaca_parts(root: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Alpaca's demo as JSONL in three files (a broken line in the second, a hidden file beside them)."""
    records = json.loads((SHARED_DATA / "instruct" / "alpaca_en_demo.json").read_text())
    lines = [json.dumps(r) for r in records]
    lines.insert(400, '{"instruction": "broken')
    parts = root / "parts"
    (parts / "b").mkdir(parents=True)
    for name, chunk in (("a.jsonl", lines[:300]), ("b/1.jsonl", lines[300:700]), ("c.jsonl", lines[700:])):
        (parts / name).write_text("\n".join(chunk) + "\n")
    (parts / ".notes").write_text("not a record\n")
    return parts, records


@needs_shared_data
def test_a_directory_source_reads_its_files_in_name_order_numbering_on(tmp_path: Path) -> None:
    parts, records = alpaca_parts(tmp_path)
    b, counts = build(tmp_path / "dir", f"[{{name: a, format: alpaca, path: {parts}}}]")
    assert counts["source.a"] == {"in": 1000, "rows": 999, "rejects": 1}
    got = {r["id"]: r for r in rows(b, "select id, prompt_of(turns) p, response_of(turns) r from source_a")}
    for n, rec in enumerate(records, start=1):  # record 401 is the broken line: later ones are one on
        expected = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"].strip() else "")
        row = got[f"a/{n if n <= 400 else n + 1}"]
        assert row["p"] == expected and row["r"] == rec["output"]
    (bad,) = rows(b, "select id, reason, detail from source_a__rejects")
    assert bad["id"] == "a/401" and bad["reason"] == "unreadable"
    assert bad["detail"].startswith("record 401: b/1.jsonl: line 101: invalid JSON")
