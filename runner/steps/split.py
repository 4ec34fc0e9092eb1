"""The split step: a deterministic train/validation split by hashing (seed, row id).

Both sides are masked views of the formatted rows: the split writes two boolean masks, not the rows.
"""

from __future__ import annotations

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, StepError, step


class Split(Params):
    """Which rows are held out. A row's side depends only on its id and the seed, not on the other rows."""

    validation: float = Field(0.1, ge=0.0, lt=1.0, description="fraction held out for validation")
    seed: int = 0


@step("split", version="1", params=Split, libs=("duckdb",))
def split_rows(ctx: StepContext) -> None:
    from runner.steps.tables import check_balance, scalar
    from stores.datastore import connect, quote_path

    p: Split = ctx.params
    inp = ctx.input()
    if "rows" not in inp.manifest.get("tables", {}):
        raise StepError(f"split needs a materialized input table; {inp.manifest.get('built_as')} has none")
    rows_file = inp.manifest["tables"]["rows"]
    side = f"md5_number('{p.seed}:' || id) % 1000000 < {round(p.validation * 1_000_000)}"
    con = connect()
    try:
        counts = {}
        # md5, not hash(): a row's side must not move when DuckDB changes its hash function
        con.execute(f"create temp table s as select {side} as val from read_parquet({quote_path(inp.file(rows_file))})")
        for name, keep in (("train", "not val"), ("validation", "val")):
            mask = f"{name}.mask.parquet"
            con.execute(f"copy (select {keep} as keep from s) to {quote_path(ctx.out / mask)} (format parquet, compression zstd)")
            counts[name] = scalar(con, f"select count(*) from read_parquet({quote_path(ctx.out / mask)}) where keep")
            ctx.view(name, inp, rows_file, mask, counts[name])
        check_balance(ctx, int(inp.manifest["rows"]["rows"]), counts["train"] + counts["validation"], 0)
    finally:
        con.close()
