"""The artifact cache: atomic commits, verification, gc, stale temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stores.cache import ArtifactCache
from stores.hashing import StatCache, hash_file_uncached


def build(cache: ArtifactCache, key: str, files: dict[str, bytes]) -> None:
    tmp = cache.begin(key)
    for rel, data in files.items():
        (tmp / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "data" / rel).write_bytes(data)
    with cache.lock(key):
        cache.commit(key, tmp, {"rows": {}})


def test_commit_then_get(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build(cache, "k1", {"a.txt": b"x", "sub/b.txt": b"yy"})
    art = cache.get("k1")
    assert art is not None and art.file("sub/b.txt").read_bytes() == b"yy"
    assert art.manifest["files"]["a.txt"]["size"] == 1
    assert not os.access(art.file("a.txt"), os.W_OK) or os.geteuid() == 0
    assert list(cache.tmp.iterdir()) == []


def test_failed_rename_leaves_no_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ArtifactCache(tmp_path)
    tmp = cache.begin("k")
    (tmp / "data" / "f").write_text("x")

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", boom)
    with pytest.raises(OSError):
        cache.commit("k", tmp, {})
    monkeypatch.undo()
    assert cache.get("k") is None and list(cache.keys()) == []


def test_missing_manifest_is_not_an_artifact(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build(cache, "k", {"f": b"x"})
    (cache.path("k") / "manifest.json").unlink()
    assert cache.get("k") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra"])
def test_damage_is_detected(tmp_path: Path, damage: str) -> None:
    cache = ArtifactCache(tmp_path)
    build(cache, "k", {"f": b"hello world"})
    f = cache.path("k") / "data" / "f"
    f.chmod(0o644)
    if damage == "truncate":
        f.write_bytes(b"hello")
    elif damage == "flip":
        f.write_bytes(b"hello worle")
    elif damage == "delete":
        f.unlink()
    else:
        (f.parent / "stray").write_text("?")
    assert cache.get("k") is None
    assert cache.problems("k", deep=True)


def test_deep_verify_catches_what_stat_cannot(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build(cache, "k", {"f": b"hello world"})
    f = cache.path("k") / "data" / "f"
    st = f.stat()
    f.chmod(0o644)
    f.write_bytes(b"HELLO WORLD")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # forge the timestamp
    assert cache.problems("k", deep=True) == ["f: content hash differs from manifest"]


def test_stale_tmp_dirs_of_dead_processes_are_cleaned(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    (cache.tmp / "k.999999999.abcd").mkdir()  # no such pid
    live = cache.begin("k2")  # ours: kept
    assert cache.clean_tmp() == 1
    assert live.exists()


def test_gc_keeps_what_refs_name(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    build(cache, "keep", {"f": b"1"})
    build(cache, "drop", {"f": b"2"})
    cache.write_ref("r", {"steps": {"s": {"key": "keep"}}})
    assert cache.gc(dry_run=True) == ["drop"] and cache.get("drop") is not None
    assert cache.gc() == ["drop"]
    assert cache.get("drop") is None and cache.get("keep") is not None


def test_stat_cache_reads_a_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc" * 1000)
    sc = StatCache(tmp_path / "sc.sqlite")
    first = sc.hash_file(f)
    sc2 = StatCache(tmp_path / "sc.sqlite")  # a new process, same db
    import stores.hashing as h

    monkeypatch.setattr(h, "hash_file_uncached", lambda p: pytest.fail("re-read an unchanged file"))
    assert sc2.hash_file(f) == first == hash_file_uncached(f)
    monkeypatch.undo()
    f.write_bytes(b"abd" * 1000)
    assert sc2.hash_file(f) != first
