"""The DuckDB data store: Parquet tables inside artifacts, queried in place, and a catalog of views.

Rows of conversation data share one schema (see `ROW_COLUMNS`): `group_id` keeps rows that
share a conversation (an oasst tree, a record) on one side of the split, `tools` is the JSON
list of tool schemas a conversation may call. Macros every connection
has, for filters and for `runner sql`:

    prompt_of(turns)    text of the first user turn
    response_of(turns)  text of the last assistant turn
    text_of(turns)      all turn texts joined by newlines
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

if TYPE_CHECKING:
    import pyarrow as pa

from stores.files import temp_name
from stores.sql import sql_string

ROW_COLUMNS = (
    "id VARCHAR, source VARCHAR, turns STRUCT(role VARCHAR, text VARCHAR)[], score DOUBLE, lang VARCHAR, "
    "group_id VARCHAR, tools VARCHAR"
)
REJECT_COLUMNS = "id VARCHAR, source VARCHAR, step VARCHAR, reason VARCHAR, detail VARCHAR"

_MACROS = [
    "create or replace macro prompt_of(turns) as list_filter(turns, lambda t: t.role = 'user')[1].text",
    "create or replace macro response_of(turns) as list_filter(turns, lambda t: t.role = 'assistant')[-1].text",
    "create or replace macro text_of(turns) as array_to_string(list_transform(turns, lambda t: t.text), chr(10))",
]


def connect(
    database: str | Path = ":memory:", *, read_only: bool = False, search_path: Path | None = None
) -> duckdb.DuckDBPyConnection:
    """A connection with runner's macros; relative file paths resolve against `search_path` when given."""
    config: dict[str, str | bool | int | float | list[str]] = (
        {"file_search_path": str(search_path)} if search_path is not None else {}
    )
    # RUNNER_DUCKDB_MEMORY bounds DuckDB's memory: beyond it, sorts, windows and joins spill to disk (never
    # to the working directory); unset, DuckDB takes up to 80% of RAM as it needs
    if os.environ.get("RUNNER_DUCKDB_MEMORY"):
        config["memory_limit"] = os.environ["RUNNER_DUCKDB_MEMORY"]
    config["temp_directory"] = os.path.join(tempfile.gettempdir(), "runner-duckdb")
    con = duckdb.connect(str(database), read_only=read_only, config=config)
    # insertion order is what keeps outputs byte-identical run to run
    con.execute("set preserve_insertion_order = true")
    if not read_only:
        for macro in _MACROS:
            con.execute(macro)
    return con


quote_path = sql_string


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def write_parquet(con: duckdb.DuckDBPyConnection, query: str, path: Path) -> int:
    """Write the result of `query` to a Parquet file; returns its row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    result = con.execute(
        f"copy ({query}) to {quote_path(path)} (format parquet, compression zstd, row_group_size 100000)"
    )
    return int(result.fetchall()[0][0])


def table_sql(
    artifact: Path, manifest: dict[str, Any], table: str, locate: Callable[[str], Path], *, row_numbers: bool = False
) -> str:
    """SQL reading one table of the artifact in directory `artifact`, given its manifest.

    A table is either a Parquet file in the artifact (`manifest["tables"][table]`), or a *masked
    view* (`manifest["views"][table]`): the rows of another artifact's Parquet table (`base`, a
    key that `locate` turns into that artifact's directory; None: this artifact's own file) where
    a boolean `keep` column, one value per base row and stored in this artifact, is true; with
    `select`, a select list computing the view's columns from the base file's (a Parquet source
    keeps its input file as it is, and its rows are computed from it as they are read). Filters
    write views, so a chain of filters stores each row once. Without `row_numbers` rows come in
    their stored order; with it, `file_row_number` (the row's position in the Parquet file it
    lives in) comes along and the order is the reader's to impose (`order by file_row_number`),
    which saves a sort.
    """
    view = manifest.get("views", {}).get(table)
    if view is not None:
        base_dir = artifact if view["base"] is None else locate(view["base"])
        base = f"read_parquet({quote_path(base_dir / 'data' / view['base_file'])}, file_row_number = true)"
        if view.get("select"):  # the base file's own columns, computed into the view's (a source's input file)
            base = f"(select {view['select']}, file_row_number from {base})"
        mask = f"read_parquet({quote_path(artifact / 'data' / view['mask'])}, file_row_number = true)"
        # a semi join on row numbers runs in parallel (a positional join does not); it may reorder rows
        rows = f"(select * from {base} where file_row_number in (select file_row_number from {mask} where keep))"
        if row_numbers:
            return rows
        return f"(select * exclude (file_row_number) from {rows} order by file_row_number)"
    rel = manifest.get("tables", {}).get(table)
    if rel is None:
        raise KeyError(f"artifact has no table {table!r}")
    extra = ", file_row_number = true" if row_numbers else ""
    return f"read_parquet({quote_path(artifact / 'data' / rel)}{extra})"


def view_name(step: str, table: str) -> str:
    """`filter.length` + `rows` -> filter_length; other tables get a suffix: filter_length__rejects."""
    base = "".join(c if c.isalnum() else "_" for c in step)
    return base if table == "rows" else f"{base}__{table}"


def write_catalog(path: Path, tables: dict[str, str], root: Path) -> None:
    """(Re)write a catalog database with one view per table (name -> SQL from `table_sql`, with paths
    relative to `root`, the cache), read in place. A view `_runner_catalog` holds the hash of what the
    catalog says.

    Built in a temp file and renamed, so a reader never opens a half-written catalog.
    """
    from stores.hashing import hash_json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    con = connect(tmp, search_path=root)
    try:
        for name, sql in sorted(tables.items()):
            con.execute(f"create view {quote_ident(name)} as select * from {sql}")
        con.execute(f"create view _runner_catalog as select '{hash_json(tables)}' as tables_hash")
        con.execute("checkpoint")
    finally:
        con.close()
    os.replace(tmp, path)
    Path(str(tmp) + ".wal").unlink(missing_ok=True)


READ_STATEMENTS = ("SELECT", "EXPLAIN")


def _read_only(con: duckdb.DuckDBPyConnection, sql: str, allowed: list[str]) -> pa.Table:
    """Run `sql` if it only reads, with file access limited to `allowed` directories."""
    for statement in con.extract_statements(sql):
        kind = statement.type.name
        if kind not in READ_STATEMENTS:
            raise PermissionError(
                f"{kind} statements are not allowed: runner sql only reads (SELECT, EXPLAIN); "
                "to export rows, use the recipe's export: step or --json"
            )
    con.execute(f"set allowed_directories = [{', '.join(quote_path(a) for a in allowed)}]")
    con.execute("set enable_external_access = false")
    con.execute("set lock_configuration = true")
    return con.sql(sql).to_arrow_table()


def query_folder(folder: Path, sql: str) -> pa.Table:
    """Run read-only `sql` over a folder's Parquet files, a view each named by its file's stem (what
    `runner compare --out` writes); no other file can be read."""
    folder = folder.resolve()
    con = connect()
    try:
        for path in sorted(folder.glob("*.parquet")):
            con.execute(f"create view {quote_ident(path.stem)} as select * from read_parquet({quote_path(str(path))})")
        return _read_only(con, sql, [str(folder) + os.sep])
    finally:
        con.close()


def query(catalog: Path, sql: str, root: Path) -> pa.Table:
    """Run read-only `sql` against a catalog whose views read the cache at `root`: the database is opened
    read-only, statements other than SELECT/EXPLAIN are refused, and files outside the cache's artifacts
    cannot be read or written. Returns the result as an Arrow table."""
    con = connect(catalog, read_only=True, search_path=root)
    try:
        # the views' paths are relative (resolved by file_search_path); absolute ones name the same files
        return _read_only(con, sql, [str(root / "artifacts") + os.sep, "artifacts/"])
    finally:
        con.close()
