"""Vector search on real embeddings: runner's index (`stores.vectors`, what the index step builds and
`runner query`/`serve` search) against hnswlib direct, faiss `IndexHNSWFlat` and usearch, at equal recall.

Vectors: 100k all-MiniLM-L6-v2 embeddings of real text (made and cached by bench_index_scale.py); queries:
the 1,401 SciFact claims, held out. Every index is HNSW with M=16 (usearch: connectivity 16) and
ef_construction=200, built and queried on one thread. For each ef_search in a sweep: recall@10 against exact
search and queries per second (all queries in one batch call, median of --repeat). The claim: at the smallest
ef where each library reaches recall@10 >= --target, runner's QPS against the best library's.

    python benchmarks/bench_index_scale.py --sizes 100000      # once: makes the embeddings (~40 min on 2 cores)
    python benchmarks/bench_vectors.py [--size 100000] [--cache /tmp/bench-index-scale]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EFS = [16, 24, 32, 48, 64, 96, 128, 192, 256]
K = 10


def runner_index(vectors: np.ndarray, tmp: Path) -> tuple[Any, Callable[[int], None], Callable[[np.ndarray], Any]]:
    from stores.vectors import VectorIndex, build

    build(vectors, tmp / "runner", metric="cosine", m=16, ef_construction=200, exact=False, info={})
    index = VectorIndex.open(tmp / "runner")
    return index, index.hnsw.set_ef, lambda q: index.nearest(q, K)[0]


def hnswlib_index(vectors: np.ndarray, tmp: Path) -> tuple[Any, Callable[[int], None], Callable[[np.ndarray], Any]]:
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=16, ef_construction=200, random_seed=100)
    index.set_num_threads(1)
    index.add_items(vectors, np.arange(len(vectors)))
    return index, index.set_ef, lambda q: index.knn_query(q, k=K)[0]


def faiss_index(vectors: np.ndarray, tmp: Path) -> tuple[Any, Callable[[int], None], Callable[[np.ndarray], Any]]:
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.IndexHNSWFlat(vectors.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    index.add(vectors)  # unit vectors: inner product ranks as cosine does

    def set_ef(ef: int) -> None:
        index.hnsw.efSearch = ef

    return index, set_ef, lambda q: index.search(q, K)[1]


def usearch_index(vectors: np.ndarray, tmp: Path) -> tuple[Any, Callable[[int], None], Callable[[np.ndarray], Any]]:
    from usearch.index import Index

    index = Index(ndim=vectors.shape[1], metric="cos", dtype="f32", connectivity=16, expansion_add=200)
    index.add(np.arange(len(vectors)), vectors, threads=1)

    def set_ef(ef: int) -> None:
        index.expansion_search = ef

    return index, set_ef, lambda q: index.search(q, K, threads=1).keys


LIBS = {"runner": runner_index, "hnswlib": hnswlib_index, "faiss": faiss_index, "usearch": usearch_index}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bench-index-scale"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.98)
    args = ap.parse_args()
    path = args.cache / f"corpus-{args.size}.npy"
    if not path.exists():
        raise SystemExit(f"no {path}: run `python benchmarks/bench_index_scale.py --sizes {args.size}` first")
    vectors = np.ascontiguousarray(np.load(path), dtype=np.float32)
    queries = np.ascontiguousarray(np.load(args.cache / "claims.npy"), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :K]
    print(f"{len(vectors):,} x {vectors.shape[1]} real embeddings, {len(queries):,} held-out queries, one thread")
    best: dict[str, tuple[int, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in LIBS.items():
            t = time.perf_counter()
            _, set_ef, search = make(vectors, Path(tmp))
            built = time.perf_counter() - t
            row = []
            for ef in EFS:
                set_ef(ef)
                got = np.asarray(search(queries))
                recall = float(
                    np.mean([len(set(g) & set(w)) / K for g, w in zip(got.tolist(), truth.tolist(), strict=False)])
                )
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    search(queries)
                    times.append(time.perf_counter() - t)
                qps = len(queries) / statistics.median(times)
                row.append(f"ef {ef}: {recall:.3f} @ {qps:,.0f} q/s")
                if recall >= args.target and name not in best:
                    best[name] = (ef, recall, qps)
            print(f"{name:<8} build {built:6.1f} s | " + " | ".join(row))
    top = max((v[2], k) for k, v in best.items() if k != "runner")
    print(f"\nat the smallest ef reaching recall@10 >= {args.target}:")
    for name, (ef, recall, qps) in best.items():
        print(
            f"  {name:<8} ef {ef:>3}  recall {recall:.3f}  {qps:>8,.0f} q/s  ({qps / top[0]:.2f}x the best peer, {top[1]})"
        )


if __name__ == "__main__":
    main()
