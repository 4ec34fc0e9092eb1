"""near_dedup as tasks on a cluster, with the local filter's result (see `sharded`).

Locally, rows are walked in order: a row goes when one of the earlier rows that stay shares an LSH band with
it (datasketch's bands of its MinHash) and their shingles' exact Jaccard reaches the threshold (the detail
names the most similar, the earliest on a tie); a row that stays joins the index. A row's fate depends only
on rows it is linked to through shared bands, so the walk splits into independent walks over the connected
components of "shares a band with": run as tasks, they give the local result. In four stages:

1. per shard: every row's MinHash (`minhash._signatures`, the local values) and shingle keys; each band's
   values go to the partition of their hash;
2. per partition: the rows that share a band's values, linked in a chain (k rows, k - 1 links: never the
   k(k-1)/2 pairs);
3. the driver: connected components of the links (rows linked to none stay, and take no further part); each
   linked row goes, with its signature and keys, to the partition of its component;
4. per partition: the local walk over its rows in order, component by component (they share no band).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.cluster import RESUMED
from runner.steps.shards import Job, Shard, connect_task, copy_to_store, read_all, shard_sql, task_dir

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


def _partition(values: np.ndarray, salt: int, parts: int) -> np.ndarray:
    """A partition per row of `values` (uint32 columns), the same for equal rows."""
    import numpy as np

    mixed = np.full(len(values), salt + 1, np.uint64)
    for c in range(values.shape[1]):
        mixed = (mixed * np.uint64(0x100000001B3)) ^ values[:, c].astype(np.uint64)
    return (mixed % np.uint64(parts)).astype(np.int64)


def sig_task(item: tuple[Job, Shard, int, int]) -> str:
    """Stage 1: the shard's rows with their signature and shingle keys (rows/S), and their band values by
    partition (bands/S-P)."""
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
    sig_col = pa.Array.from_buffers(pa.binary(4 * p.num_perm), len(sig), [None, pa.py_buffer(sig.tobytes())])
    with task_dir() as tmp:
        rows = table.drop(["text"]).append_column("keys", keys_col).append_column("sig", sig_col)
        pq.write_table(rows, tmp / "rows.parquet", compression="zstd")
        job.store.put(tmp / "rows.parquet", f"nd/rows/{shard.index:05d}.parquet")
        width = pa.binary(4 * r)
        blocks = [np.ascontiguousarray(sig[:, k * r : (k + 1) * r]) for k in range(b)]
        parts = [_partition(block, k, job.parts) for k, block in enumerate(blocks)]
        for q in range(job.parts):
            cols: dict[str, list[Any]] = {"band": [], "value": [], "n": []}
            for k, (block, part) in enumerate(zip(blocks, parts, strict=True)):
                chosen = np.flatnonzero(part == q)
                data = pa.py_buffer(np.ascontiguousarray(block[chosen]).tobytes())
                cols["band"].append(pa.array(np.full(len(chosen), k, np.int16)))
                cols["value"].append(pa.Array.from_buffers(width, len(chosen), [None, data]))
                cols["n"].append(pa.array(numbers[chosen]))
            pq.write_table(pa.table({c: pa.concat_arrays(v) for c, v in cols.items()}), tmp / "b.parquet")
            job.store.put(tmp / "b.parquet", f"nd/bands/{shard.index:05d}-{q:05d}.parquet")
    job.store.write_bytes(done, b"")
    return "done"


def link_task(item: tuple[Job, int, int]) -> str:
    """Stage 2: in partition Q, each row that shares a band's values with an earlier row, linked to the
    latest such row (a chain per bucket)."""
    job, q, shards = item
    out = f"nd/links/{q:05d}.parquet"
    if job.store.exists(out):
        return RESUMED
    con = connect_task()
    try:
        with task_dir() as tmp:
            bands = read_all(job.store, [f"nd/bands/{s:05d}-{q:05d}.parquet" for s in range(shards)], tmp)
            chained = f"select lag(n) over (partition by band, value order by n) as a, n as b from {bands}"
            copy_to_store(con, f"select distinct a, b from ({chained}) where a is not null", job.store, out, tmp)
    finally:
        con.close()
    return "done"


def route_task(item: tuple[Job, int]) -> str:
    """Stage 3 (after the driver's components): the shard's linked rows, to the partition of their component."""
    job, s = item
    done = f"nd/route/{s:05d}.done"
    if job.store.exists(done):
        return RESUMED
    con = connect_task()
    try:
        with task_dir() as tmp:
            rows = read_all(job.store, [f"nd/rows/{s:05d}.parquet"], tmp)
            comps = read_all(job.store, ["nd/components.parquet"], tmp)
            con.execute(f"create temp table r as select r.*, c.component from {rows} r join {comps} c using (n)")
            for q in range(job.parts):
                sql = f"select * from r where component % {job.parts} = {q} order by n"
                copy_to_store(con, sql, job.store, f"nd/route/{s:05d}-{q:05d}.parquet", tmp)
    finally:
        con.close()
    job.store.write_bytes(done, b"")
    return "done"


def walk_task(item: tuple[Job, int, int, int, int]) -> str:
    """Stage 4: the local filter's walk over partition Q's rows in order: its rejects."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.steps.minhash import _jaccard

    job, q, shards, b, r = item
    out = f"nd/rej/{q:05d}.parquet"
    if job.store.exists(out):
        return RESUMED
    with task_dir() as tmp:
        files = [job.store.get(f"nd/route/{s:05d}-{q:05d}.parquet", tmp / f"{s}.parquet") for s in range(shards)]
        table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("n")
        index: dict[tuple[int, bytes], list[int]] = {}  # a band's values -> the rows that stay with them
        kept: dict[int, frozenset[int]] = {}
        ids = table.column("id").to_pylist()
        rejects: dict[str, list[Any]] = {"n": [], "id": [], "source": [], "reason": [], "detail": []}
        numbers, sources = table.column("n").to_pylist(), table.column("source").to_pylist()
        for at, (keys, sig) in enumerate(
            zip(table.column("keys").to_pylist(), table.column("sig").to_pylist(), strict=True)
        ):
            key = frozenset(keys)
            hashvalues = np.frombuffer(sig, np.uint32)
            bands = [(k, hashvalues[k * r : (k + 1) * r].tobytes()) for k in range(b)]
            best: tuple[float, int] | None = None
            for j in {j for band in bands for j in index.get(band, ())}:
                jaccard = _jaccard(key, kept[j])
                if jaccard >= job.params.threshold and (best is None or (jaccard, -j) > (best[0], -best[1])):
                    best = (jaccard, j)
            if best is None:
                for band in bands:
                    index.setdefault(band, []).append(at)
                kept[at] = key
            else:
                for name, value in zip(
                    rejects,
                    (numbers[at], ids[at], sources[at], "near_duplicate", f"of {ids[best[1]]} (jaccard {best[0]:.3f})"),
                    strict=True,
                ):
                    rejects[name].append(value)
        result = pa.table(
            {"n": pa.array(rejects["n"], pa.int64())}
            | {c: pa.array(rejects[c], pa.string()) for c in ("id", "source", "reason", "detail")}
        )
        pq.write_table(result, tmp / "rej.parquet")
        job.store.put(tmp / "rej.parquet", out)
    return "done"


def components(pool: Pool, ctx: StepContext, parts: int) -> None:
    """Stage 3, the driver's part: label every linked row with its component (the component's first row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    local = ctx.scratch / "shards"
    links = pa.concat_tables(
        [pq.read_table(pool.store.get(f"nd/links/{q:05d}.parquet", local / f"links-{q}.parquet")) for q in range(parts)]
    )
    a, b = links.column("a").to_numpy(), links.column("b").to_numpy()
    rows = np.unique(np.concatenate([a, b]))
    ia, ib = np.searchsorted(rows, a), np.searchsorted(rows, b)
    graph = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(rows), len(rows)))
    _, label = connected_components(graph, directed=False)
    first = np.full(label.max() + 1 if len(label) else 0, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, label, rows)
    local.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"n": rows, "component": first[label]}), local / "components.parquet")
    pool.store.put(local / "components.parquet", "nd/components.parquet")


def near_dedup(ctx: StepContext, pool: Pool, job: Job, shards: list[Shard]) -> list[str]:
    """Stages 1-4; the store's rejects files (what `finish_mask` reads)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=job.params.threshold, num_perm=job.params.num_perm)  # the local filter's bands
    n, parts = len(shards), job.parts
    pool.map(sig_task, [(job, s, lsh.b, lsh.r) for s in shards], stage="minhash", progress=ctx.progress)
    pool.map(link_task, [(job, q, n) for q in range(parts)], stage="bands", progress=ctx.progress)
    if not pool.store.exists("nd/components.parquet"):
        components(pool, ctx, parts)
    pool.map(route_task, [(job, s) for s in range(n)], stage="components", progress=ctx.progress)
    pool.map(walk_task, [(job, q, n, lsh.b, lsh.r) for q in range(parts)], stage="walk", progress=ctx.progress)
    return [f"nd/rej/{q:05d}.parquet" for q in range(parts)]
