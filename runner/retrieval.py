"""Retrieval over a recipe's index: the Python API behind `runner query` and document chat.

A `Retriever` holds the index, its chunk table and the embedding model it was built with;
asking it to use another model is an error (mixing embedding spaces silently gives garbage).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from runner.errors import RunnerError, UsageError
from stores.cache import Artifact


class Hit(NamedTuple):
    chunk_id: str
    doc_id: str
    source: str
    title: str
    position: int
    text: str
    score: float


def docs_prompt(question: str, hits: list[Hit]) -> str:
    """The user turn for document chat: the retrieved chunks, numbered for citation, then the question."""
    context = "\n\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, start=1))
    return f"Answer using the context below; cite it as [n].\n\n{context}\n\nQuestion: {question}"


class Retriever:
    """Search: the question's vector against the index (and BM25 when hybrid), `depth` candidates from each
    ranking, fused, grouped to documents (each with its best chunk) unless asked for chunks, then cut to k.
    The first results do not depend on k (for k up to `depth`)."""

    def __init__(
        self, artifact: Artifact, embed_files: dict[str, Any], *, model: str | None = None, ef_search: int | None = None
    ) -> None:
        import pyarrow.parquet as pq

        from stores.vectors import VectorIndex

        self.index = VectorIndex.open(artifact.file("index"), ef_search=ef_search)
        self.model_name = self.index.info["model"]
        self.has_bm25 = bool(self.index.info.get("hybrid", False))
        self.group_by = self.index.info.get("group_by", "chunk")
        self.depth = int(self.index.info.get("depth", 100))
        if model is not None and not self._same_model(model, embed_files):
            raise RunnerError(
                f"this index was built with embedding model {self.model_name!r}; querying it with "
                f"{model!r} would compare vectors from different spaces. Rebuild the index with "
                f"{model!r} or query with {self.model_name!r}"
            )
        table = pq.read_table(
            artifact.file("chunks.parquet"), columns=["id", "doc_id", "source", "title", "position", "text"]
        )
        self.chunks: list[tuple[str, str, str, str, int, str]] = list(
            zip(*(table.column(c).to_pylist() for c in table.column_names), strict=False)
        )  # Hit fields, in order
        self._files = embed_files
        self._model: Any = None
        self._bm25: Any = None
        self._artifact = artifact

    def _same_model(self, model: str, files: dict[str, Any]) -> bool:
        """The same model by identity (bundled package or files' hash), whatever name it goes by."""
        from runner.steps.embedding import model_files

        built = self.index.info.get("model_files")
        return model_files(model, files) == built if built else model == self.model_name

    @property
    def count(self) -> int:
        return int(self.index.info["count"])

    def truncated(self, question: str) -> int | None:
        """The model's window in tokens if `question` is longer (only that much of it is embedded), else None."""
        window = getattr(self.model, "max_seq_length", None)
        if not window:
            return None
        n = len(self.model.tokenizer(question, add_special_tokens=True)["input_ids"])
        return int(window) if n > window else None

    @property
    def model(self) -> Any:
        if self._model is None:
            from runner.steps.embedding import load_embedder

            self._model = load_embedder(self.model_name, self._files)
        return self._model

    def embed(self, texts: list[str]) -> Any:
        from runner.steps.embedding import embed

        return embed(self.model, texts, 64)

    def search(
        self, question: str, k: int = 5, *, hybrid: bool | None = None, group_by: str | None = None
    ) -> list[Hit]:
        if not question.strip():
            raise UsageError("the question is empty; ask something")
        return self.search_vectors(self.embed([question]), [question], k, hybrid=hybrid, group_by=group_by)[0]

    def search_vectors(
        self, vectors: Any, questions: list[str], k: int, *, hybrid: bool | None = None, group_by: str | None = None
    ) -> list[list[Hit]]:
        if k < 1:
            raise UsageError(f"k must be at least 1, got {k}")
        if self.count == 0:
            raise RunnerError("the index is empty: its documents gave no chunks (see the docs step's rejects)")
        use_bm25 = self.has_bm25 if hybrid is None else hybrid
        if use_bm25 and not self.has_bm25:
            raise RunnerError("this index has no BM25 part; set index.hybrid: true and apply to use hybrid search")
        grouped = (group_by or self.group_by) == "document"
        chunks = self.chunks
        if not use_bm25 and not grouped:  # the hot path: hnswlib's answer straight into hits
            labels, distances = self.index.nearest(vectors, min(k, self.count))
            offset = 0.0 if self.index.info["metric"] == "l2" else 1.0  # similarity = offset - distance
            make = tuple.__new__  # a Hit without NamedTuple's Python-level __new__: half the cost per hit
            return [
                [make(Hit, chunks[lb] + (offset - d,)) for lb, d in zip(ls, ds, strict=False)]
                for ls, ds in zip(labels.tolist(), distances.tolist(), strict=False)
            ]
        depth = min(max(self.depth, k), self.count)  # a fixed candidate depth: the order does not depend on k
        labels, scores = self.index.search(vectors, depth)
        out = []
        for question, row_labels, row_scores in zip(questions, labels.tolist(), scores.tolist(), strict=False):
            ranked = list(zip(row_labels, row_scores, strict=False))
            if use_bm25:
                ranked = self._fuse(ranked, self._bm25_rank(question, depth))
            hits: list[Hit] = []
            seen: set[str] = set()
            for label, score in ranked:
                doc = chunks[label][1]
                if grouped and doc in seen:
                    continue
                seen.add(doc)
                hits.append(Hit._make((*chunks[label], score)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def _bm25_rank(self, question: str, k: int) -> list[tuple[int, float]]:
        import bm25s

        if self._bm25 is None:
            self._bm25 = bm25s.BM25.load(str(self._artifact.file("bm25")))
        k = min(k, len(self.chunks))
        docs, scores = self._bm25.retrieve(
            bm25s.tokenize([question], stopwords="en", show_progress=False), k=k, show_progress=False
        )
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0], strict=False) if s > 0]

    @staticmethod
    def _fuse(*rankings: list[tuple[int, float]], c: int = 60) -> list[tuple[int, float]]:
        """Reciprocal rank fusion: score = sum of 1 / (c + rank) over the rankings a chunk appears in."""
        fused: dict[int, float] = {}
        for ranking in rankings:
            for rank, (label, _) in enumerate(ranking, start=1):
                fused[label] = fused.get(label, 0.0) + 1.0 / (c + rank)
        return sorted(fused.items(), key=lambda x: (-x[1], x[0]))
