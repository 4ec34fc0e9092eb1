"""near_dedup as tasks on a cluster, with the local filter's result (see `sharded`).

Locally, a row goes when one of the earlier rows that stay shares an LSH band with it (datasketch's bands
of its MinHash) and their shingles' exact Jaccard reaches the threshold; the detail names the most similar
such row (the earliest on a tie). Here, in five stages:

1. per shard: every row's MinHash (`minhash._signatures`, the local values) and shingle keys; each
   band's values go to the partition of their hash;
2. per partition: the pairs of rows (earlier, later) that share a band's values: the local candidates,
   whether or not the earlier row stays;
3. per shard of the earlier row: the pairs meet its shingle keys;
4. per shard of the later row: ... and its own; the pairs whose exact Jaccard reaches the threshold stay;
5. the driver walks the confirmed pairs by later row, as the local filter walks rows: a row goes when an
   earlier row that stays is in a pair with it.

Rows in a pair are rare in real data; a text repeated k times gives k(k-1)/2 pairs in stage 2 (the local
filter compares it with the one copy that stays).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.cluster import RESUMED
from runner.steps.shards import Job, Shard, connect_task, copy_to_store, shard_sql, task_dir
from stores.sql import sql_string

if TYPE_CHECKING:
    import numpy as np

    from runner.cluster import Pool
    from runner.registry import StepContext

BLOCK = 20_000  # texts per MinHash block (bounds a task's memory)


def _set_keys(keys: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shingle keys as a set (sorted, no repeats): flat values and offsets."""
    import numpy as np

    lengths = np.diff(bounds)
    row = np.repeat(np.arange(len(lengths)), lengths)
    order = np.lexsort((keys, row))
    keys, row = keys[order], row[order]
    keep = np.ones(len(keys), bool)
    keep[1:] = (row[1:] != row[:-1]) | (keys[1:] != keys[:-1])
    counts = np.bincount(row[keep], minlength=len(lengths))
    return keys[keep], np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def sig_task(item: tuple[Job, Shard, int, int]) -> str:
    """Stage 1: the shard's shingle keys (keys/S) and its rows' band values, by partition (bands/S-P)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.steps.minhash import _signatures

    job, shard, b, r = item
    done = f"nd/sig/{shard.index:05d}.done"
    if job.store.exists(done):
        return RESUMED
    p = job.params
    con = connect_task()
    try:
        source = shard_sql(con, shard)
        table = con.sql(
            f"select file_row_number as n, source, {p.python_input()} from {source} order by n"
        ).to_arrow_table()
    finally:
        con.close()
    texts, numbers = table.column("text").to_pylist(), table.column("n").to_numpy()
    flat, offsets, values = [], [0], []
    for lo in range(0, len(texts), BLOCK):
        vals, keys, bounds = _signatures(texts[lo : lo + BLOCK], p.ngram, p.num_perm, p.seed)
        keys, bounds = _set_keys(keys, bounds)
        flat.append(keys)
        offsets.extend((bounds[1:] + offsets[-1]).tolist())
        values.append(vals)
    sig = np.concatenate(values) if values else np.empty((0, p.num_perm), np.uint32)
    keys_col = pa.ListArray.from_arrays(
        pa.array(np.asarray(offsets, np.int32)), pa.array(np.concatenate(flat) if flat else np.empty(0, np.int64))
    )
    with task_dir() as tmp:
        out = table.drop(["text"]).append_column("keys", keys_col)
        pq.write_table(out, tmp / "keys.parquet", compression="zstd")
        job.store.put(tmp / "keys.parquet", f"nd/keys/{shard.index:05d}.parquet")
        bands, parts = [], []
        for k in range(b):
            block = np.ascontiguousarray(sig[:, k * r : (k + 1) * r])
            mixed = np.full(len(block), k + 1, np.uint64)
            for c in range(r):
                mixed = (mixed * np.uint64(0x100000001B3)) ^ block[:, c].astype(np.uint64)
            bands.append(block)
            parts.append((mixed % np.uint64(job.parts)).astype(np.int64))
        width = pa.binary(4 * r)
        for q in range(job.parts):
            cols: dict[str, list[Any]] = {"band": [], "value": [], "n": []}
            for k, (block, part) in enumerate(zip(bands, parts, strict=True)):
                rows = np.flatnonzero(part == q)
                chosen = np.ascontiguousarray(block[rows])
                cols["band"].append(pa.array(np.full(len(rows), k, np.int16)))
                cols["value"].append(pa.Array.from_buffers(width, len(rows), [None, pa.py_buffer(chosen.tobytes())]))
                cols["n"].append(pa.array(numbers[rows]))
            part_table = pa.table({c: pa.concat_arrays(v) if v else pa.array([]) for c, v in cols.items()})
            pq.write_table(part_table, tmp / "b.parquet", compression="zstd")
            job.store.put(tmp / "b.parquet", f"nd/bands/{shard.index:05d}-{q:05d}.parquet")
    job.store.write_bytes(done, b"")
    return "done"


def pairs_task(item: tuple[Job, int, int, list[int]]) -> str:
    """Stage 2: the pairs of rows that share a band's values in partition Q, by the earlier row's shard."""
    job, q, shards, firsts = item
    done = f"nd/pairs/{q:05d}.done"
    if job.store.exists(done):
        return RESUMED
    con = connect_task()
    try:
        with task_dir() as tmp:
            files = [job.store.get(f"nd/bands/{s:05d}-{q:05d}.parquet", tmp / f"{s}.parquet") for s in range(shards)]
            _shard_macro(con, firsts)
            con.execute(
                f"create temp table b as select * from read_parquet([{', '.join(sql_string(f) for f in files)}])"
            )
            con.execute(
                "create temp table p as select distinct x.n as i, y.n as j, shard_of(x.n) as s from b x join b y "
                "on x.band = y.band and x.value = y.value and x.n < y.n"
            )
            for s in range(shards):
                copy_to_store(
                    con, f"select i, j from p where s = {s}", job.store, f"nd/pairs/{q:05d}-{s:05d}.parquet", tmp
                )
    finally:
        con.close()
    job.store.write_bytes(done, b"")
    return "done"


def half_task(item: tuple[Job, int, int, int, list[int]]) -> str:
    """Stage 3: the pairs whose earlier row is in shard S, with its id and shingle keys, by the later row's shard."""
    job, s, parts, shards, firsts = item
    done = f"nd/half/{s:05d}.done"
    if job.store.exists(done):
        return RESUMED
    con = connect_task()
    try:
        with task_dir() as tmp:
            pairs = [job.store.get(f"nd/pairs/{q:05d}-{s:05d}.parquet", tmp / f"p{q}.parquet") for q in range(parts)]
            keys = job.store.get(f"nd/keys/{s:05d}.parquet", tmp / "keys.parquet")
            _shard_macro(con, firsts)
            con.execute(
                "create temp table h as select p.i, p.j, k.id as id_i, k.keys as keys_i, shard_of(p.j) as t from "
                f"(select distinct i, j from read_parquet([{', '.join(sql_string(f) for f in pairs)}])) p "
                f"join read_parquet({sql_string(keys)}) k on k.n = p.i"
            )
            for t in range(shards):
                copy_to_store(
                    con,
                    f"select * exclude (t) from h where t = {t}",
                    job.store,
                    f"nd/half/{s:05d}-{t:05d}.parquet",
                    tmp,
                )
    finally:
        con.close()
    job.store.write_bytes(done, b"")
    return "done"


def confirm_task(item: tuple[Job, int, int]) -> str:
    """Stage 4: the pairs whose later row is in shard T, confirmed by the exact Jaccard of their shingle keys."""
    job, t, shards = item
    out = f"nd/edges/{t:05d}.parquet"
    if job.store.exists(out):
        return RESUMED
    con = connect_task()
    try:
        with task_dir() as tmp:
            halves = [job.store.get(f"nd/half/{s:05d}-{t:05d}.parquet", tmp / f"h{s}.parquet") for s in range(shards)]
            keys = job.store.get(f"nd/keys/{t:05d}.parquet", tmp / "keys.parquet")
            pairs = (
                "select h.i, h.j, h.id_i, k.id as id_j, k.source as source_j, "
                "len(list_intersect(h.keys_i, k.keys)) as c, len(h.keys_i) as la, len(k.keys) as lb "
                f"from read_parquet([{', '.join(sql_string(f) for f in halves)}]) h "
                f"join read_parquet({sql_string(keys)}) k on k.n = h.j"
            )
            # the same double division as the local filter's: the same pairs reach the threshold
            copy_to_store(
                con,
                f"select * from ({pairs}) where c / (la + lb - c) >= {float(job.params.threshold)!r} order by j, i",
                job.store,
                out,
                tmp,
            )
    finally:
        con.close()
    return "done"


def _shard_macro(con: Any, firsts: list[int]) -> None:
    """`shard_of(n)`: the index of the shard holding base row n (shards start at `firsts`)."""
    bounds = ", ".join(str(f) for f in firsts[1:])
    con.execute(f"create or replace temp macro shard_of(n) as len(list_filter([{bounds}]::bigint[], lambda f: f <= n))")


def near_dedup(ctx: StepContext, pool: Pool, job: Job, shards: list[Shard]) -> list[str]:
    """Stages 1-5; the store's rejects file (what `finish_mask` reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasketch import MinHashLSH

    p = job.params
    lsh = MinHashLSH(threshold=p.threshold, num_perm=p.num_perm)  # its bands and rows, as the local filter's
    firsts = [s.first_row for s in shards]
    n, parts = len(shards), job.parts
    pool.map(sig_task, [(job, s, lsh.b, lsh.r) for s in shards], stage="minhash", progress=ctx.progress)
    pool.map(pairs_task, [(job, q, n, firsts) for q in range(parts)], stage="bands", progress=ctx.progress)
    pool.map(half_task, [(job, s, parts, n, firsts) for s in range(n)], stage="pairs", progress=ctx.progress)
    pool.map(confirm_task, [(job, t, n) for t in range(n)], stage="jaccard", progress=ctx.progress)
    local = ctx.scratch / "shards"
    edges = [pool.store.get(f"nd/edges/{t:05d}.parquet", local / f"edges-{t}.parquet") for t in range(n)]
    table = pa.concat_tables([pq.read_table(e) for e in edges])
    dropped: dict[int, tuple[float, int, str]] = {}
    rows: dict[str, list[Any]] = {"n": [], "id": [], "source": [], "reason": [], "detail": []}
    columns = [table.column(c).to_pylist() for c in ("i", "j", "id_i", "id_j", "source_j", "c", "la", "lb")]
    best: tuple[float, int, str] | None = None
    for at, (i, j, id_i, id_j, source_j, c, la, lb) in enumerate(zip(*columns, strict=True)):
        jaccard = c / (la + lb - c)
        if i not in dropped and jaccard >= p.threshold:  # an earlier row that stays (every row before j is decided)
            if best is None or (jaccard, -i) > (best[0], -best[1]):
                best = (jaccard, i, id_i)
        if at + 1 == table.num_rows or columns[1][at + 1] != j:  # j's last pair
            if best is not None:
                dropped[j] = best
                for name, value in zip(
                    rows, (j, id_j, source_j, "near_duplicate", f"of {best[2]} (jaccard {best[0]:.3f})"), strict=True
                ):
                    rows[name].append(value)
            best = None
    result = pa.table(
        {
            "n": pa.array(rows["n"], pa.int64()),
            **{c: pa.array(rows[c], pa.string()) for c in ("id", "source", "reason", "detail")},
        }
    )
    local.mkdir(parents=True, exist_ok=True)
    pq.write_table(result, local / "near-rejects.parquet")
    pool.store.put(local / "near-rejects.parquet", "rej/near.parquet")
    return ["rej/near.parquet"]
