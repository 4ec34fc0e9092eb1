"""What every data step shares: the rows/rejects outputs and the `in = out + rejected` check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.registry import StepContext, StepError

if TYPE_CHECKING:
    import duckdb

ROWS = "rows.parquet"
REJECTS = "rejects.parquet"


def open_input(ctx: StepContext, name: str | None = None, table: str = "rows", row_numbers: bool = False) -> str:
    """A SQL expression reading one table of an input artifact (with its `file_row_number` if asked)."""
    from stores.datastore import quote_path

    art = ctx.input(name)
    rel = art.manifest.get("tables", {}).get(table)
    if rel is None:
        raise StepError(f"step {ctx.name}: input {art.manifest.get('built_as')} has no table {table!r}")
    extra = ", file_row_number = true" if row_numbers else ""
    return f"read_parquet({quote_path(art.file(rel))}{extra})"


def finish(
    ctx: StepContext,
    con: duckdb.DuckDBPyConnection,
    rows_sql: str,
    rejects_sql: str,
    rows_in: int,
    *,
    used: int | None = None,
    unit: str = "rows",
) -> None:
    """Write rows and rejects, record counts, and check that every input unit is accounted for.

    Usually one input row gives one output row (`used` = rows kept). A source that turns
    units (e.g. oasst messages) into rows passes how many units the rows used, and `unit`.
    """
    from stores.datastore import write_parquet

    kept = write_parquet(con, rows_sql, ctx.out / ROWS)
    rejected = write_parquet(con, rejects_sql, ctx.out / REJECTS)
    ctx.table("rows", ROWS, kept)
    ctx.table("rejects", REJECTS, rejected, side=True)
    ctx.rows["in"] = rows_in
    if used is not None:
        ctx.rows[f"{unit}_used"] = used
    accounted = kept if used is None else used
    if rows_in != accounted + rejected:
        raise RuntimeError(f"step {ctx.name} lost input: in={rows_in} used={accounted} rejected={rejected}")


def scalar(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    row = con.execute(sql).fetchone()
    return row[0] if row else None
