"""The split step: a deterministic train/validation split by hashing (seed, group key).

Rows of one group (an OpenAssistant tree, a record and its weighted copies, a table's group
column) always land on the same side, so validation never shares a conversation with training.
Both sides are masked views of the formatted rows: the split writes two boolean masks, not the rows.
"""

from __future__ import annotations

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, StepError, step

GROUP_KEYS = {
    "auto": "group_id",  # what the source says: the oasst tree, else the record (a table's `columns.group`)
    "row": "id",
    "prompt": "prompt",  # the whole prompt text: the same question asked twice stays on one side
}


class Split(Params):
    """Which rows are held out. A row's side depends only on its group key and the seed, never on other rows."""

    validation: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of groups held out for validation")
    seed: int = 0
    group_by: str = Field(
        "auto",
        min_length=1,
        description="what keeps rows together: `auto` (the conversation tree for oasst, the record otherwise), "
        "`row`, `prompt` (identical prompt text), or a column of the table sources (read into the group)",
    )


@step("split", version="2", params=Split, libs=("duckdb",))
def split_rows(ctx: StepContext) -> None:
    from runner.steps.tables import check_balance, scalar
    from stores.datastore import connect, quote_path

    p: Split = ctx.params
    inp = ctx.input()
    if "rows" not in inp.manifest.get("tables", {}):
        raise StepError(f"split needs a materialized input table; {inp.manifest.get('built_as')} has none")
    rows_file = inp.manifest["tables"]["rows"]
    group = GROUP_KEYS.get(p.group_by, "group_id")  # a column name was read into group_id by the sources
    # md5, not hash(): a row's side must not move when DuckDB changes its hash function
    side = f"md5_number('{p.seed}:' || coalesce({group}, id)) % 1000000 < {round(p.validation * 1_000_000)}"
    con = connect()
    try:
        counts = {}
        con.execute(
            f"create temp table s as select {side} as val, coalesce({group}, id) as g, "
            f"coalesce(group_id, id) as conversation from read_parquet({quote_path(inp.file(rows_file))})"
        )
        for name, keep in (("train", "not val"), ("validation", "val")):
            mask = f"{name}.mask.parquet"
            con.execute(
                f"copy (select {keep} as keep from s) to {quote_path(ctx.out / mask)} (format parquet, compression zstd)"
            )
            counts[name] = scalar(con, f"select count(*) from read_parquet({quote_path(ctx.out / mask)}) where keep")
            ctx.view(name, inp, rows_file, mask, counts[name])
            ctx.metrics[f"{name}_groups"] = int(scalar(con, f"select count(distinct g) from s where {keep}"))
        ctx.metrics["group_by"] = p.group_by
        # rows whose conversation has rows on the other side: 0 unless group_by splits conversations up
        ctx.metrics["leaked_rows"] = int(
            scalar(
                con,
                "select count(*) from s where conversation in "
                "(select conversation from s group by 1 having count(distinct val) > 1)",
            )
        )
        check_balance(ctx, int(inp.manifest["rows"]["rows"]), counts["train"] + counts["validation"], 0)
    finally:
        con.close()
