"""What every data step shares: reading inputs (tables or masked views), writing rows/rejects/masks,
and the `in = out + rejected` check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.registry import StepContext, StepError
from stores.sql import sql_string

if TYPE_CHECKING:
    import duckdb

ROWS = "rows.parquet"
REJECTS = "rejects.parquet"
MASK = "mask.parquet"


def open_input(ctx: StepContext, name: str | None = None, table: str = "rows", row_numbers: bool = False) -> str:
    """SQL reading one table of an input artifact (a Parquet file or a masked view), in order.

    With `row_numbers`, `file_row_number` gives each row's position in the Parquet file it lives in.
    """
    from stores.datastore import table_sql

    art = ctx.input(name)
    try:
        return table_sql(art.path, art.manifest, table, lambda key: ctx.artifact(key).path, row_numbers=row_numbers)
    except KeyError:
        raise StepError(f"step {ctx.name}: input {art.manifest.get('built_as')} has no table {table!r}") from None


def check_balance(ctx: StepContext, rows_in: int, accounted: int, rejected: int) -> None:
    ctx.rows["in"] = rows_in
    if rows_in != accounted + rejected:
        raise RuntimeError(f"step {ctx.name} lost input: in={rows_in} used={accounted} rejected={rejected}")


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
    if used is not None:
        ctx.rows[f"{unit}_used"] = used
    check_balance(ctx, rows_in, kept if used is None else used, rejected)


def finish_rewritten(ctx: StepContext, con: duckdb.DuckDBPyConnection) -> None:
    """A filter that rewrites rows: write the kept rows and the rejects of temp table `t` (every input row,
    rewritten, with `file_row_number` and its `_reject`), in input order."""
    finish(
        ctx,
        con,
        "select * exclude (_reject, file_row_number) from t where _reject is null order by file_row_number",
        f"select id, source, {sql_string(ctx.name)} as step, _reject.reason as reason, "
        "_reject.detail as detail from t where _reject is not null order by file_row_number",
        scalar(con, "select count(*) from t"),
    )


def finish_view(ctx: StepContext, con: duckdb.DuckDBPyConnection, rejected_sql: str) -> None:
    """A filter's output as a masked view of its input's base table: write only the mask and the rejects.

    `rejected_sql` selects (n, id, source, _reject) of the dropped rows, n being the base row number and
    _reject a struct of the stable reason and the row's detail (see `reasons.rejected`).
    """
    from stores.datastore import quote_path, write_parquet

    inp = ctx.input()
    view = inp.manifest.get("views", {}).get("rows")
    if view is not None:  # the same base and columns, through a new mask
        base, base_file = inp if view["base"] is None else ctx.artifact(view["base"]), view["base_file"]
        keep_in = f"read_parquet({quote_path(inp.file(view['mask']))}, file_row_number = true)"
        keep_in = f"(select file_row_number as n, keep from {keep_in})"
    else:
        base, base_file = inp, inp.manifest["tables"]["rows"]
        keep_in = f"(select i as n, true as keep from range({int(inp.manifest['rows']['rows'])}) t(i))"
    con.execute(f"create temp table _rejected as {rejected_sql}")
    rejected = write_parquet(
        con,
        f"select id, source, {sql_string(ctx.name)} as step, _reject.reason as reason, _reject.detail as detail "
        "from _rejected order by n",
        ctx.out / REJECTS,
    )
    kept = write_mask(ctx, con, keep_in)
    ctx.view("rows", base, base_file, MASK, kept, view and view.get("select"))
    ctx.table("rejects", REJECTS, rejected, side=True)
    check_balance(ctx, int(inp.manifest["rows"]["rows"]), kept, rejected)


def write_mask(ctx: StepContext, con: duckdb.DuckDBPyConnection, keep_in: str) -> int:
    """Write the step's mask, one `keep` per base row in base order: kept in `keep_in` (SQL of n, keep) and not
    in the temp table `_rejected` (its base row numbers in `n`). Returns how many rows it keeps."""
    from stores.datastore import quote_path

    con.execute(
        f"copy (select k.keep and r.n is null as keep from {keep_in} k left join _rejected r using (n) "
        f"order by k.n) to {quote_path(ctx.out / MASK)} (format parquet, compression zstd)"
    )
    return int(scalar(con, f"select count(*) from read_parquet({quote_path(ctx.out / MASK)}) where keep"))


def load_table(con: duckdb.DuckDBPyConnection, name: str, columns: str, rows: list[dict[str, Any]]) -> None:
    """Create table `name` (DuckDB column DDL) holding `rows` (dicts keyed by column name)."""
    con.execute(f"create table {name} ({columns})")
    if rows:
        import pyarrow as pa

        con.register(f"_{name}_in", pa.Table.from_pylist(rows))
        con.execute(f"insert into {name} by name select * from _{name}_in")
        con.unregister(f"_{name}_in")


def scalar(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    rows = con.execute(sql).fetchall()  # fetch all: DuckDB wants a result finished before the next query
    return rows[0][0] if rows else None
