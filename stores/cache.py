"""The content-addressed artifact cache.

Layout under the cache root::

    artifacts/<key[:2]>/<key>/manifest.json   the manifest, written last
    artifacts/<key[:2]>/<key>/data/...        the files a step wrote
    tmp/<key>.<pid>.<random>/                 builds in progress
    locks/<key>.lock                          one lock per key
    refs/<name>.json                          named pointers to keys (what gc keeps)
    pins/<pid>.<random>.json                  keys a running apply uses (gc keeps them too)
    stat-cache.sqlite                         file hashes by stat

An artifact is built in a temp dir, every file fsynced, the manifest written last,
then the dir is renamed into place: it exists whole or not at all. Files are made
read-only. The manifest seals itself (`manifest_hash` covers every other field: row
counts, tables, metrics, lineage, file hashes).

What is checked when: every use of an artifact (plan, apply, sql, serve) checks the
manifest's seal, that every file is there with its size, that no file is extra, and
each file's hash through the stat cache (re-read whenever size, mtime, inode or ctime
changed, so any write is noticed). `deep=True` (`runner verify`, `apply --verify`)
re-reads every byte instead of trusting the stat cache.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from stores.errors import StoreError
from stores.files import fsync_path, temp_name, temp_owner, write_json_atomic
from stores.hashing import StatCache, hash_file_uncached, hash_json
from stores.remote import Remote

MANIFEST = "manifest.json"
DATA = "data"
FORMAT = 1


@dataclass(frozen=True)
class Artifact:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def files_dir(self) -> Path:
        """The folder holding the artifact's files (`file(relpath)` is under it)."""
        return self.path / DATA

    @property
    def output_hash(self) -> str:
        return str(self.manifest["output_hash"])

    def file(self, relpath: str) -> Path:
        return self.files_dir / relpath


def seal(manifest: dict[str, Any]) -> str:
    """The manifest's own hash: every field but this one."""
    return hash_json({k: v for k, v in manifest.items() if k != "manifest_hash"})


def output_hash(files: dict[str, dict[str, Any]], side_files: list[str]) -> str:
    """What readers of an artifact see: the hashes of its files, less side outputs (reports, rejects).

    Side outputs are still verified; they just do not make readers rebuild when only they change.
    """
    return hash_json({rel: m["hash"] for rel, m in files.items() if rel not in side_files})


class CacheError(StoreError):
    pass


def default_cache_dir() -> Path:
    env = os.environ.get("RUNNER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "runner"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactCache:
    def __init__(self, root: Path, *, remote: Remote | None = None, stat_db: bool = True, deep: bool = False) -> None:
        self.root = Path(os.path.abspath(root))
        self.artifacts = self.root / "artifacts"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.refs = self.root / "refs"
        self.pins = self.root / "pins"
        self.deep = deep  # re-read every byte of an artifact before use (apply --verify)
        self._pinned: set[str] = set()
        self._pin_file = temp_name(self.pins / "pin", ".json")
        try:
            for d in (self.artifacts, self.tmp, self.locks, self.refs, self.pins):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"the cache {self.root} cannot be used: {exc.strerror} ({exc.filename}); "
                "give a writable --cache-dir or $RUNNER_CACHE"
            ) from None
        self.stat_cache = StatCache(self.root / "stat-cache.sqlite" if stat_db else None)
        self.remote = remote
        self.pull_problems: dict[str, str] = {}  # key -> why the shared copy was refused

    # -- lookup ------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.artifacts / key[:2] / key

    def get(self, key: str) -> Artifact | None:
        """The artifact under `key` if it is whole and matches its manifest."""
        path = self.path(key)
        manifest = self.read_manifest(path)
        if manifest is None or self.problems(key, manifest=manifest, deep=self.deep):
            return None
        return Artifact(key, path, manifest)

    def read_manifest(self, path: Path) -> dict[str, Any] | None:
        try:
            with open(path / MANIFEST, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def problems(self, key: str, *, manifest: dict[str, Any] | None = None, deep: bool = False) -> list[str]:
        """What is wrong with the artifact under `key`; empty when it is sound."""
        path = self.path(key)
        if manifest is None:
            manifest = self.read_manifest(path)
        if manifest is None:
            return ["manifest missing or unreadable"] if path.exists() else ["not in cache"]
        if manifest.get("key") != key:
            return [f"manifest names key {manifest.get('key')!r}"]
        found = []
        if manifest.get("manifest_hash") != seal(manifest):
            found.append("the manifest was edited (its fields do not match its manifest_hash)")
        files = manifest.get("files", {})
        for rel, meta in files.items():
            f = path / DATA / rel
            try:
                size = f.stat().st_size
            except OSError:
                found.append(f"{rel}: missing")
                continue
            if size != meta["size"]:
                found.append(f"{rel}: size {size} != {meta['size']}")
                continue
            digest = hash_file_uncached(f) if deep else self.stat_cache.hash_file(f)
            if digest != meta["hash"]:
                found.append(f"{rel}: content hash differs from manifest")
        if output_hash(files, manifest.get("side_files", [])) != manifest.get("output_hash"):
            found.append("output hash does not match file hashes")
        data_dir = path / DATA
        if data_dir.exists():
            extra = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()} - set(files)
            found.extend(f"{rel}: not in manifest" for rel in sorted(extra))
        return found

    def keys(self) -> Iterator[str]:
        for shard in sorted(self.artifacts.iterdir()):
            if shard.is_dir():
                for d in sorted(shard.iterdir()):
                    if d.is_dir() and not d.name.startswith("."):
                        yield d.name

    # -- building ----------------------------------------------------------
    def lock(self, key: str, timeout: float = -1) -> FileLock:
        return FileLock(str(self.locks / f"{key}.lock"), timeout=timeout)

    def begin(self, key: str) -> Path:
        """A fresh temp dir for building `key`; the step writes under `<dir>/data`."""
        tmp = temp_name(self.tmp / key)
        (tmp / DATA).mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path, record: dict[str, Any]) -> Artifact:
        """Hash, fsync and rename a finished build into place. Call with the key's lock held."""
        data = tmp / DATA
        files: dict[str, dict[str, Any]] = {}
        for f in sorted(data.rglob("*")):
            if f.is_symlink():
                raise CacheError(f"step wrote a symlink {f.relative_to(data)}; artifacts hold plain files only")
            if f.is_file():
                fsync_path(f)
                files[f.relative_to(data).as_posix()] = {"hash": hash_file_uncached(f), "size": f.stat().st_size}
                f.chmod(0o444)
        manifest = {
            **record,
            "format": FORMAT,
            "key": key,
            "files": files,
            "output_hash": output_hash(files, record.get("side_files", [])),
        }
        manifest["manifest_hash"] = seal(manifest)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        for d in sorted({p for p in data.rglob("*") if p.is_dir()} | {data, tmp}, key=lambda p: -len(p.parts)):
            fsync_path(d)
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # a corrupt leftover: we hold the lock, so replace it
            self.remove(key)
        os.rename(tmp, dest)
        fsync_path(dest.parent)
        return Artifact(key, dest, manifest)

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, key: str) -> None:
        """Move aside, then delete: a reader never sees a half-deleted artifact as whole."""
        path = self.path(key)
        if not path.exists():
            return
        trash = temp_name(self.tmp / key, ".trash")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_tmp(self) -> int:
        """Remove builds left by processes that no longer run. Returns how many."""
        removed = 0
        for entry in self.tmp.iterdir():
            pid = temp_owner(entry.name)
            if pid is None or not _pid_alive(pid) or entry.name.endswith(".trash"):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- a shared (remote) cache -------------------------------------------
    def pull(self, key: str) -> Artifact | None:
        """Copy `key` (and what it requires) from the shared cache, verify every byte, rename into place."""
        if self.remote is None:
            return None
        manifest = self.remote.read_manifest(key)
        if manifest is None:
            return None
        for dep in manifest.get("requires", []):
            if self.get(dep) is None and self.pull(dep) is None:
                self.pull_problems[key] = f"it builds on {dep[:12]}, which could not be pulled"
                return None
        tmp = temp_name(self.tmp / key)
        (tmp / DATA).mkdir(parents=True)
        try:
            got = self.remote.fetch(key, tmp)
            if isinstance(got, str):
                self.pull_problems[key] = got
                return None
            for f in (tmp / DATA).rglob("*"):
                if f.is_file():
                    f.chmod(0o444)
            with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
                json.dump(got, fh, indent=1, sort_keys=True, ensure_ascii=False)
            with self.lock(key):
                art = self.get(key)
                if art is not None:
                    return art
                dest = self.path(key)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():
                    self.remove(key)
                os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        art = self.get(key)
        if art is None:
            self.pull_problems[key] = "the pulled copy does not match its manifest"
        return art

    def push(self, key: str) -> bool:
        """Copy a local artifact (and what it requires) to the shared cache unless it has it. True if copied."""
        if self.remote is None:
            return False
        art = self.get(key)
        if art is None:
            return False
        for dep in art.manifest.get("requires", []):
            self.push(dep)
        return self.remote.push(art.path, art.manifest)

    # -- refs --------------------------------------------------------------
    def ref_path(self, name: str) -> Path:
        return self.refs / f"{name}.json"

    def read_ref(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self.ref_path(name), encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def write_ref(self, name: str, value: dict[str, Any]) -> None:
        """A ref is {"steps": {step: {"key": ...}, ...}, ...}; gc keeps every key a ref names."""
        write_json_atomic(self.ref_path(name), value)

    # -- catalogs ------------------------------------------------------------
    def catalog_current(self, catalog: Path, keys: dict[str, str]) -> bool:
        """Whether `catalog` was written for the artifacts `keys` (step -> key) and is untouched since (checked
        by stat, without opening it: a cached apply stays free of DuckDB)."""
        try:
            with open(catalog.with_suffix(".json"), encoding="utf-8") as f:
                note = json.load(f)
            st = catalog.stat()
        except (OSError, ValueError):
            return False
        return (
            isinstance(note, dict)
            and note.get("keys") == hash_json(keys)
            and note.get("stat") == [st.st_size, st.st_mtime_ns, st.st_ino]
        )

    def catalog_written(self, catalog: Path, keys: dict[str, str]) -> None:
        st = catalog.stat()
        write_json_atomic(
            catalog.with_suffix(".json"), {"keys": hash_json(keys), "stat": [st.st_size, st.st_mtime_ns, st.st_ino]}
        )

    # -- what gc keeps ------------------------------------------------------
    def pin(self, key: str) -> None:
        """Protect `key` from gc while this process runs (call before building or reading it)."""
        if key not in self._pinned:
            self._pinned.add(key)
            write_json_atomic(self._pin_file, sorted(self._pinned), durable=False)  # a pin dies with its process

    def unpin(self) -> None:
        self._pinned.clear()
        self._pin_file.unlink(missing_ok=True)

    def pinned_keys(self) -> set[str]:
        """Keys pinned by running processes; pins of dead processes are removed."""
        keys: set[str] = set()
        for f in self.pins.glob("*.json"):
            pid = temp_owner(f.name)
            if pid is not None and not _pid_alive(pid):
                f.unlink(missing_ok=True)
                continue
            try:
                keys.update(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue  # being rewritten: its keys are in the next read
        return keys

    def closure(self, keys: set[str]) -> set[str]:
        """`keys` and every artifact they require (a view's base), transitively."""
        todo, live = list(keys), set()
        while todo:
            key = todo.pop()
            if key not in live:
                live.add(key)
                todo.extend((self.read_manifest(self.path(key)) or {}).get("requires", []))
        return live

    def ref_keys(self, skip: Collection[str] = ()) -> set[str]:
        """Keys the refs name (but those in `skip`, refs about to be dropped)."""
        keys: set[str] = set()
        for ref in self.refs.glob("*.json"):
            if ref.stem in skip:
                continue
            value = self.read_ref(ref.stem) or {}
            keys.update(s["key"] for s in value.get("steps", {}).values() if isinstance(s, dict) and "key" in s)
        return keys

    def gc(self, *, dry_run: bool = False, keep: set[str] | None = None, drop_refs: Collection[str] = ()) -> list[str]:
        """Delete artifacts that no ref (but `drop_refs`), no running apply's pin and nothing in `keep` names,
        nor anything those require. Returns the deleted (or, with `dry_run`, the doomed) keys."""
        listed = list(self.keys())  # listed before the pins are read: a build commits only after pinning
        live = self.closure(self.ref_keys(drop_refs) | self.pinned_keys() | (keep or set()))
        dead = [k for k in listed if k not in live]
        if dry_run:
            return dead
        for ref in drop_refs:
            self.ref_path(ref).unlink(missing_ok=True)
        self.clean_tmp()
        deleted = []
        pins: frozenset[str] | None = None
        guarded: set[str] = set()
        for key in dead:
            with self.lock(key):
                now = frozenset(self.pinned_keys())
                if now != pins:  # pinned since: an apply has started to use it (and what it builds on)
                    pins, guarded = now, self.closure(set(now))
                if key in guarded:
                    continue
                self.remove(key)
            (self.locks / f"{key}.lock").unlink(missing_ok=True)
            deleted.append(key)
        return deleted

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.artifacts.rglob("*") if f.is_file())
