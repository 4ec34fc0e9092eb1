"""The export step: the train/validation split as JSONL, Parquet and/or a `datasets` dataset on disk."""

from __future__ import annotations

from typing import Literal, cast

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, step

ExportFormat = Literal["jsonl", "parquet", "datasets"]


class Export(Params):
    """Formats to write the split in (inside the step's artifact; `runner show RECIPE export --path`)."""

    formats: list[ExportFormat] = Field(default_factory=lambda: cast(list[ExportFormat], ["jsonl"]), min_length=1)


@step("export", version="1", params=Export, libs=("duckdb", "datasets"))
def export_split(ctx: StepContext) -> None:
    from runner.steps.tables import open_input, scalar
    from stores.datastore import connect, quote_path

    p: Export = ctx.params
    con = connect()
    try:
        parts = {}
        for split in ("train", "validation"):
            source = open_input(ctx, table=split)
            if "jsonl" in p.formats:
                con.execute(f"copy (select * from {source}) to {quote_path(ctx.out / f'{split}.jsonl')} (format json)")
            if "parquet" in p.formats:
                con.execute(
                    f"copy (select * from {source}) to {quote_path(ctx.out / f'{split}.parquet')} "
                    "(format parquet, compression zstd)"
                )
            ctx.rows[split] = int(scalar(con, f"select count(*) from {source}"))
            if "datasets" in p.formats:
                parts[split] = con.sql(f"select * from {source}").fetch_record_batch(100_000).read_all()
        if "datasets" in p.formats:
            import datasets

            datasets.disable_progress_bars()
            dd = datasets.DatasetDict({split: datasets.Dataset(table) for split, table in parts.items()})
            dd.save_to_disk(str(ctx.out / "datasets"))
    finally:
        con.close()
