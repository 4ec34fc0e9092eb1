"""The cache and pipeline under misuse: gc beside running applies and committed locks, a moved cache, damaged
catalogs, bytes flipped under a restored mtime, edited manifests, `runner sql` as a read-only tool, and
read-only or odd paths."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import api
from tests.conftest import popen_apply
from tests.test_apply import apply_json
from tests.test_gitops import RECIPE


def keys(summary: dict) -> dict[str, str]:
    return {s["step"]: s["key"] for s in summary["steps"]}


def artifact_dir(cache: Path, key: str) -> Path:
    return cache / "artifacts" / key[:2] / key


# -- 1. gc ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gc_while_an_apply_runs_deletes_nothing_it_uses(cli, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("max_steps: 3", "max_steps: 40"))
    cache = tmp_path / "cache"
    proc = popen_apply(recipe, cache)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cache / "scratch").glob("*")):  # training has started
        time.sleep(0.05)
    assert list((cache / "scratch").glob("*")), "the apply reached training"
    built_so_far = set(p.name for p in (cache / "artifacts").glob("*/*"))
    assert len(built_so_far) >= 6
    code, out, err = cli("gc", "--cache-dir", str(cache), "--json")
    assert code == 0, err
    assert not set(json.loads(out)["deleted"]) & built_so_far
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert {s["state"] for s in json.loads(stdout)["steps"]} == {"built"}


def test_gc_keeps_what_a_committed_lock_names(cli, small_recipe: Path) -> None:
    first = keys(apply_json(cli, str(small_recipe)))
    lock = json.loads((small_recipe.parent / "t.yaml.lock").read_text())
    assert lock["steps"]["split"]["key"] == first["split"]
    second = keys(apply_json(cli, str(small_recipe), "--set", "data.split.seed=5"))
    assert second["split"] != first["split"]
    cache = Path(os.environ["RUNNER_CACHE"])
    code, out, _ = cli("gc", "--json")
    assert code == 0 and str(small_recipe.parent / "t.yaml.lock") in json.loads(out)["lock_files"]
    assert artifact_dir(cache, first["split"]).exists(), "the lock still names the old split"
    assert artifact_dir(cache, second["split"]).exists(), "the ref names the new one"


def test_gc_dry_run_is_exactly_what_gc_does(cli, small_recipe: Path, tmp_path: Path) -> None:
    apply_json(cli, str(small_recipe))
    gone = tmp_path / "gone"
    gone.mkdir()
    shutil.copy(small_recipe, gone / "g.yaml")
    shutil.copy(small_recipe.parent / "rows.jsonl", gone / "rows.jsonl")
    apply_json(cli, str(gone / "g.yaml"), "--set", "data.split.seed=9")  # its own split, no lock (a --set)
    shutil.rmtree(gone)  # the recipe no longer exists: its ref goes, and what only it kept
    code, out, _ = cli("gc", "--dry-run", "--json")
    dry = json.loads(out)
    assert code == 0 and dry["deleted"] and dry["dropped_refs"]
    code, out, _ = cli("gc", "--json")
    real = json.loads(out)
    assert sorted(real["deleted"]) == sorted(dry["deleted"]) and real["dropped_refs"] == dry["dropped_refs"]


# -- 2. catalogs -----------------------------------------------------------------------------------


def test_a_moved_cache_still_answers_sql_and_a_damaged_catalog_is_rebuilt(
    cli, small_recipe: Path, tmp_path: Path
) -> None:
    a, b = tmp_path / "A", tmp_path / "B"
    apply_json(cli, str(small_recipe), "--cache-dir", str(a))
    shutil.move(a, b)
    assert {s["state"] for s in apply_json(cli, str(small_recipe), "--cache-dir", str(b))["steps"]} == {"cached"}
    code, out, err = cli(
        "sql", str(small_recipe), "--cache-dir", str(b), "select count(*) n from split__train", "--json"
    )
    assert code == 0, err
    assert json.loads(out)[0]["n"] > 0
    catalog = next((b / "catalogs").glob("*.duckdb"))
    catalog.write_bytes(b"not a database at all" * 100)
    code, _, _ = cli("sql", str(small_recipe), "--cache-dir", str(b), "select 1")
    assert code != 0
    apply_json(cli, str(small_recipe), "--cache-dir", str(b))  # the ref is unchanged; the catalog is rewritten
    code, out, err = cli(
        "sql", str(small_recipe), "--cache-dir", str(b), "select count(*) n from split__train", "--json"
    )
    assert code == 0 and json.loads(out)[0]["n"] > 0, err


# -- 3. what apply checks --------------------------------------------------------------------------


def flip_a_byte_keep_mtime(f: Path) -> None:
    st = f.stat()
    f.chmod(0o644)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    f.chmod(0o444)


def test_a_byte_flipped_under_a_restored_mtime_is_noticed(cli, small_recipe: Path) -> None:
    first = keys(apply_json(cli, str(small_recipe)))
    cache = Path(os.environ["RUNNER_CACHE"])
    f = artifact_dir(cache, first["format"]) / "data" / "rows.parquet"
    flip_a_byte_keep_mtime(f)
    plan = {p.name: p.state for p in api.plan(api.load(small_recipe))}
    assert plan["format"] == "run" and plan["source.s"] == "cached"
    states = {s["step"]: s["state"] for s in apply_json(cli, str(small_recipe))["steps"]}
    assert states["format"] == "built"


def test_an_edited_manifest_is_noticed_by_apply_and_verify(cli, small_recipe: Path) -> None:
    first = keys(apply_json(cli, str(small_recipe)))
    cache = Path(os.environ["RUNNER_CACHE"])
    m = artifact_dir(cache, first["filter.length"]) / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["rows"]["rows"] += 1000
    m.chmod(0o644)
    m.write_text(json.dumps(manifest))
    code, out, _ = cli("verify", "--json")
    assert code == 1 and first["filter.length"] in json.loads(out)["corrupt"]
    assert {p.name: p.state for p in api.plan(api.load(small_recipe))}["filter.length"] == "run"


def test_apply_verify_rereads_what_the_stat_cache_vouches_for(cli, small_recipe: Path) -> None:
    first = keys(apply_json(cli, str(small_recipe)))
    cache = Path(os.environ["RUNNER_CACHE"])
    f = artifact_dir(cache, first["format"]) / "data" / "rows.parquet"
    flip_a_byte_keep_mtime(f)
    # a stale stat cache that vouches for the damaged file (as a restored backup or a clock jump could)
    good = json.loads((f.parent.parent / "manifest.json").read_text())["files"]["rows.parquet"]["hash"]
    st = f.stat()
    db = sqlite3.connect(cache / "stat-cache.sqlite")
    db.execute(
        "insert or replace into hashes2 values (?, ?, ?, ?, ?, ?)",
        (str(f), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, good),
    )
    db.commit()
    db.close()
    assert {s["step"]: s["state"] for s in apply_json(cli, str(small_recipe))["steps"]}["format"] == "cached"
    assert {s["step"]: s["state"] for s in apply_json(cli, str(small_recipe), "--verify")["steps"]}["format"] == "built"


# -- 4. runner sql only reads ---------------------------------------------------------------------


def test_runner_sql_is_read_only_and_confined_to_the_cache(cli, small_recipe: Path, tmp_path: Path) -> None:
    apply_json(cli, str(small_recipe))
    cache = Path(os.environ["RUNNER_CACHE"])
    catalog = next((cache / "catalogs").glob("*.duckdb"))
    artifact = next((cache / "artifacts").glob("*/*/data"))
    before = sorted(p.name for p in artifact.iterdir())
    for query, says in [
        (f"copy (select 1) to '{tmp_path / 'out.csv'}'", "COPY statements are not allowed"),
        (f"copy (select 1) to '{catalog}'", "COPY statements are not allowed"),
        (f"copy (select 1) to '{artifact / 'x.parquet'}' (format parquet)", "COPY statements are not allowed"),
        ("select * from read_csv('/etc/passwd')", "SQL refused"),
        (f"attach '{tmp_path / 'x.db'}'", "ATTACH statements are not allowed"),
        ("create table t as select 1", "CREATE statements are not allowed"),
        ("set enable_external_access = true", "SET statements are not allowed"),
    ]:
        code, _, err = cli("sql", str(small_recipe), query)
        assert code == 2 and says in err, (query, err)
    assert not (tmp_path / "out.csv").exists() and sorted(p.name for p in artifact.iterdir()) == before
    code, out, _ = cli("sql", str(small_recipe), "select count(*) n from source_s", "--json")
    assert code == 0 and json.loads(out)[0]["n"] == 40
    assert api.verify(api.open_cache()) == {}


# -- 6. read-only and odd paths ---------------------------------------------------------------------


@pytest.fixture
def readonly(tmp_path: Path) -> Iterator[tuple[Path, callable]]:
    """A directory on a tmpfs that `seal()` remounts read-only (a real EROFS, which root cannot write either)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)

    def seal() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

    try:
        yield mnt, seal
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_remote_fails_the_push_in_one_line(cli, small_recipe: Path, readonly) -> None:
    remote, seal = readonly
    seal()
    code, _, err = cli("apply", str(small_recipe), "--cache-remote", str(remote))
    assert code == 1 and "pushing to the shared cache failed" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or err.count("error:") == 1
    again = apply_json(cli, str(small_recipe))
    assert {s["state"] for s in again["steps"]} == {"cached"}, "the build stands"


def test_a_remote_under_a_file_is_one_clear_error(cli, small_recipe: Path) -> None:
    for command in ("plan", "apply"):
        code, _, err = cli(command, str(small_recipe), "--cache-remote", "/etc/hostname/x")
        assert code == 1 and "does not exist" in err and "Traceback" not in err, err


def test_a_recipe_in_a_read_only_directory(cli, small_recipe: Path, readonly) -> None:
    where, seal = readonly
    shutil.copy(small_recipe, where / "t.yaml")
    shutil.copy(small_recipe.parent / "rows.jsonl", where / "rows.jsonl")
    seal()
    code, _, err = cli("apply", str(where / "t.yaml"))
    assert code == 1 and "the lock file" in err and "could not be written" in err and "Traceback" not in err
    plan = api.plan(api.load(where / "t.yaml"))
    assert {p.state for p in plan} == {"cached"}, "every artifact it built is usable"


def test_a_failing_commit_is_one_line(cli, small_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner import registry

    spec = registry.get("split")

    def writes_a_symlink(ctx) -> None:
        spec.run(ctx)
        (ctx.out / "link").symlink_to(ctx.out / "train.mask.parquet")

    import dataclasses

    monkeypatch.setitem(registry._REGISTRY, "split", dataclasses.replace(spec, run=writes_a_symlink))
    code, _, err = cli("apply", str(small_recipe))
    assert code == 1 and "symlink" in err and "Traceback" not in err
