"""Document steps: read files into a documents table, then cut them into chunks.

Text files (.txt, .md), HTML, PDF (pypdf) and the rows of JSON/JSONL/CSV files (a text
column) become documents, each hashed by content. A file that cannot be read, or yields no
text, is a reject with its reason. Chunks respect paragraphs, overlap by a few characters
(or tokens), and record their document, position and source path.
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
from stores.hashing import hash_bytes

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
TABLE_SUFFIXES = {".json", ".jsonl", ".csv"}


class DocumentSource(Params):
    """Documents from a file or a folder (filtered by `glob`); table files give one document per row."""

    path: str = Field(description="file or folder, relative to the recipe")
    glob: str = Field("**/*", description="inside a folder: which files")
    text: str = Field("text", description="for .json/.jsonl/.csv: the column holding the text")
    title: str | None = Field(None, description="for tables: a column holding a title")

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
    return sorted(p for p in root.glob(glob) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_table_rows(path: Path) -> list[Any]:
    """The rows of a .csv, .jsonl or .json file (a JSON file holds a list, or one object)."""
    text = path.read_bytes().decode("utf-8")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = json.loads(text)
    return rows if isinstance(rows, list) else [rows]


def _read(path: Path, src: DocumentSource) -> Iterator[tuple[str, str, str]]:
    """(suffix id, title, text) for each document in the file; raises ValueError with the reason."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield "", path.stem, path.read_bytes().decode("utf-8")
    elif suffix in HTML_SUFFIXES:
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(path.read_bytes(), "html.parser")
        for tag in soup(["script", "style", "noscript"]):
            tag.decompose()
        title = soup.title.get_text(strip=True) if soup.title else path.stem
        yield "", title, soup.get_text("\n")
    elif suffix == ".pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            pages = [page.extract_text() or "" for page in PdfReader(path).pages]
        except (PdfReadError, ValueError, KeyError) as exc:
            raise ValueError(f"unreadable PDF ({exc})") from None
        yield "", path.stem, "\n\n".join(pages)
    elif suffix in TABLE_SUFFIXES:
        for n, row in enumerate(read_table_rows(path), start=1):
            if not isinstance(row, dict) or not isinstance(row.get(src.text), str):
                raise ValueError(f"row {n} has no text column {src.text!r}")
            title = str(row.get(src.title, "")) if src.title else f"{path.stem} #{n}"
            yield f"#{n}", title, row[src.text]
    else:
        raise ValueError(f"unsupported file type {suffix or '(none)'}")


@step("docs", version="2", params=DocsParams, libs=("duckdb", "pypdf", "beautifulsoup4"))
def read_docs(ctx: StepContext) -> None:
    from runner.steps.tables import finish, load_table
    from stores.datastore import REJECT_COLUMNS, connect

    p: DocsParams = ctx.params
    docs: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    n_in = 0
    for src in p.sources:
        root = ctx.files[src.path]
        for f in _files(root, src.glob):
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            shown = f"{src.path.rstrip('/')}/{rel}" if root.is_dir() else src.path
            try:
                found = list(_read(f, src))
            except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                n_in += 1
                detail = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
                rejects.append({"id": shown, "source": src.path, "step": ctx.name, "reason": "unreadable", "detail": detail})
                continue
            for suffix, title, text in found:
                n_in += 1
                text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n")).strip()
                doc_id = shown + suffix
                if not text:
                    rejects.append({"id": doc_id, "source": src.path, "step": ctx.name, "reason": "empty_text",
                                    "detail": "no text"})
                    continue
                docs.append({"id": doc_id, "source": src.path, "title": title, "text": text,
                             "hash": hash_bytes(text.encode())})
        ctx.progress(None, n_in)
    con = connect()
    try:
        load_table(con, "d", "id VARCHAR, source VARCHAR, title VARCHAR, text VARCHAR, hash VARCHAR", docs)
        load_table(con, "r", REJECT_COLUMNS, rejects)
        finish(ctx, con, "select * from d", "select * from r", n_in)
    finally:
        con.close()


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def chunk_text(text: str, size: int, overlap: int, length: Callable[[str], int]) -> list[str]:
    """Greedy paragraph packing up to `size`; a paragraph longer than `size` is cut at word boundaries.
    Each chunk after the first starts with the last `overlap` (by `length`) of the one before."""
    units: list[str] = []
    for para in split_paragraphs(text):
        if length(para) <= size:
            units.append(para)
            continue
        words, piece = para.split(), ""
        for w in words:
            cand = f"{piece} {w}".strip()
            if piece and length(cand) > size:
                units.append(piece)
                piece = w
            else:
                piece = cand
        if piece:
            units.append(piece)
    chunks: list[str] = []
    current = ""
    for unit in units:
        cand = f"{current}\n\n{unit}" if current else unit
        if current and length(cand) > size:
            chunks.append(current)
            tail = _tail(current, overlap, length)
            current = f"{tail}\n\n{unit}" if tail and length(f"{tail}\n\n{unit}") <= size else unit
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
    while words and length(" ".join([words[-1]] + tail)) <= overlap:
        tail.insert(0, words.pop())
    return " ".join(tail)


@step("chunk", version="1", params=ChunkParams, libs=("duckdb",))
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
                out.append({"id": f"{doc_id}@{pos}", "doc_id": doc_id, "source": source, "title": title,
                            "position": pos, "text": chunk, "hash": hash_bytes(chunk.encode())})
            if i % 100 == 0:
                ctx.progress(len(docs), i)
        load_table(con, "c", "id VARCHAR, doc_id VARCHAR, source VARCHAR, title VARCHAR, position INTEGER, "
                             "text VARCHAR, hash VARCHAR", out)
        load_table(con, "none", REJECT_COLUMNS, [])
        used = len({c["doc_id"] for c in out})
        finish(ctx, con, "select * from c", "select * from none", len(docs), used=used, unit="documents")
    finally:
        con.close()
