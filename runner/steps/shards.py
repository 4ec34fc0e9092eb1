"""A data step's input cut into shards for tasks on a cluster (`runner.cluster.Pool`), and what the tasks
and the driver share: reading a shard as the step's input has its rows, writing a task's output whole into
the store, and writing the step's mask and rejects from the tasks' rejects with `tables.finish_view`, the
statements a local run uses (so the bytes cannot differ).

Shards are runs of whole row groups of the input's base Parquet file (a masked view's base, read through
its mask), about $RUNNER_SHARD_ROWS rows each (default 250,000). A task's output appears whole under
`shards/<key>/` in the store, and a task whose output is there does nothing (`cluster.RESUMED`): a task
retried after its worker died writes the same bytes, and an apply stopped midway resumes from what is done.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.registry import StepContext, StepError
from stores.sql import sql_string

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from runner.cluster import Pool, ShardStore

SHARD_ROWS = 250_000  # rows per shard (whole row groups), unless $RUNNER_SHARD_ROWS says otherwise


@dataclass(frozen=True)
class Shard:
    """Rows `first_row` to `first_row + rows` of a Parquet file (row groups `groups`), where `mask` (a
    Parquet file of one `keep` per row of that file) keeps them, their columns computed by `select`."""

    index: int
    base: str
    groups: tuple[int, int]
    first_row: int
    rows: int
    mask: str | None = None
    select: str | None = None


@dataclass(frozen=True)
class Job:
    """What every task of a step gets."""

    step: str
    params: Any
    files: dict[str, Path]
    reject: str
    store: ShardStore
    parts: int


def shard_rows() -> int:
    value = os.environ.get("RUNNER_SHARD_ROWS")
    try:
        return max(1, int(value)) if value else SHARD_ROWS
    except ValueError:
        raise StepError(f"RUNNER_SHARD_ROWS={value!r}: expected a number of rows") from None


def plan_shards(ctx: StepContext, pool: Pool) -> list[Shard]:
    """The step's input cut into shards of whole row groups of its base file."""
    import pyarrow.parquet as pq

    inp = ctx.input()
    view = inp.manifest.get("views", {}).get("rows")
    if view is not None:
        base = inp if view["base"] is None else ctx.artifact(view["base"])
        base_file, mask, select = view["base_file"], pool.locate(inp, view["mask"]), view.get("select")
    else:
        base, base_file, mask, select = inp, inp.manifest["tables"]["rows"], None, None
    meta = pq.ParquetFile(base.file(base_file)).metadata
    url = pool.locate(base, base_file)
    shards: list[Shard] = []
    target, start, first, count = shard_rows(), 0, 0, 0
    for g in range(meta.num_row_groups):
        count += meta.row_group(g).num_rows
        if count >= target or g == meta.num_row_groups - 1:
            shards.append(Shard(len(shards), url, (start, g + 1), first, count, mask, select))
            start, first, count = g + 1, first + count, 0
    return shards


@contextmanager
def task_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="runner-shard-") as tmp:
        yield Path(tmp)


def connect_task() -> duckdb.DuckDBPyConnection:
    from stores.datastore import connect

    con = connect()
    con.execute("set threads = 1")  # a task holds one CPU of the cluster
    return con


def read_rows(url: str, first: int, count: int, column: str | None = None) -> pa.Table:
    """Rows `first` to `first + count` of a Parquet file (reading only the row groups that hold them)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, offset, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            if at + size > first and at < first + count:
                groups.append(g)
                offset = at if offset is None else offset
            at += size
        table = pf.read_row_groups(groups, columns=[column] if column else None)
    if offset is None:
        return pa.table({column: pa.array([], pa.bool_())}) if column else table
    return table.slice(first - offset, count)


def read_shard(shard: Shard) -> pa.Table:
    """The shard's rows as the step's input has them, with `file_row_number` (the row's number in its base
    file), in that order."""
    import fsspec
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(shard.base, "rb") as f:
        table = pq.ParquetFile(f).read_row_groups(list(range(*shard.groups)))
    numbers = np.arange(shard.first_row, shard.first_row + table.num_rows, dtype=np.int64)
    table = table.append_column("file_row_number", pa.array(numbers))
    if shard.mask is not None:
        table = table.filter(read_rows(shard.mask, shard.first_row, table.num_rows, "keep").column("keep"))
    return table


def shard_sql(con: duckdb.DuckDBPyConnection, shard: Shard) -> str:
    """Register the shard's rows in `con`; SQL of them (the columns of the step's input and file_row_number)."""
    con.register("_raw", read_shard(shard))
    return f"(select {shard.select}, file_row_number from _raw)" if shard.select else "_raw"


def copy_to_store(con: duckdb.DuckDBPyConnection, sql: str, store: ShardStore, rel: str, tmp: Path) -> None:
    local = tmp / rel.replace("/", "_")
    con.execute(f"copy ({sql}) to {sql_string(local)} (format parquet, compression zstd)")
    store.put(local, rel)


def read_all(store: ShardStore, names: list[str], tmp: Path) -> str:
    """SQL reading the store's Parquet files `names` (copied into the directory `tmp`) as one table, in that
    order."""
    files = [store.get(name, tmp / name.replace("/", "_")) for name in names]
    return f"read_parquet([{', '.join(sql_string(f) for f in files)}])"


def finish_mask(ctx: StepContext, pool: Pool, rejects: list[str]) -> None:
    from runner.steps.tables import finish_view
    from stores.datastore import connect

    rows = read_all(pool.store, rejects, ctx.scratch / "shards")
    con = connect()
    try:
        finish_view(ctx, con, f"select n, id, source, {{'reason': reason, 'detail': detail}} as _reject from {rows}")
    finally:
        con.close()
