"""The split step: a deterministic train/validation split by hashing (seed, row id)."""

from __future__ import annotations

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, step


class Split(Params):
    """Which rows are held out. A row's side depends only on its id and the seed, not on the other rows."""

    validation: float = Field(0.1, ge=0.0, lt=1.0, description="fraction held out for validation")
    seed: int = 0


@step("split", version="1", params=Split, libs=("duckdb",))
def split_rows(ctx: StepContext) -> None:
    from runner.steps.tables import open_input, scalar
    from stores.datastore import connect, write_parquet

    p: Split = ctx.params
    con = connect()
    try:
        side = f"md5_number('{p.seed}:' || id) % 1000000 < {round(p.validation * 1_000_000)}"
        con.execute(f"create temp table t as select *, {side} as _val from {open_input(ctx, row_numbers=True)}")
        for name, cond in (("train", "not _val"), ("validation", "_val")):
            n = write_parquet(
                con, f"select * exclude (_val, file_row_number) from t where {cond} order by file_row_number",
                ctx.out / f"{name}.parquet",
            )
            ctx.table(name, f"{name}.parquet", n)
        ctx.rows["in"] = scalar(con, "select count(*) from t")
        if ctx.rows["in"] != ctx.rows["train"] + ctx.rows["validation"]:
            raise RuntimeError(f"split lost rows: {ctx.rows}")
    finally:
        con.close()
