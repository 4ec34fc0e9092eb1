"""SQL text: the one way a string or a path enters a SQL statement here (no duckdb import, so the
modules that build SQL stay cheap to import)."""

from __future__ import annotations

from pathlib import Path


def sql_string(text: str | Path) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(text).replace("'", "''") + "'"
