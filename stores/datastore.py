"""The DuckDB data store: Parquet tables inside artifacts, queried in place, and a catalog of views.

Rows of conversation data share one schema (see `ROW_COLUMNS`). Macros every connection
has, for filters and for `runner sql`:

    prompt_of(turns)    text of the first user turn
    response_of(turns)  text of the last assistant turn
    text_of(turns)      all turn texts joined by newlines
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import duckdb

ROW_COLUMNS = "id VARCHAR, source VARCHAR, turns STRUCT(role VARCHAR, text VARCHAR)[], score DOUBLE, lang VARCHAR"
REJECT_COLUMNS = "id VARCHAR, source VARCHAR, step VARCHAR, reason VARCHAR"

_MACROS = [
    "create or replace macro prompt_of(turns) as list_filter(turns, lambda t: t.role = 'user')[1].text",
    "create or replace macro response_of(turns) as list_filter(turns, lambda t: t.role = 'assistant')[-1].text",
    "create or replace macro text_of(turns) as array_to_string(list_transform(turns, lambda t: t.text), chr(10))",
]


def connect(database: str | Path = ":memory:", *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(database), read_only=read_only)
    # insertion order is what keeps outputs byte-identical run to run
    con.execute("set preserve_insertion_order = true")
    if not read_only:
        for macro in _MACROS:
            con.execute(macro)
    return con


def quote_path(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def write_parquet(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> int:
    """Write the result of `query` to a Parquet file; returns its row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con.execute(f"copy ({query}) to {quote_path(path)} (format parquet, compression zstd, row_group_size 100000)")
    return int(con.execute(f"select count(*) from read_parquet({quote_path(path)})").fetchone()[0])  # type: ignore[index]


def count_rows(path: Path) -> int:
    con = duckdb.connect()
    try:
        return int(con.execute(f"select count(*) from read_parquet({quote_path(path)})").fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


def view_name(step: str, table: str) -> str:
    """`filter.length` + `rows` -> filter_length; other tables get a suffix: filter_length__rejects."""
    base = "".join(c if c.isalnum() else "_" for c in step)
    return base if table == "rows" else f"{base}__{table}"


def write_catalog(path: Path, tables: dict[str, Path]) -> None:
    """(Re)write a catalog database whose views read the given Parquet files in place.

    Built in a temp file and renamed, so a reader never opens a half-written catalog.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    con = connect(tmp)
    try:
        for name, file in sorted(tables.items()):
            con.execute(f"create view {quote_ident(name)} as select * from read_parquet({quote_path(file)})")
        con.execute("checkpoint")
    finally:
        con.close()
    os.replace(tmp, path)
    Path(str(tmp) + ".wal").unlink(missing_ok=True)


def query(catalog: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run `sql` against a catalog (its macros are stored in it); returns column names and rows."""
    con = connect(catalog, read_only=True)
    try:
        result = con.execute(sql)
        columns = [d[0] for d in result.description or []]
        return columns, result.fetchall()
    finally:
        con.close()
