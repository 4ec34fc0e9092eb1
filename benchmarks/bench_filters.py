"""The recipe's filter chain vs the same filters as `datasets.Dataset.filter` functions vs one hand-written
DuckDB query, on N synthetic rows (default 1M), in one run. All three must keep the same rows in the
same order; the script checks that, then prints times and ratios.

Chain: length (response 20..2000 chars) -> profanity (a word list) -> unhelpful phrases -> exact dedup
(normalised text) -> SQL `score >= 0.2`.

    python benchmarks/bench_filters.py [--rows 1000000] [--repeat 3] [--skip-datasets]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ("alpha beta gamma delta river stone cloud green paper light music table window garden number "
         "orange silver travel winter summer market bridge castle forest island letter mirror pocket").split()
BAD = ["blorf", "snarg", "quib", "zont", "flerb"]
UNHELPFUL = ["as an ai language model", "i'm sorry, but i cannot", "i am unable to"]

FILTERS = f"""
    - {{kind: length, field: response, min_chars: 20, max_chars: 2000}}
    - {{kind: profanity, default_list: false, extra_words: {BAD}}}
    - {{kind: unhelpful, phrases: {UNHELPFUL}}}
    - {{kind: dedup, field: text}}
    - {{kind: sql, where: "score >= 0.2"}}
"""


def make_data(path: Path, n: int) -> None:
    import duckdb

    words = "[" + ", ".join(f"'{w}'" for w in WORDS) + "]"
    duckdb.sql(f"""
        copy (
          select
            'question ' || (i % {max(n // 20, 1)} * 7919 % {n}) || ' ' || {words}[1 + i % 23] || ' ' || {words}[1 + i % 17] as prompt,
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
        ) to '{path}' (format parquet)
    """)


def run_runner(workdir: Path, repeat: int) -> tuple[float, list[str], Path]:
    from runner import api
    from stores.datastore import connect

    con = connect()
    (workdir / "r.yaml").write_text(
        "data:\n  sources:\n    - {name: s, format: parquet, path: data.parquet, "
        "columns: {prompt: prompt, response: response, score: score}}\n  filters:" + FILTERS)
    build = api.load(workdir / "r.yaml", cache_dir=workdir / "cache")
    t = time.perf_counter()
    first = api.apply(build)  # builds the source once (not timed as part of the chain)
    print(f"  (source step, not compared: {time.perf_counter() - t:.1f} s)")
    source_key = first.steps[0].key
    times = []
    for _ in range(repeat):
        for key in list(build.cache.keys()):
            if key != source_key:
                build.cache.remove(key)
        result = api.apply(build)
        filters = [s for s in result.steps if s.name.startswith("filter.")]
        assert all(s.state == "built" for s in filters)
        # filters write masks, not rows: add writing the kept rows once, as the hand-written query does
        last = api.table_sqls(build.cache, filters[-1].key)["rows"]
        t = time.perf_counter()
        con.execute(f"copy (select * from {last}) to '{workdir / 'kept.parquet'}' (format parquet, compression zstd)")
        times.append(sum(s.seconds for s in filters) + time.perf_counter() - t)
    source = next(s for s in result.steps if s.name == "source.s").artifact
    ids = [r[0] for r in con.execute(f"select id from '{workdir / 'kept.parquet'}'").fetchall()]
    return statistics.median(times), ids, source.file("rows.parquet")


def run_datasets(source: Path) -> tuple[float, list[str]]:
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    ds = datasets.Dataset.from_parquet(str(source))
    bad = re.compile(r"(?<![^\W_])(" + "|".join(BAD) + r")(?![^\W_])", re.IGNORECASE)
    seen: set[str] = set()

    def response(r: dict) -> str:
        return [t for t in r["turns"] if t["role"] == "assistant"][-1]["text"]

    def text(r: dict) -> str:
        return "\n".join(t["text"] for t in r["turns"])

    def first_time(r: dict) -> bool:
        key = re.sub(r"\s+", " ", text(r).strip().lower())
        if key in seen:
            return False
        seen.add(key)
        return True

    t = time.perf_counter()
    ds = ds.filter(lambda r: 20 <= len(response(r)) <= 2000)
    ds = ds.filter(lambda r: not bad.search(text(r)))
    ds = ds.filter(lambda r: not any(p in response(r).lower() for p in UNHELPFUL))
    ds = ds.filter(first_time)
    ds = ds.filter(lambda r: r["score"] is not None and r["score"] >= 0.2)
    return time.perf_counter() - t, list(ds["id"])


def run_sql(source: Path, out: Path) -> tuple[float, list[str]]:
    import duckdb

    con = duckdb.connect()
    bad = "(?i)(?:^|[^\\pL\\pN_])(" + "|".join(BAD) + ")(?:$|[^\\pL\\pN_])"
    unhelpful = ("(" + "|".join(re.escape(p) for p in UNHELPFUL) + ")").replace("'", "''")
    t = time.perf_counter()
    con.execute(f"""
        copy (
          with base as (
            select *, list_filter(turns, lambda t: t.role = 'assistant')[-1].text as response,
                   array_to_string(list_transform(turns, lambda t: t.text), chr(10)) as text
            from read_parquet('{source}')
          )
          select * exclude (response, text) from base
          where length(response) between 20 and 2000
            and not regexp_matches(text, '{bad}')
            and not regexp_matches(lower(response), '{unhelpful}')
          qualify row_number() over (partition by regexp_replace(lower(trim(text)), '\\s+', ' ', 'g')
                                     order by id) = 1 and score >= 0.2
        ) to '{out}' (format parquet)
    """)
    elapsed = time.perf_counter() - t
    ids = [r[0] for r in con.execute(f"select id from read_parquet('{out}')").fetchall()]
    return elapsed, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-datasets", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_data(work / "data.parquet", args.rows)
        print(f"{args.rows:,} rows, {os.cpu_count()} cores")
        runner_s, runner_ids, source = run_runner(work, args.repeat)
        sql_s, sql_ids = run_sql(source, work / "hand.parquet")
        print(f"runner filter chain + writing the kept rows (median of {args.repeat}): {runner_s:8.2f} s  -> {len(runner_ids):,} rows")
        print(f"hand-written DuckDB SQL (one query, writes the kept rows):      {sql_s:8.2f} s  -> {len(sql_ids):,} rows")
        assert sorted(sql_ids) == sorted(runner_ids), "hand SQL keeps other rows"
        print(f"ratio runner / hand SQL: {runner_s / sql_s:.2f}x (target <= 1.2x)")
        if not args.skip_datasets:
            ds_s, ds_ids = run_datasets(source)
            print(f"datasets.Dataset.filter (no rows written):                      {ds_s:8.2f} s  -> {len(ds_ids):,} rows")
            assert ds_ids == runner_ids, "datasets keeps other rows (or another order)"
            print(f"speed-up runner vs datasets: {ds_s / runner_s:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
