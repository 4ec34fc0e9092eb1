"""Content hashing: BLAKE3 over bytes, files and canonical JSON, with a stat cache.

Knows nothing about pipelines. A file is read once: its hash is remembered against
(path, size, mtime_ns, inode, ctime_ns) in a small SQLite table, and re-read only when one
of those changes.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import blake3

CHUNK = 1 << 20


def hash_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def hash_json(value: Any) -> str:
    return hash_bytes(canonical_json(value).encode())


def hash_file_uncached(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if path.stat().st_size > 64 * CHUNK else blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    # ctime too: any write changes it and no one can set it back, so a byte flipped under a restored
    # mtime is still re-read (as git's index does)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class StatCache:
    """Remembers file hashes by stat so unchanged files are never re-read."""

    def __init__(self, db_path: Path | None) -> None:
        self._db: sqlite3.Connection | None = None
        self._memo: dict[tuple[str, tuple[int, int, int, int]], str] = {}
        self.hashed: dict[str, tuple[int, int, int, int]] = {}  # every file hashed -> the stat that vouched for it
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = sqlite3.connect(db_path, timeout=30, isolation_level=None)
                self._db.execute("pragma journal_mode=wal")
                self._db.execute(
                    "create table if not exists hashes2 (path text primary key, size int, mtime int, "
                    "ino int, ctime int, hash text)"
                )
            except sqlite3.Error:
                self._db = None  # a broken stat cache only costs speed

    def hash_file(self, path: Path) -> str:
        path = Path(os.path.abspath(path))
        st = path.stat()
        stat = _stat_key(st)
        self.hashed.setdefault(str(path), stat)
        memo_key = (str(path), stat)
        if memo_key in self._memo:
            return self._memo[memo_key]
        digest = self._lookup(str(path), stat)
        if digest is None:
            digest = hash_file_uncached(path)
            self._store(str(path), stat, digest)
        self._memo[memo_key] = digest
        return digest

    def hash_tree(self, root: Path) -> str:
        """Hash of a file, or of a directory as its sorted (relative path, file hash) pairs."""
        if root.is_file():
            return self.hash_file(root)
        entries = {p.relative_to(root).as_posix(): self.hash_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
        return hash_json(entries)

    def _lookup(self, path: str, stat: tuple[int, int, int, int]) -> str | None:
        if self._db is None:
            return None
        try:
            row = self._db.execute(
                "select size, mtime, ino, ctime, hash from hashes2 where path = ?", (path,)
            ).fetchone()
        except sqlite3.Error:
            return None
        if row is not None and tuple(row[:4]) == stat:
            return str(row[4])
        return None

    def _store(self, path: str, stat: tuple[int, int, int, int], digest: str) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("insert or replace into hashes2 values (?, ?, ?, ?, ?, ?)", (path, *stat, digest))
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
