"""The index against what a user would call directly, in one run, on N SciFact abstracts (or synthetic text):

1. query throughput of runner's retriever (vectors in, hits out) vs raw hnswlib `knn_query`, same index params;
2. embedding throughput of the embed step (a fresh build each time) vs calling `SentenceTransformer.encode`
   directly, --repeat times each, interleaved step, encode, encode, step, step, encode... (median, min-max);
3. re-indexing after changing 1% of the documents vs a full build.

    python benchmarks/bench_index.py [--docs 2000] [--queries 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SCIFACT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "rag" / "scifact" / "corpus_train.csv"


def corpus(n: int) -> list[str]:
    if SCIFACT.exists():
        rows = list(csv.DictReader(open(SCIFACT, newline="", encoding="utf-8")))[:n]
        return [r["title"] + "\n\n" + " ".join(ast.literal_eval(r["abstract"].replace("'\n '", "', '"))) for r in rows]
    words = "cell protein gene brain study patients effect treatment risk model data analysis".split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, 120)) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3, help="embedding runs of each side (median and spread)")
    args = ap.parse_args()
    from runner import api

    texts = corpus(args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = work / "docs"
        docs.mkdir()
        (docs / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (work / "r.yaml").write_text(
            "index:\n  documents: [{path: docs}]\n  chunk: {size: 4000, overlap: 0}\n"
            "  embed: {batch_size: 64}\n  exact_below: 0\n"
            "  hnsw: {M: 16, ef_construction: 200, ef_search: 64}\n"
        )
        build = api.load(work / "r.yaml", cache_dir=work / "cache")
        t = time.perf_counter()
        result = api.apply(build)
        full = time.perf_counter() - t
        steps = {s.name: s for s in result.steps}
        n_chunks = steps["embed"].artifact.manifest["rows"]["vectors"]
        embed_s = steps["embed"].artifact.manifest["metrics"]["encode_seconds"]  # model load excluded, as below

        # 2. direct encode of the same chunk texts with the same model and batch size, interleaved with fresh
        # builds of the step (model load excluded on both sides: the step reports its encode time)
        import statistics

        from runner.steps.embedding import load_embedder
        from stores.datastore import connect

        con = connect()
        chunks = [
            r[0]
            for r in con.execute(
                f"select text from {api.table_sqls(build.cache, steps['chunk'].key)['rows']}"
            ).fetchall()
        ]
        model = load_embedder("all-MiniLM-L6-v2", {})

        def encode_direct() -> tuple[float, np.ndarray]:
            t = time.perf_counter()
            out = model.encode(
                chunks, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
            return time.perf_counter() - t, out

        def encode_step(rep: int) -> float:
            again = api.apply(api.load(work / "r.yaml", cache_dir=work / f"cache-embed-{rep}"))
            return next(s for s in again.steps if s.name == "embed").artifact.manifest["metrics"]["encode_seconds"]

        step_runs, direct_runs = [embed_s], []
        for rep in range(1, 2 * args.repeat):  # step (the build above), encode, encode, step, step, encode, ...
            if (rep + 1) // 2 % 2:
                seconds, vecs = encode_direct()
                direct_runs.append(seconds)
            else:
                step_runs.append(encode_step(rep))
        embed_s, direct_s = statistics.median(step_runs), statistics.median(direct_runs)

        # 1. query throughput: same vectors, same index file, same ef
        retriever = api.retriever(build)
        import hnswlib

        raw = hnswlib.Index(space="cosine", dim=vecs.shape[1])
        raw.load_index(str(steps["index"].artifact.file("index") / "index.bin"))
        raw.set_ef(64)
        rng = np.random.default_rng(1)
        queries = (
            vecs[rng.integers(0, len(vecs), args.queries)] + rng.normal(0, 0.02, (args.queries, vecs.shape[1]))
        ).astype(np.float32)
        texts_by_label = [c[5] for c in retriever.chunks]  # what a raw-hnswlib user keeps to turn labels into text

        def timed(f) -> float:  # queries/s, median of 5 passes
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                f()
                runs.append(time.perf_counter() - t)
            return args.queries / statistics.median(runs)

        # one query at a time: raw knn_query + looking the texts up, vs runner's hits (text, source, score)
        raw_qps = timed(lambda: [[texts_by_label[i] for i in raw.knn_query(q, k=5)[0][0]] for q in queries])
        # chunk hits, as raw hnswlib gives (the default groups the 100 nearest chunks by document: more work)
        ours_qps = timed(lambda: [retriever.search_vectors(q[None, :], [""], 5, group_by="chunk") for q in queries])
        docs_qps = timed(lambda: [retriever.search_vectors(q[None, :], [""], 5) for q in queries])
        # all queries in one call (hnswlib parallelises a batch)
        raw_batch = timed(lambda: [[texts_by_label[i] for i in row] for row in raw.knn_query(queries, k=5)[0]])
        ours_batch = timed(lambda: retriever.search_vectors(queries, [""] * len(queries), 5, group_by="chunk"))

        # 3. change 1% of the documents and re-apply
        changed = list(texts)
        for i in range(0, len(changed), 100):
            changed[i] = changed[i] + " (revised)"
        (docs / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in changed))
        t = time.perf_counter()
        again = api.apply(api.load(work / "r.yaml", cache_dir=work / "cache"))
        reindex = time.perf_counter() - t
        m = next(s for s in again.steps if s.name == "embed").artifact.manifest["metrics"]

    print(f"{len(texts)} documents, {n_chunks} chunks; full build {full:.1f} s")
    print(f"queries/s: median of 5 passes over {args.queries} queries")
    print(
        f"query, one at a time: runner {ours_qps:,.0f} q/s, raw hnswlib + text lookup {raw_qps:,.0f} q/s "
        f"-> ratio {ours_qps / raw_qps:.2f}x (target >= 0.9x); runner's default document hits (5 documents "
        f"from the 100 nearest chunks): {docs_qps:,.0f} q/s"
    )
    print(
        f"query, one batch of {args.queries}: runner {ours_batch:,.0f} q/s, raw hnswlib + text lookup "
        f"{raw_batch:,.0f} q/s -> ratio {ours_batch / raw_batch:.2f}x"
    )
    print(
        f"embedding (model load excluded on both sides), chunks/s, median (min-max) of {len(step_runs)} runs each: "
        f"step {n_chunks / embed_s:,.0f} ({n_chunks / max(step_runs):,.0f}-{n_chunks / min(step_runs):,.0f}), "
        f"direct encode {n_chunks / direct_s:,.0f} ({n_chunks / max(direct_runs):,.0f}-{n_chunks / min(direct_runs):,.0f}) "
        f"-> ratio {direct_s / embed_s:.2f}x (target >= 1.0x)"
    )
    print(
        f"re-index after changing 1% ({m['embedded']} chunks embedded, {m['reused']} reused): {reindex:.2f} s "
        f"= {100 * reindex / full:.1f}% of the full build (target <= 5%)"
    )


if __name__ == "__main__":
    main()
