"""Lock files, apply --locked, lock --check, runner diff (recipes and git revisions), the shared cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import apply_json, write_jsonl


def test_apply_writes_a_lock_and_locked_apply_is_a_no_op(cli, small_recipe: Path) -> None:
    apply_json(cli, str(small_recipe))
    lock = json.loads((small_recipe.parent / "t.yaml.lock").read_text())
    assert set(lock["steps"]) == {"source.s", "filter.length", "filter.dedup", "format", "split"}
    assert lock["inputs"]["rows.jsonl"] and lock["libraries"]["duckdb"]
    again = apply_json(cli, str(small_recipe), "--locked")
    assert {s["state"] for s in again["steps"]} == {"cached"}
    code, out, _ = cli("lock", str(small_recipe), "--check")
    assert code == 0 and "matches" in out


def test_locked_apply_refuses_drift_with_the_exact_reason(cli, small_recipe: Path) -> None:
    apply_json(cli, str(small_recipe))
    code, _, err = cli("apply", str(small_recipe), "--locked", "--set", "data.filters.0.min_chars=9")
    assert code == 3 and "recipe value data.filters[0].min_chars: 5 -> 9" in err
    rows = small_recipe.parent / "rows.jsonl"
    rows.write_text(rows.read_text() + json.dumps({"prompt": "new", "response": "a new row here"}) + "\n")
    code, _, err = cli("apply", str(small_recipe), "--locked")
    assert code == 3 and "input file rows.jsonl changed" in err and "step source.s" in err
    code, _, err = cli("lock", str(small_recipe), "--check")
    assert code == 3 and "input file rows.jsonl changed" in err
    # nothing was built by the refused applies
    code, out, _ = cli("plan", str(small_recipe), "--json")
    assert json.loads(out)[0]["state"] == "run"


def test_locked_apply_without_a_lock_is_refused(cli, small_recipe: Path) -> None:
    code, _, err = cli("apply", str(small_recipe), "--locked")
    assert code == 3 and "there is no lock file" in err


def test_diff_lists_exactly_the_rows_one_filter_changed(cli, tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "response": "x" * (i % 17)} for i in range(120)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    base = "data:\n  sources: [{name: s, format: jsonl, path: rows.jsonl}]\n  filters:\n    - {kind: length, min_chars: %d}\n    - {kind: dedup}\n"
    (tmp_path / "a.yaml").write_text(base % 3)
    (tmp_path / "b.yaml").write_text(base % 9)
    apply_json(cli, str(tmp_path / "a.yaml"))
    apply_json(cli, str(tmp_path / "b.yaml"))
    code, out, err = cli("diff", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["params"] == [{"path": "data.filters[0].min_chars", "a": 3, "b": 9}]

    # independent: rows kept by A (length >= 3, first of each text) minus rows kept by B
    def kept(minimum: int) -> set[str]:
        seen, out = set(), set()
        for i, r in enumerate(rows, start=1):
            text = (r["prompt"] + "\n" + r["response"]).lower()
            if len(r["response"]) >= minimum and text not in seen:
                seen.add(text)
                out.add(f"s/{i}")
        return out

    removed = kept(3) - kept(9)
    assert removed and {r["id"] for r in d["row_changes"]["removed"]} == removed
    assert {r["step"] for r in d["row_changes"]["removed"]} == {"filter.length"}
    assert d["row_changes"]["added"] == []
    assert {s["step"] for s in d["steps"] if s["changed"]} == {"filter.length", "filter.dedup", "format", "split"}
    code, md, _ = cli("diff", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--markdown")
    assert md.startswith("### runner diff") and "| `data.filters[0].min_chars` | `3` | `9` |" in md


def test_diff_against_a_git_revision(cli, small_recipe: Path) -> None:
    repo = small_recipe.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "t.yaml")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "recipe")
    small_recipe.write_text(small_recipe.read_text().replace("min_chars: 5", "min_chars: 7"))
    code, out, err = cli("diff", f"{small_recipe}@HEAD", str(small_recipe), "--json")
    assert code == 0, err
    assert json.loads(out)["params"] == [{"path": "data.filters[0].min_chars", "a": 5, "b": 7}]
    assert not list(repo.glob(".t@*")), "the temporary recipe is removed"
    code, _, err = cli("diff", f"{small_recipe}@nope", str(small_recipe))
    assert code == 1 and "cannot read" in err


def test_a_second_machine_pulls_from_the_shared_cache(cli, small_recipe: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    code, _, err = cli("apply", str(small_recipe), "--cache-remote", str(shared))
    assert code == 1 and "does not exist" in err and not shared.exists(), "a remote is never created"
    shared.mkdir()
    first = apply_json(cli, str(small_recipe), "--cache-dir", str(tmp_path / "m1"), "--cache-remote", str(shared))
    assert {s["state"] for s in first["steps"]} == {"built"}
    second = apply_json(cli, str(small_recipe), "--cache-dir", str(tmp_path / "m2"), "--cache-remote", str(shared))
    assert {s["state"] for s in second["steps"]} == {"cached"}, "nothing rebuilt"
    for s in first["steps"]:
        a = tmp_path / "m1" / "artifacts" / s["key"][:2] / s["key"] / "data"
        b = tmp_path / "m2" / "artifacts" / s["key"][:2] / s["key"] / "data"
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_a_corrupt_shared_artifact_is_never_used(cli, small_recipe: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    first = apply_json(cli, str(small_recipe), "--cache-dir", str(tmp_path / "m1"), "--cache-remote", str(shared))
    key = next(s["key"] for s in first["steps"] if s["step"] == "format")
    digest = json.loads((shared / "artifacts" / f"{key}.json").read_text())["files"]["rows.parquet"]["hash"]
    f = shared / "blobs" / digest[:2] / digest
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    second = apply_json(cli, str(small_recipe), "--cache-dir", str(tmp_path / "m2"), "--cache-remote", str(shared))
    states = {s["step"]: s["state"] for s in second["steps"]}
    assert states["format"] == "built" and states["source.s"] == "cached"


def test_an_apply_with_overrides_leaves_the_lock_alone(cli, small_recipe: Path) -> None:
    apply_json(cli, str(small_recipe))
    before = (small_recipe.parent / "t.yaml.lock").read_text()
    apply_json(cli, str(small_recipe), "--set", "data.filters.0.min_chars=2")
    assert (small_recipe.parent / "t.yaml.lock").read_text() == before
    assert cli("lock", str(small_recipe), "--check")[0] == 0
