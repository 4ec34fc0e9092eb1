"""apply/plan/status/show/graph/sql/verify/gc end to end on a small recipe over real steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from tests.conftest import apply_json, run_subprocess, step_states


def test_apply_builds_then_does_nothing(cli, small_recipe: Path) -> None:
    first = apply_json(cli, str(small_recipe))
    assert set(step_states(first).values()) == {"built"}
    rows = {s["step"]: s["rows"] for s in first["steps"]}
    assert rows["source.s"] == {"in": 40, "rows": 40, "rejects": 0}
    assert rows["filter.length"] == {"in": 40, "rows": 37, "rejects": 3}
    assert rows["filter.dedup"] == {"in": 37, "rows": 35, "rejects": 2}
    assert rows["split"]["train"] + rows["split"]["validation"] == 35
    second = apply_json(cli, str(small_recipe))
    assert set(step_states(second).values()) == {"cached"}


def test_changing_one_filter_param_reruns_exactly_downstream(cli, small_recipe: Path) -> None:
    apply_json(cli, str(small_recipe))
    _code, out, _ = cli("plan", str(small_recipe), "--set", "data.filters.0.min_chars=2", "--json")
    plan = {p["step"]: p for p in json.loads(out)}
    assert plan["source.s"]["state"] == "cached"
    assert plan["filter.length"]["state"] == "run"
    assert plan["filter.length"]["why"] == ["param min_chars: 5 -> 2"]
    assert {plan[s]["state"] for s in ("filter.dedup", "format", "split")} == {"pending"}
    after = apply_json(cli, str(small_recipe), "--set", "data.filters.0.min_chars=2")  # keeps the "no" replies
    assert step_states(after) == {
        "source.s": "cached",
        "filter.length": "built",
        "filter.dedup": "built",
        "format": "built",
        "split": "built",
    }


def test_a_param_change_that_changes_no_row_is_cut_off(cli, small_recipe: Path) -> None:
    apply_json(cli, str(small_recipe))
    after = apply_json(cli, str(small_recipe), "--set", "data.filters.0.min_chars=3")  # "no" is still too short
    assert step_states(after) == {
        "source.s": "cached",
        "filter.length": "built",
        "filter.dedup": "cached",
        "format": "cached",
        "split": "cached",
    }


def test_every_data_step_accounts_for_every_row(cli, small_recipe: Path) -> None:
    summary = apply_json(cli, str(small_recipe))
    for s in summary["steps"]:
        rows = dict(s["rows"])
        n_in = rows.pop("in")
        assert n_in == sum(rows.values()), s


def test_clean_caches_give_identical_keys_and_bytes(cli, small_recipe: Path, tmp_path: Path) -> None:
    a = apply_json(cli, str(small_recipe), "--cache-dir", str(tmp_path / "ca"))
    b = apply_json(cli, str(small_recipe), "--cache-dir", str(tmp_path / "cb"))
    assert [s["key"] for s in a["steps"]] == [s["key"] for s in b["steps"]]
    for s in a["steps"]:
        da = tmp_path / "ca" / "artifacts" / s["key"][:2] / s["key"] / "data"
        db = tmp_path / "cb" / "artifacts" / s["key"][:2] / s["key"] / "data"
        files = sorted(p.relative_to(da) for p in da.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(db) for p in db.rglob("*") if p.is_file())
        for rel in files:
            assert (da / rel).read_bytes() == (db / rel).read_bytes(), rel


def test_sql_show_status_graph(cli, small_recipe: Path) -> None:
    apply_json(cli, str(small_recipe))
    code, out, _ = cli(
        "sql", str(small_recipe), "select id, reason, detail from filter_dedup__rejects order by id", "--json"
    )
    assert code == 0
    assert [(r["reason"], r["detail"]) for r in json.loads(out)] == [("duplicate", "of s/2"), ("duplicate", "of s/3")]
    code, out, _ = cli("sql", str(small_recipe), "select count(*) as n from split__train", "--json")
    n_train = json.loads(out)[0]["n"]
    code, out, _ = cli("show", str(small_recipe), "split")
    manifest = json.loads(out)
    assert manifest["rows"]["train"] == n_train and manifest["lineage"]["input_steps"] == ["format"]
    code, out, _ = cli("status", str(small_recipe), "--json")
    assert all(r["built"] for r in json.loads(out))
    code, out, _ = cli("graph", str(small_recipe), "--mermaid")
    assert out.startswith("graph TD") and "-->" in out


def test_sql_error_is_one_clear_line(cli, small_recipe: Path) -> None:
    code, _, err = cli("sql", str(small_recipe), "select 1")
    assert code == 1 and "has not been applied yet" in err
    apply_json(cli, str(small_recipe))
    code, _, err = cli("sql", str(small_recipe), "select nope from split__train")
    assert code == 1 and err.startswith("error: SQL failed") and "Traceback" not in err


def test_catalog_is_a_duckdb_file_with_views(cli, small_recipe: Path, _isolated_cache: Path) -> None:
    apply_json(cli, str(small_recipe))
    [catalog] = (_isolated_cache / "catalogs").glob("*.duckdb")
    con = duckdb.connect(str(catalog), read_only=True)
    views = {r[0] for r in con.execute("select view_name from duckdb_views() where not internal").fetchall()}
    assert {"source_s", "filter_length", "filter_length__rejects", "format", "split__train"} <= views


def test_verify_finds_corruption_and_repair_rebuilds(cli, small_recipe: Path, _isolated_cache: Path) -> None:
    summary = apply_json(cli, str(small_recipe))
    assert cli("verify")[0] == 0
    key = states_key(summary, "format")
    f = _isolated_cache / "artifacts" / key[:2] / key / "data" / "rows.parquet"
    f.chmod(0o644)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    code, out, _ = cli("verify")
    assert code == 1 and key in out
    assert cli("verify", "--repair")[0] == 1
    assert cli("verify")[0] == 0
    again = apply_json(cli, str(small_recipe))
    assert step_states(again)["format"] == "built" and step_states(again)["split"] == "cached"


def states_key(summary: dict, step: str) -> str:
    return next(s["key"] for s in summary["steps"] if s["step"] == step)


def test_gc_removes_only_unreferenced(cli, small_recipe: Path, _isolated_cache: Path) -> None:
    old = apply_json(cli, str(small_recipe), "--set", "data.filters.0.min_chars=3")
    new = apply_json(cli, str(small_recipe))
    code, _out, _ = cli("gc")
    assert code == 0
    remaining = {p.name for p in (_isolated_cache / "artifacts").glob("*/*")}
    assert remaining == {s["key"] for s in new["steps"]}
    assert states_key(old, "filter.length") not in remaining


def test_malformed_rows_are_rejected_with_reasons(cli, tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_bytes(
        b'{"prompt": "fine", "response": "a good reply"}\n'
        b'{"prompt": "broken", \n'
        b"\xff\xfe not utf8\n"
        b"[1, 2]\n"
        b'{"prompt": "no reply"}\n'
        b'{"prompt": 5, "response": "numeric prompt"}\n'
        b"\n"
    )
    (tmp_path / "r.yaml").write_text("data:\n  sources:\n    - {name: s, format: jsonl, path: rows.jsonl}\n")
    summary = apply_json(cli, str(tmp_path / "r.yaml"))
    assert summary["steps"][0]["rows"] == {"in": 7, "rows": 1, "rejects": 6}
    _code, out, _ = cli("sql", str(tmp_path / "r.yaml"), "select id, reason, detail from source_s__rejects", "--json")
    got = {r["id"]: (r["reason"], r["detail"]) for r in json.loads(out)}
    assert {i: r for i, (r, _) in got.items()} == {
        "s/2": "unreadable",
        "s/3": "unreadable",
        "s/4": "unreadable",
        "s/5": "missing_field",
        "s/6": "missing_field",
        "s/7": "unreadable",
    }
    assert "invalid JSON" in got["s/2"][1] and "not UTF-8" in got["s/3"][1]
    assert "not a JSON object" in got["s/4"][1] and "missing field 'response'" in got["s/5"][1]
    assert "not text" in got["s/6"][1] and "empty line" in got["s/7"][1]


def test_bad_sql_filter_fails_clearly(cli, small_recipe: Path) -> None:
    code, _, err = cli("apply", str(small_recipe), "--set", "data.filters.0={kind: sql, where: 'nope > 1'}")
    assert code == 1 and "filter.sql" in err and "the SQL failed" in err and "Traceback" not in err


def test_plan_imports_no_ml_and_no_duckdb(small_recipe: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert run_subprocess("apply", str(small_recipe), cache=cache).returncode == 0
    code = (
        "import sys; from runner.cli.main import main; main(['plan', sys.argv[1]]); main(['apply', sys.argv[1]]);"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'duckdb', 'sentence_transformers') if m in sys.modules];"
        "print('IMPORTED', bad)"
    )
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", code, str(small_recipe)],
        capture_output=True,
        text=True,
        env={**os.environ, "RUNNER_CACHE": str(cache)},
    )
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr


def test_unknown_step_or_target_is_a_usage_error(cli, small_recipe: Path) -> None:
    code, _, err = cli("apply", str(small_recipe), "--target", "filter.nope")
    assert code == 2 and "no step 'filter.nope'" in err
    code, _, err = cli("show", str(small_recipe), "nope")
    assert code == 2 and "steps: source.s" in err


def test_every_command_has_help(cli) -> None:
    from runner.cli.commands import ALL

    for command in ALL:
        name = command.__name__.rsplit(".", 1)[-1]
        code, out, _ = cli(name, "--help")
        assert code == 0 and "usage: runner" in out


def test_parquet_source_is_typed_and_rejects_missing_text(cli, tmp_path: Path) -> None:
    con = duckdb.connect()
    con.execute(f"""copy (select * from (values ('u1', 'hi there', 'hello!', 0.5), ('u2', 'no reply', null, 0.1),
                         ('u3', null, 'orphan reply', 0.9)) t(uid, q, a, s))
                   to '{tmp_path / "d.parquet"}' (format parquet)""")
    (tmp_path / "r.yaml").write_text(
        "data:\n  sources:\n    - {name: p, format: parquet, path: d.parquet, "
        "columns: {prompt: q, response: a, id: uid, score: s}}\n"
    )
    summary = apply_json(cli, str(tmp_path / "r.yaml"))
    assert summary["steps"][0]["rows"] == {"in": 3, "rows": 1, "rejects": 2}
    code, out, _ = cli("sql", str(tmp_path / "r.yaml"), "select id, score, prompt_of(turns) p from source_p", "--json")
    assert json.loads(out) == [{"id": "p/u1", "score": 0.5, "p": "hi there"}]
    code, out, _ = cli(
        "sql", str(tmp_path / "r.yaml"), "select id, reason, detail from source_p__rejects order by id", "--json"
    )
    assert [(r["id"], r["reason"], r["detail"]) for r in json.loads(out)] == [
        ("p/u2", "missing_field", "record 2: missing field a"),
        ("p/u3", "missing_field", "record 3: missing field q"),
    ]
    code, _, err = cli("apply", str(tmp_path / "r.yaml"), "--set", "data.sources.0.columns.score=q")
    assert code == 1 and "column 'q' (score) is VARCHAR, not a number" in err


def test_data_steps_work_within_a_small_duckdb_memory_limit(tmp_path: Path, monkeypatch) -> None:
    """Over RUNNER_DUCKDB_MEMORY, DuckDB spills (to the temp dir, not the working directory) instead of growing:
    a dedup (a window over every row) of 300k rows (66 MB of text) under a 256MB limit keeps exactly the rows an
    independent count says."""
    from runner import api
    from stores.datastore import connect

    monkeypatch.chdir(tmp_path)
    duckdb.execute(f"""copy (select 'question ' || (i % 70001) as prompt, 'answer ' || (i % 70001) || ' ' ||
                            repeat('x', 200) as response from range(300000) t(i)) to '{tmp_path / "d.jsonl"}'""")
    (tmp_path / "r.yaml").write_text(
        "data:\n  sources:\n    - {name: p, format: jsonl, path: d.jsonl}\n  filters: [{kind: dedup}]\n"
    )
    assert api.apply(api.load(tmp_path / "r.yaml", cache_dir=tmp_path / "cache", targets=["source.p"])).ok
    monkeypatch.setenv("RUNNER_DUCKDB_MEMORY", "256MB")
    limit, spill = (
        connect().execute("select current_setting('memory_limit'), current_setting('temp_directory')").fetchone()
    )
    assert limit == "244.1 MiB" and not spill.startswith(str(tmp_path))
    result = api.apply(api.load(tmp_path / "r.yaml", cache_dir=tmp_path / "cache", targets=["filter.dedup"]))
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    rows = next(s for s in result.steps if s.name == "filter.dedup").artifact.manifest["rows"]
    distinct = len(set((tmp_path / "d.jsonl").read_text().splitlines()))
    assert rows["rows"] == distinct == 70001 and rows["rejects"] == 300000 - distinct
    assert not (tmp_path / ".tmp").exists()
