"""Near-duplicate removal: runner's `near_dedup` filter step (end to end: the step reads its input table and
writes mask and rejects) against datasketch's own MinHashLSH written by hand, with the same shingles (word
3-grams of the lower-cased text), 128 permutations and threshold 0.8, and the same exact-Jaccard check of
every LSH candidate (without it, LSH drops rows that are not near-duplicates). Both must reject the same rows.

Also datatrove's own MinHash dedup (4 stages, 2 workers, 11 bands x 11 hashes: threshold ~0.80; given the same
shingles by overriding its shingling): it has no exact check and removes whole clusters, so the table shows
how many rows both remove and how many only one of them does.

Rows: real Alpaca replies (../shared/data) and edited copies of them (a word changed, a sentence added),
repeated with distinct suffixes up to --rows.

    python benchmarks/bench_dedup.py [--rows 100000] [--repeat 3] [--hand-repeat 1] [--skip-datatrove]

(datatrove: the bench extra). runner's time is its step's own (the source step is not counted).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"


def rows(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    base = [r["output"] for r in json.loads(ALPACA.read_text()) if len(r["output"].split()) > 20]
    out = []
    while len(out) < n:
        text = rng.choice(base)
        words = text.split()
        kind = rng.random()
        if kind < 0.2:  # an edited copy
            words[rng.randrange(len(words))] = "changed"
        elif kind < 0.3:
            words += ["One", "more", "sentence", "here."]
        else:  # a distinct row
            words += [f"tag{len(out)}", f"id{len(out) * 7}", f"n{len(out) * 13}"] * 3
        out.append({"prompt": f"q{len(out)}", "response": " ".join(words)})
    return out


def shingles(text: str) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[j : j + 3]) for j in range(max(1, len(words) - 2))}


def by_hand(texts: list[str]) -> set[int]:
    """datasketch alone, as a user would write it, with the exact check."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    dropped = set()
    for i, text in enumerate(texts):
        s = shingles(text)
        m = MinHash(num_perm=128, seed=1)
        m.update_batch([x.encode() for x in s])
        if any(len(s & (o := shingles(texts[j]))) / len(s | o) >= 0.8 for j in lsh.query(m)):
            dropped.add(i)
        else:
            lsh.insert(i, m)
    return dropped


def by_datatrove(texts: list[str], work: Path, executor: Any = None) -> set[int]:
    """datatrove's MinHash pipeline over the same texts (2 shards, 2 workers), with runner's shingles; its stages
    one after the other on `executor` (default: its LocalPipelineExecutor; bench_cluster passes its Ray one)."""
    import datatrove.pipeline.dedup.minhash as minhash
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    minhash.load_word_tokenizer = lambda language: None  # its word tokenizer (spaCy) is not used: our shingles

    class SameShingles(MinhashDedupSignature):  # type: ignore[misc]
        def get_shingles(self, text: str) -> np.ndarray:
            return np.fromiter((self._hash_func(s.encode()) for s in shingles(text)), dtype=np.uint64).reshape((-1, 1))

    half = len(texts) // 2
    (work / "in").mkdir()
    for k, (lo, hi) in enumerate([(0, half), (half, len(texts))]):
        pq.write_table(
            pa.table({"text": texts[lo:hi], "id": [str(i) for i in range(lo, hi)]}), work / "in" / f"{k:05d}.parquet"
        )
    config = MinhashConfig(num_buckets=11, hashes_per_bucket=11)  # 121 hashes, threshold ~(1/11)^(1/11) = 0.80
    logs = str(work / "logs")
    run = executor or LocalPipelineExecutor
    s1 = run(
        [ParquetReader(str(work / "in")), SameShingles(str(work / "sigs"), config=config)],
        tasks=2,
        workers=2,
        logging_dir=logs + "/1",
    )
    s2 = run(
        [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)],
        tasks=config.num_buckets,
        workers=2,
        logging_dir=logs + "/2",
    )
    s3 = run(
        [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)],
        tasks=1,
        logging_dir=logs + "/3",
    )
    s4 = run(
        [
            ParquetReader(str(work / "in")),
            MinhashDedupFilter(str(work / "remove")),
            ParquetWriter(str(work / "kept"), output_filename="${rank}.parquet"),
        ],
        tasks=2,
        workers=2,
        logging_dir=logs + "/4",
    )
    for stage in (s1, s2, s3, s4):  # in turn (datatrove's Ray executor polls `depends` every 2 minutes)
        stage.run()
    kept = {
        int(i) for f in (work / "kept").glob("*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist()
    }
    return set(range(len(texts))) - kept


def run_runner(data: list[dict[str, str]]) -> tuple[float, set[int]]:
    """runner's near_dedup step (its own seconds, from a fresh cache) and the rows it rejects."""
    from runner import api

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in data))
        (Path(tmp) / "r.yaml").write_text(
            "data:\n  sources: [{name: s, format: jsonl, path: rows.jsonl}]\n"
            "  filters: [{kind: near_dedup, field: response, threshold: 0.8}]\n"
        )
        b = api.load(Path(tmp) / "r.yaml", cache_dir=Path(tmp) / "cache")
        result = api.apply(b)
        assert result.ok
        step = next(s for s in result.steps if s.name == "filter.near_dedup")
        rejected = {int(r[0].split("/")[1]) - 1 for r in api.sql(b, "select id from filter_near_dedup__rejects")[1]}
    return step.seconds, rejected


def run_datasketch(data: list[dict[str, str]]) -> tuple[float, set[int]]:
    t = time.perf_counter()
    dropped = by_hand([r["response"] for r in data])
    return time.perf_counter() - t, dropped


def run_datatrove(data: list[dict[str, str]]) -> tuple[float, set[int]]:
    from loguru import logger

    logger.remove()  # datatrove's per-stage reports
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        dropped = by_datatrove([r["response"] for r in data], Path(tmp))
        return time.perf_counter() - t, dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of runner and datatrove (median and spread)")
    ap.add_argument(
        "--hand-repeat", type=int, default=1, help="runs of datasketch by hand (the slowest; its rows are the check)"
    )
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()
    data = rows(args.rows)
    plan = [("runner", run_runner, args.repeat), ("datasketch", run_datasketch, args.hand_repeat)]
    if not args.skip_datatrove:
        plan.append(("datatrove", run_datatrove, args.repeat))
    times: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    dropped: dict[str, set[int]] = {}
    for k in range(max(n for _, _, n in plan)):
        for name, run, n in plan:
            if k < n:
                seconds, rows_out = run(data)
                times[name].append(seconds)
                assert dropped.setdefault(name, rows_out) == rows_out, f"{name} changed its rows between runs"
    ours = dropped["runner"]
    assert ours == dropped["datasketch"], (len(ours), len(dropped["datasketch"]), len(ours ^ dropped["datasketch"]))
    print(f"{args.rows:,} rows; runner and datasketch by hand remove the same {len(ours):,} rows")
    base = statistics.median(times["runner"])
    print(f"{'':<12} {'seconds, median (min-max)':>28} {'runs':>5} {'time / runner':>14}")
    for name, _, _ in plan:
        s = sorted(times[name])
        print(
            f"{name:<12} {statistics.median(s):>10.1f} ({s[0]:.1f}-{s[-1]:.1f}) {len(s):>12} {statistics.median(s) / base:>13.2f}x"
        )
    if "datatrove" in dropped:
        dt = dropped["datatrove"]
        print(
            f"datatrove (4 stages, 2 workers, 11x11 bands, no exact check) removes {len(dt):,} rows: "
            f"{len(dt & ours):,} of runner's, {len(dt - ours):,} runner keeps, {len(ours - dt):,} runner removes and it keeps"
        )


if __name__ == "__main__":
    main()
