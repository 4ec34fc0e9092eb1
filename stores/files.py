"""Writing files so that a reader never sees half of one: unique temp names beside the target, fsync,
rename. One place for what the cache, the data store and the vector store all do."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any


def temp_name(path: Path, suffix: str = "") -> Path:
    """A name beside `path` (same directory, so a rename is atomic) that no other process or call picks."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def temp_owner(name: str) -> int | None:
    """The process id in a name `temp_name` made (None for any other name)."""
    m = re.search(r"\.(\d+)\.[0-9a-f]{8}(\.[A-Za-z]+)?$", name)
    return int(m.group(1)) if m else None


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's (its entries') contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any, *, durable: bool = True) -> None:
    """Write JSON next to `path`, fsync it (unless not `durable`: state that dies with the process),
    rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True, ensure_ascii=False)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
