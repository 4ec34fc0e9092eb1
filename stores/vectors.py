"""The vector store: an hnswlib index (or exact search for small sets) over float32 vectors, and a
content-addressed memo of vectors keyed by (model, text hash) so unchanged chunks are never embedded twice.

No ML here: vectors come in as numpy arrays.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Metric = Literal["cosine", "l2", "ip"]
INDEX_FILE = "index.bin"
VECTORS_FILE = "vectors.npy"
INFO_FILE = "index.json"


def build(vectors: np.ndarray, out: Path, *, metric: Metric, m: int, ef_construction: int, exact: bool,
          info: dict[str, Any], seed: int = 100, threads: int = 1) -> None:
    """Write an index of `vectors` (label i = row i) into `out`; one thread by default, so the file is reproducible."""
    out.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if exact or len(vectors) == 0:
        np.save(out / VECTORS_FILE, vectors)
    else:
        import hnswlib

        index = hnswlib.Index(space=metric, dim=vectors.shape[1])
        index.init_index(max_elements=len(vectors), M=m, ef_construction=ef_construction, random_seed=seed)
        index.add_items(vectors, np.arange(len(vectors)), num_threads=threads)
        index.save_index(str(out / INDEX_FILE))
    meta = {**info, "metric": metric, "M": m, "ef_construction": ef_construction, "exact": exact or len(vectors) == 0,
            "count": int(len(vectors)), "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0}
    (out / INFO_FILE).write_text(json.dumps(meta, sort_keys=True, indent=1))


@dataclass
class VectorIndex:
    info: dict[str, Any]
    hnsw: Any = None
    vectors: np.ndarray | None = None

    @classmethod
    def open(cls, path: Path, *, ef_search: int | None = None) -> VectorIndex:
        info = json.loads((path / INFO_FILE).read_text())
        if info["exact"]:
            return cls(info, vectors=np.load(path / VECTORS_FILE))
        import hnswlib

        index = hnswlib.Index(space=info["metric"], dim=info["dim"])
        index.load_index(str(path / INDEX_FILE), max_elements=info["count"])
        index.set_ef(max(ef_search or info.get("ef_search", 64), 1))
        return cls(info, hnsw=index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, similarities) of the k nearest, best first; similarity = 1 - distance (cosine, ip) or -distance (l2)."""
        labels, distances = self.nearest(queries, k)
        return labels, (-distances if self.info["metric"] == "l2" else 1.0 - distances)

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, distances) in hnswlib's conventions, nearest first. The hot path: no conversions."""
        if self.hnsw is not None and k <= self.info["count"]:
            return self.hnsw.knn_query(queries, k=k)  # type: ignore[no-any-return]
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(k, self.info["count"])
        if k == 0:
            return np.zeros((len(queries), 0), dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32)
        if self.hnsw is not None:
            return self.hnsw.knn_query(queries, k=k)  # type: ignore[no-any-return]
        return exact_search(self.vectors, queries, k, self.info["metric"])  # type: ignore[arg-type]


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Brute force, with hnswlib's distance conventions (cosine: 1 - cos, ip: 1 - dot, l2: squared)."""
    if metric == "cosine":
        v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        dist = 1.0 - q @ v.T
    elif metric == "ip":
        dist = 1.0 - queries @ vectors.T
    else:
        dist = (queries**2).sum(1)[:, None] - 2 * queries @ vectors.T + (vectors**2).sum(1)[None, :]
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(dist, idx, axis=1)


class VectorMemo:
    """Vectors by text hash for one embedding model: append-only Parquet shards, safe for concurrent writers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, hashes: list[str]) -> dict[str, np.ndarray]:
        import duckdb

        shards = sorted(self.root.glob("part-*.parquet"))
        if not shards or not hashes:
            return {}
        con = duckdb.connect()
        try:
            con.register("wanted", _arrow_table(hashes))
            files = "[" + ", ".join("'" + str(s).replace("'", "''") + "'" for s in shards) + "]"
            rows = con.execute(f"select distinct on (h) h, v from read_parquet({files}) semi join wanted using (h)").fetchall()
        finally:
            con.close()
        return {h: np.asarray(v, dtype=np.float32) for h, v in rows}

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"h": list(vectors), "v": [v.astype(np.float32).tolist() for v in vectors.values()]})
        tmp = self.root / f".part-{os.getpid()}-{secrets.token_hex(6)}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.root / f"part-{secrets.token_hex(8)}.parquet")


def _arrow_table(hashes: list[str]) -> Any:
    import pyarrow as pa

    return pa.table({"h": hashes})
