"""A source whose path is a directory, read as tasks on a cluster: a task per file, with the local result.

Record numbers continue from file to file, so a file's first number is the count of records before it: a
first stage of tasks counts each file's records, a second converts each file's records to rows and rejects
(numbered on from the files before it), and the driver walks them in order as a local read does: a row
repeating an earlier row's id becomes a reject, then `write_tables` writes both. Files reach the workers
through the shared store (the local path, without a cache remote).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.cluster import RESUMED
from runner.registry import StepContext
from runner.steps.shards import task_dir
from runner.steps.sources import Converted, collect_rows, convert_record, source_files

if TYPE_CHECKING:
    from runner.cluster import Pool, ShardStore


def _local(url: str, tmp: Path) -> Path:
    """A path to read the file at `url` from: itself when local, else a copy in `tmp`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return Path(path)
    local = tmp / "input"
    fs.get_file(path, str(local))
    return local


def count_task(item: tuple[Any, str]) -> int:
    """How many records a file holds (the number of its last one)."""
    params, url = item
    with task_dir() as tmp:
        last = 0
        for n, _, _ in params.records(_local(url, tmp)):
            last = n
        return last


def convert_task(item: tuple[Any, str, str, int, str | None, ShardStore, int]) -> str:
    """One file's records, numbered on from `first`, converted: a pickled list of `Converted`."""
    params, step_name, url, first, label, store, k = item
    out = f"src/{k:05d}.pickle"
    if store.exists(out):
        return RESUMED
    with task_dir() as tmp:
        records = params.numbered(_local(url, tmp), first, label)
        converted = [convert_record(params, step_name, r, params.row) for r in records]
        (tmp / "out").write_bytes(pickle.dumps(converted, protocol=pickle.HIGHEST_PROTOCOL))
        store.put(tmp / "out", out)
    return "done"


def run_source_sharded(ctx: StepContext, pool: Pool, run_source: Callable[[StepContext], None]) -> None:
    p = ctx.params
    root = ctx.files[p.path]
    files = source_files(root)
    if len(files) < 2 or p.limit:
        run_source(ctx)
        return
    urls = [pool.share(f, f"in/{k:05d}") for k, f in enumerate(files)]
    counts = pool.map(count_task, [(p, u) for u in urls], stage="count", progress=ctx.progress)
    firsts = [sum(counts[:k]) for k in range(len(files))]
    labels = [str(f.relative_to(root)) for f in files]
    items = [(p, ctx.name, u, firsts[k], labels[k], pool.store, k) for k, u in enumerate(urls)]
    pool.map(convert_task, items, stage="convert", progress=ctx.progress)

    def converted() -> Iterator[Converted]:
        local = ctx.scratch / "shards"
        for k in range(len(files)):
            yield from pickle.loads(pool.store.get(f"src/{k:05d}.pickle", local / f"{k}.pickle").read_bytes())

    collect_rows(ctx, p, converted())
    pool.store.remove("")
