"""Near-duplicate removal: runner's `near_dedup` filter step (end to end: the step reads its input table and
writes mask and rejects) against datasketch's own MinHashLSH written by hand, with the same shingles (word
3-grams of the lower-cased text), 128 permutations and threshold 0.8, and the same exact-Jaccard check of
every LSH candidate (without it, LSH drops rows that are not near-duplicates). Both must reject the same rows.

Rows: real Alpaca replies (../shared/data) and edited copies of them (a word changed, a sentence added),
repeated with distinct suffixes up to --rows.

    python benchmarks/bench_dedup.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    from runner import api

    data = rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in data))
        (Path(tmp) / "r.yaml").write_text(
            "data:\n  sources: [{name: s, format: jsonl, path: rows.jsonl}]\n"
            "  filters: [{kind: near_dedup, field: response, threshold: 0.8}]\n"
        )
        t = time.perf_counter()
        b = api.load(Path(tmp) / "r.yaml", cache_dir=Path(tmp) / "cache")
        result = api.apply(b)
        assert result.ok
        total = time.perf_counter() - t
        step = next(s for s in result.steps if s.name == "filter.near_dedup")
        ours = {int(r[0].split("/")[1]) - 1 for r in api.sql(b, "select id from filter_near_dedup__rejects")[1]}
    t = time.perf_counter()
    theirs = by_hand([r["response"] for r in data])
    hand = time.perf_counter() - t
    assert ours == theirs, (len(ours), len(theirs), len(ours ^ theirs))
    print(f"{args.rows:,} rows, {len(ours):,} near-duplicates found by both (same rows)")
    print(
        f"runner near_dedup step: {step.seconds:.1f} s (whole apply incl. source {total:.1f} s); "
        f"datasketch by hand: {hand:.1f} s -> datasketch / runner = {hand / step.seconds:.2f}x"
    )


if __name__ == "__main__":
    main()
