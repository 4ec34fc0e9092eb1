"""Filters run as tasks on a cluster (`runner.cluster.Pool`), with the same output as `run_filter`, byte for byte.

The input (a Parquet table or a masked view of one) is cut into shards of whole row groups. Every task reads
its shard from the store the workers share and writes its result there as Parquet; the driver then writes the
step's files from those results with the very statements a local run uses (`tables.finish_view`, `finish`),
so the bytes cannot differ. By the kind of filter:

- a row judged alone (most filters; Python ones too): one task per shard writes that shard's rejects (and,
  for a filter that rewrites text, its kept rows);
- rows compared with each other (`FilterBase.shuffle_by`: exact dedup, sample, limit): a task per shard writes
  the few columns the comparison needs into one file per partition of the compared value's hash; a task per
  partition then judges its rows (every row its window compares is there);
- near_dedup: MinHash signatures per shard; band values shuffled by hash, so that each partition lists the
  pairs of rows sharing a band; the pairs meet the shingle keys of their earlier row, then of their later
  one, and each is confirmed by exact Jaccard. The driver walks the confirmed pairs in row order as the local
  filter walks rows: a row goes when an earlier row that stays is similar enough.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runner.cluster import RESUMED
from runner.registry import StepContext, StepError
from runner.steps.shards import (
    Job,
    Shard,
    connect_task,
    copy_to_store,
    finish_mask,
    plan_shards,
    read_all,
    shard_sql,
    task_dir,
)

if TYPE_CHECKING:
    import duckdb

    from runner.cluster import Pool


def _judged_source(con: duckdb.DuckDBPyConnection, job: Job, shard: Shard, *, derived: bool = True) -> str:
    """SQL of the shard's rows as `run_filter` sees them: rewritten, with derived (unless not `derived`) and
    Python-computed columns."""
    p = job.params
    source = shard_sql(con, shard)
    if p.transform():
        source = f"(select * replace ({p.transform()} as turns) from {source})"
    if derived and p.derived():
        source = f"(select *, {p.derived()} from {source})"
    if p.python_input():
        import pyarrow as pa

        table = con.sql(f"select file_row_number as _n, {p.python_input()} from {source}").to_arrow_table()
        table = table.sort_by("_n").drop(["_n"])
        values = p.python(
            StepContext(name=job.step, params=p, inputs=[], input_names=[], files=job.files, out=Path()), table
        )
        con.register("_py", pa.table({"_id": table.column("id"), "_value": pa.array(values)}))
        source = f"(select s.*, _py._value from {source} s join _py on s.id = _py._id)"
    return source


def judge_task(item: tuple[Job, Shard]) -> str:
    """A filter that judges each row alone, over one shard: its rejects; for a filter that rewrites rows, every
    row (rewritten, with its reject), from which the driver writes the kept ones as `run_filter` does."""
    job, shard = item
    out = f"{'t' if job.params.transform() else 'rej'}/{shard.index:05d}.parquet"
    if job.store.exists(out):  # done before (a retried task, a resumed apply)
        return RESUMED
    con = connect_task()
    try:
        with task_dir() as tmp:
            source = _judged_source(con, job, shard)
            con.execute(f"create temp table t as select *, {job.reject} as _reject from {source}")
            if job.params.transform():
                copy_to_store(con, "select * from t order by file_row_number", job.store, out, tmp)
            else:
                rejects = (
                    "select file_row_number as n, id, source, _reject.reason as reason, _reject.detail as detail "
                    "from t where _reject is not null order by file_row_number"
                )
                copy_to_store(con, rejects, job.store, out, tmp)
    except Exception as exc:
        raise _sql_error(job, exc) from None
    finally:
        con.close()
    return "done"


def key_task(item: tuple[Job, Shard]) -> str:
    """Rows compared with each other, step 1 of 2: the shard's rows, the columns the comparison needs, one
    file per partition of the compared value's hash."""
    job, shard = item
    done = f"key/{shard.index:05d}.done"
    if job.store.exists(done):
        return RESUMED
    p, by = job.params, job.params.shuffle_by()
    con = connect_task()
    try:
        with task_dir() as tmp:
            source = _judged_source(con, job, shard, derived=False)
            # only what the comparison reads: the row's number, id and source, and the derived columns
            derived = f", {p.derived()}" if p.derived() else ""
            narrow = f"select file_row_number, id, source{derived} from {source}"
            part = f"(hash({by}) % {job.parts})::int" if by else "0"
            con.execute(f"create temp table k as select *, {part} as _part from ({narrow})")
            for q in range(job.parts):
                sql = f"select * exclude (_part) from k where _part = {q} order by file_row_number"
                copy_to_store(con, sql, job.store, f"key/{shard.index:05d}-{q:05d}.parquet", tmp)
    except Exception as exc:
        raise _sql_error(job, exc) from None
    finally:
        con.close()
    job.store.write_bytes(done, b"")
    return "done"


def reduce_task(item: tuple[Job, int, int]) -> str:
    """Rows compared with each other, step 2 of 2: judge one partition (every row its windows compare)."""
    job, part, shards = item
    rej = f"rej/{part:05d}.parquet"
    if job.store.exists(rej):
        return RESUMED
    con = connect_task()
    try:
        with task_dir() as tmp:
            rows = read_all(job.store, [f"key/{s:05d}-{part:05d}.parquet" for s in range(shards)], tmp)
            judged = f"select file_row_number as n, id, source, {job.reject} as _reject from {rows}"
            copy_to_store(
                con,
                f"select n, id, source, _reject.reason as reason, _reject.detail as detail from ({judged}) "
                "where _reject is not null order by n",
                job.store,
                rej,
                tmp,
            )
    except Exception as exc:
        raise _sql_error(job, exc) from None
    finally:
        con.close()
    return "done"


def _sql_error(job: Job, exc: Exception) -> Exception:
    import duckdb

    if isinstance(exc, duckdb.Error):
        return StepError(f"filter {job.step}: the SQL failed: {str(exc).splitlines()[0]}")
    return exc


def run_filter_sharded(ctx: StepContext, pool: Pool, run_filter: Callable[[StepContext], None]) -> None:
    """`run_filter`, as tasks over the input's shards."""
    p = ctx.params
    shards = plan_shards(ctx, pool)
    if not shards or not any(s.rows for s in shards):
        run_filter(ctx)  # nothing to spread: the empty input's files, as a local run writes them
        return
    by = p.shuffle_by()
    parts = 1 if by == "" else len(shards)
    job = Job(ctx.name, p, dict(ctx.files), p.reject_sql_in(ctx), pool.store, parts)
    if p.kind == "near_dedup":
        from runner.steps.sharded_minhash import near_dedup

        rejects = near_dedup(ctx, pool, job, shards)
    elif by is None:
        pool.map(judge_task, [(job, s) for s in shards], stage="filter", progress=ctx.progress)
        if p.transform():
            _finish_rows(ctx, pool, shards)
            pool.store.remove("")
            return
        rejects = [f"rej/{s.index:05d}.parquet" for s in shards]
    else:
        pool.map(key_task, [(job, s) for s in shards], stage="shuffle", progress=ctx.progress)
        pool.map(reduce_task, [(job, q, len(shards)) for q in range(parts)], stage="judge", progress=ctx.progress)
        rejects = [f"rej/{q:05d}.parquet" for q in range(parts)]
    finish_mask(ctx, pool, rejects)
    pool.store.remove("")


def _finish_rows(ctx: StepContext, pool: Pool, shards: list[Shard]) -> None:
    """A filter that rewrites rows: its files from every shard's rows, by `run_filter`'s own statements (its
    temp table holds the same rows, so DuckDB writes the same bytes, down to which columns are required)."""
    from runner.steps.tables import finish_rewritten
    from stores.datastore import connect

    rows = read_all(pool.store, [f"t/{s.index:05d}.parquet" for s in shards], ctx.scratch / "shards")
    con = connect()
    try:
        con.execute(f"create temp table t as select * from {rows}")
        finish_rewritten(ctx, con)
    finally:
        con.close()
