"""A filter chain end to end (read the source file, filter, write the kept rows) in runner and in what a
user would pick instead, same input and same kept rows checked, in one run:

- runner: `runner apply` of a parquet source and the five filters (fresh cache), then the kept rows written
  to a parquet file (filters write masks over their input, so writing the rows is counted here);
- hand-written DuckDB: one query from the source file to the kept rows' parquet file (the floor);
- datatrove: its pipeline on 2 workers (the input in 2 parquet shards, its unit of parallelism): its own
  RegexFilter for profanity, LambdaFilter where it has no block, its 3-stage exact dedup, a ParquetWriter;
- datasets: `Dataset.filter(batched=True, num_proc=2)` per filter, then `to_parquet`.

Chain (the same everywhere): length (response 20..2000 chars) -> profanity (a word list) -> unhelpful
phrases -> SQL `score >= 0.2` -> exact dedup of the normalised text (first stays).

Each run is its own process (peak RSS from the kernel's rusage); median and spread of --repeat runs.
runner, SQL and datasets must keep the very same row ids; datatrove's dedup keeps one row per text but
not always the first across shards, so it must keep as many rows with the same set of texts.

    python benchmarks/bench_filters.py [--rows 1000000] [--repeat 3] [--only runner,sql] [--keep-data DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = (
    "alpha beta gamma delta river stone cloud green paper light music table window garden number "
    "orange silver travel winter summer market bridge castle forest island letter mirror pocket"
).split()
BAD = ["blorf", "snarg", "quib", "zont", "flerb"]
UNHELPFUL = ["as an ai language model", "i'm sorry, but i cannot", "i am unable to"]
IMPLS = ["runner", "sql", "datatrove", "datasets"]

FILTERS = f"""
    - {{kind: length, field: response, min_chars: 20, max_chars: 2000}}
    - {{kind: profanity, default_list: false, extra_words: {BAD}}}
    - {{kind: unhelpful, phrases: {UNHELPFUL}}}
    - {{kind: sql, where: "score >= 0.2"}}
    - {{kind: dedup, field: text}}
"""
BAD_RE = r"(?i)(?:^|[^\w])(" + "|".join(BAD) + r")(?:$|[^\w])"


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def make_data(work: Path, n: int) -> None:
    """data.parquet, and the same rows as shards/0000{0,1}.parquet (datatrove's unit of parallelism)."""
    import duckdb

    words = "[" + ", ".join(f"'{w}'" for w in WORDS) + "]"
    duckdb.sql(f"""
        copy (
          select
            'question ' || (i % {max(n // 20, 1)} * 7919 % {n}) || ' ' || {words}[1 + i % 23] || ' '
              || {words}[1 + i % 17] as prompt,
            case
              when i % 97 = 0 then 'ok'
              when i % 89 = 0 then 'the answer is ' || {words}[1 + i % 13] || ' blorf ' || {words}[1 + i % 11]
              when i % 83 = 0 then 'As an AI language model, I prefer ' || {words}[1 + i % 19]
              when i % 20 = 0 then 'the answer is repeated here for many rows'
              else 'the answer is ' || {words}[1 + i % 13] || ' ' || {words}[1 + (i // 7) % 19] || ' ' ||
                   {words}[1 + (i // 3) % 11] || ' number ' || i
            end as response,
            ((i * 2654435761) % 1000) / 1000.0 as score
          from range({n}) t(i)
        ) to '{work / "data.parquet"}' (format parquet)
    """)
    (work / "shards").mkdir()
    half = n // 2
    for k, (lo, hi) in enumerate([(0, half), (half, n)]):
        duckdb.sql(f"""copy (select 's/' || (file_row_number + 1) as id, prompt, response, score
                       from read_parquet('{work / "data.parquet"}', file_row_number = true)
                       where file_row_number >= {lo} and file_row_number < {hi} order by file_row_number)
                       to '{work / "shards" / f"{k:05d}.parquet"}' (format parquet)""")


# -- the implementations: each reads the input, writes out.parquet (id, prompt, response, ...) ------------


def run_runner(work: Path, out: Path) -> None:
    import shutil

    from runner import api
    from stores.datastore import connect

    cache = work / "runner-cache"
    shutil.rmtree(cache, ignore_errors=True)
    (work / "r.yaml").write_text(
        "data:\n  sources:\n    - {name: s, format: parquet, path: data.parquet, "
        "columns: {prompt: prompt, response: response, score: score}}\n  filters:" + FILTERS
    )
    build = api.load(work / "r.yaml", cache_dir=cache, targets=["filter.dedup"])  # no format/split: not compared
    result = api.apply(build)
    assert result.ok
    last = api.table_sqls(build.cache, next(s.key for s in result.steps if s.name == "filter.dedup"))["rows"]
    connect().execute(
        f"copy (select id, prompt_of(turns) as prompt, response_of(turns) as response, score from {last}) "
        f"to '{out}' (format parquet, compression zstd)"
    )


def run_sql(work: Path, out: Path) -> None:
    import duckdb

    unhelpful = ("(" + "|".join(re.escape(p) for p in UNHELPFUL) + ")").replace("'", "''")
    bad = "(?i)(?:^|[^\\pL\\pN_])(" + "|".join(BAD) + ")(?:$|[^\\pL\\pN_])"
    duckdb.connect().execute(f"""
        copy (
          select 's/' || (file_row_number + 1) as id, prompt, response, score
          from read_parquet('{work / "data.parquet"}', file_row_number = true)
          where length(response) between 20 and 2000
            and not regexp_matches(prompt || chr(10) || response, '{bad}')
            and not regexp_matches(lower(response), '{unhelpful}')
            and score >= 0.2
          qualify row_number() over (partition by regexp_replace(lower(trim(prompt || chr(10) || response)),
                                                                 '\\s+', ' ', 'g') order by file_row_number) = 1
          order by file_row_number
        ) to '{out}' (format parquet, compression zstd)
    """)


def run_datatrove(work: Path, out: Path, executor: Any = None) -> None:
    """datatrove's pipeline, its stages one after the other on `executor` (default: its LocalPipelineExecutor;
    bench_cluster passes its RayPipelineExecutor)."""
    import shutil

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.filters import LambdaFilter, RegexFilter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    def adapter(self: object, data: dict, path: str, id_in_file: int | str) -> dict:
        text = data["prompt"] + "\n" + data["response"]
        return {"text": text, "id": data["id"], "metadata": {"response": data["response"], "score": data["score"]}}

    run = executor or LocalPipelineExecutor
    config = ExactDedupConfig(content_getter=lambda doc: normalise(doc.text).encode())
    d = work / "datatrove"
    shutil.rmtree(d, ignore_errors=True)  # a fresh run: datatrove skips the tasks its logs mark completed
    logs = str(d / "logs")
    stage1 = run(
        [
            ParquetReader(str(work / "shards"), adapter=adapter),
            LambdaFilter(lambda doc: 20 <= len(doc.metadata["response"]) <= 2000),
            RegexFilter(BAD_RE),
            LambdaFilter(lambda doc: not any(p in doc.metadata["response"].lower() for p in UNHELPFUL)),
            LambdaFilter(lambda doc: doc.metadata["score"] >= 0.2),
            ParquetWriter(str(d / "filtered"), output_filename="${rank}.parquet"),
            ExactDedupSignature(str(d / "sigs"), config=config),
        ],
        tasks=2,
        workers=2,
        logging_dir=logs + "/1",
    )
    stage2 = run(
        [ExactFindDedups(str(d / "sigs"), str(d / "dups"), config=config)],
        tasks=1,
        logging_dir=logs + "/2",
    )
    stage3 = run(
        [
            ParquetReader(str(d / "filtered")),
            ExactDedupFilter(str(d / "dups"), config=config),
            ParquetWriter(str(d / "kept"), output_filename="${rank}.parquet"),
        ],
        tasks=2,
        workers=2,
        logging_dir=logs + "/3",
    )
    for stage in (stage1, stage2, stage3):  # in turn (datatrove's Ray executor polls `depends` every 2 minutes)
        stage.run()
    import duckdb

    duckdb.connect().execute(
        f"copy (select id, text, metadata from read_parquet('{d / 'kept'}/*.parquet')) to '{out}' (format parquet)"
    )


def run_datasets(work: Path, out: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    ds = datasets.Dataset.from_parquet(str(work / "data.parquet"))
    ds = ds.add_column("id", [f"s/{i + 1}" for i in range(len(ds))])
    bad = re.compile(BAD_RE)

    def keep(f):  # a batched predicate from a row predicate
        return lambda b: [f(*row) for row in zip(b["prompt"], b["response"], b["score"], strict=False)]

    kw = {"batched": True, "num_proc": 2, "batch_size": 10_000}
    ds = ds.filter(keep(lambda p, r, s: 20 <= len(r) <= 2000), **kw)
    ds = ds.filter(keep(lambda p, r, s: not bad.search(p + "\n" + r)), **kw)
    ds = ds.filter(keep(lambda p, r, s: not any(x in r.lower() for x in UNHELPFUL)), **kw)
    ds = ds.filter(keep(lambda p, r, s: s >= 0.2), **kw)
    # exact dedup needs one pass in order (the first stays): a set, as a user would write it
    seen: set[str] = set()
    first = []
    for p, r in zip(ds["prompt"], ds["response"], strict=False):
        key = normalise(p + "\n" + r)
        first.append(key not in seen)
        seen.add(key)
    ds = ds.select([i for i, f in enumerate(first) if f])
    ds.to_parquet(str(out))


# -- measuring -----------------------------------------------------------------------------------------


def measure(impl: str, work: Path) -> dict[str, float]:
    """One run in its own process: wall seconds and peak RSS (MiB)."""
    out = work / f"out-{impl}.parquet"
    out.unlink(missing_ok=True)
    # runner as a user runs it: its DuckDB memory default (RUNNER_DUCKDB_MEMORY unset)
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_DUCKDB_MEMORY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    t = time.perf_counter()
    with open(work / f"log-{impl}.txt", "w") as log:  # the tools' own logs, out of the table's way
        proc = subprocess.Popen(
            [sys.executable, __file__, "--impl", impl, "--work", str(work)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if status != 0:
        raise SystemExit(f"{impl} failed (status {status}); its log: {work / f'log-{impl}.txt'}")
    return {"seconds": seconds, "rss_mib": usage.ru_maxrss / 1024}


def kept(impl: str, work: Path) -> tuple[list[str], set[str]]:
    import duckdb

    path = work / f"out-{impl}.parquet"
    if impl == "datatrove":
        rows = duckdb.sql(f"select id, text from '{path}'").fetchall()
        return sorted(r[0] for r in rows), {normalise(r[1]) for r in rows}
    rows = duckdb.sql(f"select id, prompt, response from '{path}'").fetchall()
    return [r[0] for r in rows], {normalise(r[1] + "\n" + r[2]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default=",".join(IMPLS), help="comma-separated: " + ", ".join(IMPLS))
    ap.add_argument("--keep-data", metavar="DIR", help="work in DIR (data made once, reused)")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:  # a child process: one run
        work = Path(args.work)
        globals()[f"run_{args.impl}"](work, work / f"out-{args.impl}.parquet")
        return
    impls = args.only.split(",")
    tmp = None if args.keep_data else tempfile.TemporaryDirectory()
    work = Path(args.keep_data or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data.parquet").exists() or args.rows != _rows(work):
        import shutil

        (work / "data.parquet").unlink(missing_ok=True)
        shutil.rmtree(work / "shards", ignore_errors=True)
        make_data(work, args.rows)
    print(f"{args.rows:,} rows; {os.cpu_count()} cores; median (min-max) of {args.repeat} runs, each its own process")
    results: dict[str, list[dict[str, float]]] = {i: [] for i in impls}
    for _ in range(args.repeat):
        for impl in impls:
            results[impl].append(measure(impl, work))
    ids = {i: kept(i, work) for i in impls}
    ref = ids[impls[0]]
    for impl in impls[1:]:
        if impl == "datatrove":
            assert len(ids[impl][0]) == len(ref[0]) and ids[impl][1] == ref[1], f"{impl} keeps other rows"
        else:
            assert ids[impl][0] == ref[0], f"{impl} keeps other rows (or in another order)"
    base = statistics.median(r["seconds"] for r in results[impls[0]])
    print(f"{'':<10} {'seconds':>22} {'peak RSS MiB':>13} {'rows kept':>10} {'time / ' + impls[0]:>16}")
    for impl in impls:
        s = sorted(r["seconds"] for r in results[impl])
        rss = max(r["rss_mib"] for r in results[impl])
        med = statistics.median(s)
        print(
            f"{impl:<10} {med:>8.2f} ({s[0]:.2f}-{s[-1]:.2f}) {rss:>13,.0f} {len(ids[impl][0]):>10,} {med / base:>15.2f}x"
        )
    if tmp is not None:
        tmp.cleanup()


def _rows(work: Path) -> int:
    import duckdb

    return int(duckdb.sql(f"select count(*) from '{work / 'data.parquet'}'").fetchall()[0][0])


if __name__ == "__main__":
    main()
