"""Document steps: read files into a documents table, then cut them into chunks.

Text files (.txt, .md), HTML, PDF (pypdf) and the rows of JSON/JSONL/CSV files (a text
column, optionally an id, a title and metadata columns) become documents, each hashed by
content. A file that cannot be read is a reject; in a table file each row stands alone: a
row without text, not UTF-8 or not JSON is a reject with its reason and every good row is a
document (`in = out + rejected` counts rows). Chunks pack sentences within paragraphs, merge a
short paragraph (a title) into the next, repeat `overlap` of the previous chunk, and record
their document, position and source path.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepContext, step
from runner.steps.reasons import Rejected
from stores.hashing import hash_bytes

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
TABLE_SUFFIXES = {".json", ".jsonl", ".csv"}


class DocumentSource(Params):
    """Documents from a file or a folder (filtered by `glob`); table files give one document per row."""

    path: str = Field(description="file or folder, relative to the recipe")
    glob: str = Field("**/*", description="inside a folder: which files")
    text: str = Field("text", description="for .json/.jsonl/.csv: the column holding the text")
    id: str | None = Field(
        None,
        description="for tables: a column holding a stable document id (default: "
        "FILE#ROW, which moves when rows are added or removed)",
    )
    title: str | None = Field(None, description="for tables: a column holding a title")
    metadata: list[str] = Field(default_factory=list, description="for tables: columns kept with each document")

    def external_paths(self) -> dict[str, str]:
        return {"path": self.path}


class DocsParams(Params):
    sources: list[DocumentSource]


class ChunkConfig(Params):
    """How documents are cut: by characters or by tokens of the embedding model's tokenizer."""

    by: Literal["chars", "tokens"] = "chars"
    size: int = Field(800, ge=16, description="chunk length (characters or tokens)")
    overlap: int = Field(100, ge=0, description="how much of the previous chunk a chunk repeats")

    @model_validator(mode="after")
    def _overlap_smaller(self) -> ChunkConfig:
        if self.overlap >= self.size:
            raise ValueError("overlap must be smaller than size")
        return self


class ChunkParams(Params):
    chunk: ChunkConfig
    model: str = Field(description="embedding model (its tokenizer counts tokens)")


def _files(root: Path, glob: str) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.glob(glob)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def read_table_rows(path: Path) -> list[Any]:
    """The rows of a .csv, .jsonl or .json file (a JSON file holds a list, or one object). Raises on the
    first bad row (question files must be whole); documents use `table_records`, which does not."""
    out = []
    for _, row, error in table_records(path):
        if error is not None:
            raise ValueError(f"{path.name} {error}")
        out.append(row)
    return out


def table_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(row number, row, why it cannot be read) for each row; a bad row does not stop the others."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            n = 0
            for raw in f:
                if not raw.strip():
                    continue
                n += 1
                try:
                    yield n, json.loads(raw.decode("utf-8")), None
                except UnicodeDecodeError as exc:
                    yield n, None, f"row {n}: not UTF-8 (byte {exc.start})"
                except (ValueError, RecursionError) as exc:
                    yield n, None, f"row {n}: invalid JSON ({exc})"
    elif suffix == ".csv":
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
        for n, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1):
            if any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in row.values()):
                yield n, None, f"row {n}: not UTF-8"
            else:
                yield n, row, None
    else:
        rows = json.loads(path.read_bytes().decode("utf-8"))
        for n, row in enumerate(rows if isinstance(rows, list) else [rows], start=1):
            yield n, row, None


def _read(path: Path, src: DocumentSource) -> Iterator[tuple[int, tuple[str, str, str, dict[str, Any]] | Rejected]]:
    """(number, (id suffix, title, text, metadata)) for each document in the file, or (number, reject) for a
    bad table row; raises ValueError (or UnicodeDecodeError) when the file as a whole cannot be read."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield 1, ("", path.stem, path.read_bytes().decode("utf-8"), {})
    elif suffix in HTML_SUFFIXES:
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(path.read_bytes(), "html.parser")
        for tag in soup(["script", "style", "noscript"]):
            tag.decompose()
        title = soup.title.get_text(strip=True) if soup.title else path.stem
        yield 1, ("", title, soup.get_text("\n"), {})
    elif suffix == ".pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            pages = [page.extract_text() or "" for page in PdfReader(path).pages]
        except (PdfReadError, ValueError, KeyError) as exc:
            raise ValueError(f"unreadable PDF ({exc})") from None
        yield 1, ("", path.stem, "\n\n".join(pages), {})
    elif suffix in TABLE_SUFFIXES:
        for n, row, error in table_records(path):
            if error is not None:
                yield n, Rejected("unreadable", error)
            elif not isinstance(row, dict):
                yield n, Rejected("unreadable", f"row {n}: not an object")
            elif not isinstance(row.get(src.text), str):
                what = "missing" if row.get(src.text) is None else f"{type(row.get(src.text)).__name__}, not text"
                yield n, Rejected("missing_field", f"row {n}: text column {src.text!r} is {what}")
            elif src.id is not None and row.get(src.id) in (None, ""):
                yield n, Rejected("missing_field", f"row {n}: id column {src.id!r} is empty")
            else:
                title = str(row.get(src.title) or "") if src.title else f"{path.stem} #{n}"
                suffix_id = f"#{n}" if src.id is None else f"#{row[src.id]}"
                yield n, (suffix_id, title, row[src.text], {c: row.get(c) for c in src.metadata})
    else:
        raise ValueError(f"unsupported file type {suffix or '(none)'}")


@step("docs", version="3", params=DocsParams, libs=("duckdb", "pypdf", "beautifulsoup4"))
def read_docs(ctx: StepContext) -> None:
    from runner.steps.tables import finish, load_table
    from stores.datastore import REJECT_COLUMNS, connect

    p: DocsParams = ctx.params
    docs: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    first: dict[str, str] = {}  # document id -> where it came from
    n_in = 0

    def reject(doc_id: str, src: DocumentSource, why: Rejected) -> None:
        rejects.append({"id": doc_id, "source": src.path, "step": ctx.name, "reason": why.reason, "detail": why.detail})

    for src in p.sources:
        root = ctx.files[src.path]
        for f in _files(root, src.glob):
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            shown = f"{src.path.rstrip('/')}/{rel}" if root.is_dir() else src.path
            try:
                found = list(_read(f, src))
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                n_in += 1
                reject(
                    shown, src, Rejected("unreadable", "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc))
                )
                continue
            for n, item in found:
                n_in += 1
                if isinstance(item, Rejected):
                    reject(f"{shown}#{n}", src, item)
                    continue
                suffix, title, text, meta = item
                text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n")).strip()
                doc_id = shown + suffix if src.id is None else suffix[1:]
                if not text:
                    reject(doc_id, src, Rejected("empty_text", "no text"))
                elif doc_id in first:
                    reject(doc_id, src, Rejected("duplicate_id", f"{shown} row {n} repeats the id of {first[doc_id]}"))
                else:
                    first[doc_id] = f"{shown} row {n}"
                    docs.append(
                        {
                            "id": doc_id,
                            "source": src.path,
                            "title": title,
                            "text": text,
                            "hash": hash_bytes(text.encode()),
                            "metadata": json.dumps(meta, sort_keys=True, default=str) if meta else None,
                        }
                    )
        ctx.progress(None, n_in)
    if not docs:
        ctx.metrics["warning"] = "no documents: the index will be empty"
    con = connect()
    try:
        load_table(
            con, "d", "id VARCHAR, source VARCHAR, title VARCHAR, text VARCHAR, hash VARCHAR, metadata VARCHAR", docs
        )
        load_table(con, "r", REJECT_COLUMNS, rejects)
        finish(ctx, con, "select * from d", "select * from r", n_in)
    finally:
        con.close()


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?…。])[\"')\]]*\s+(?=\S)")


def _sentences(para: str, most: int, length: Callable[[str], int]) -> list[str]:
    """A paragraph as sentences, each at most `most` long (a longer sentence is cut at word boundaries)."""
    out: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(para) if s.strip()):
        if length(sentence) <= most:
            out.append(sentence)
            continue
        piece = ""
        for w in sentence.split():
            cand = f"{piece} {w}".strip()
            if piece and length(cand) > most:
                out.append(piece)
                piece = w
            else:
                piece = cand
        if piece:
            out.append(piece)
    return out


def chunk_text(text: str, size: int, overlap: int, length: Callable[[str], int]) -> list[str]:
    """Chunks of at most `size` (by `length`). Paragraphs are kept whole where they fit; a paragraph too long
    for the room left is packed sentence by sentence (words for an over-long sentence), so chunks end at
    sentence ends. A short paragraph (a title, under a quarter of `size`) never stands alone when text
    follows: it opens the next chunk. Each chunk after the first starts with the last `overlap` of the one
    before (whole words), always: pieces are cut to leave room for it."""
    room = max(size - overlap - 2, 1)  # 2: the joiner between the overlap and what follows
    chunks: list[str] = []
    current = ""

    def emit() -> str:
        chunks.append(current)
        return _tail(current, overlap, length)

    for para in split_paragraphs(text):
        joined = f"{current}\n\n{para}" if current else para
        if length(joined) <= size:
            current = joined
            continue
        if current and length(current) >= size / 4 and length(para) <= room:  # the paragraph starts a chunk
            tail = emit()
            current = f"{tail}\n\n{para}" if tail else para
            continue
        for i, sentence in enumerate(_sentences(para, room, length)):
            cand = f"{current}{' ' if i else chr(10) * 2}{sentence}" if current else sentence
            if current and length(cand) > size:
                tail = emit()
                current = f"{tail} {sentence}" if tail else sentence
            else:
                current = cand
    if current:
        chunks.append(current)
    return chunks


def _tail(text: str, overlap: int, length: Callable[[str], int]) -> str:
    if overlap <= 0:
        return ""
    words = text.split()
    tail: list[str] = []
    while words and length(" ".join([words[-1], *tail])) <= overlap:
        tail.insert(0, words.pop())
    return " ".join(tail)


@step("chunk", version="2", params=ChunkParams, libs=("duckdb",))
def chunk_docs(ctx: StepContext) -> None:
    from runner.steps.tables import finish, load_table, open_input
    from stores.datastore import REJECT_COLUMNS, connect

    p: ChunkParams = ctx.params
    length: Callable[[str], int] = len
    if p.chunk.by == "tokens":
        from runner.steps.embedding import load_embedder

        tok = load_embedder(p.model, ctx.files).tokenizer
        length = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    con = connect()
    try:
        docs = con.execute(f"select id, source, title, text from {open_input(ctx)}").fetchall()
        out: list[dict[str, Any]] = []
        for i, (doc_id, source, title, text) in enumerate(docs):
            for pos, chunk in enumerate(chunk_text(text, p.chunk.size, p.chunk.overlap, length)):
                out.append(
                    {
                        "id": f"{doc_id}@{pos}",
                        "doc_id": doc_id,
                        "source": source,
                        "title": title,
                        "position": pos,
                        "text": chunk,
                        "hash": hash_bytes(chunk.encode()),
                    }
                )
            if i % 100 == 0:
                ctx.progress(len(docs), i)
        load_table(
            con,
            "c",
            "id VARCHAR, doc_id VARCHAR, source VARCHAR, title VARCHAR, position INTEGER, text VARCHAR, hash VARCHAR",
            out,
        )
        load_table(con, "none", REJECT_COLUMNS, [])
        used = len({c["doc_id"] for c in out})
        finish(ctx, con, "select * from c", "select * from none", len(docs), used=used, unit="documents")
    finally:
        con.close()
