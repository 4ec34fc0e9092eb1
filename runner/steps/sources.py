"""Source steps: read external files into the common conversation table.

Every record read either becomes a row or a reject with its line/record number and why
(bad JSON, bad UTF-8, a missing or non-text field). Row ids are `<source name>/<record number>`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.tables import REJECTS, ROWS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class Columns(Params):
    """Which input fields hold what. Unset optional fields are left empty."""

    prompt: str = Field("prompt", description="field with the user's message")
    response: str = Field("response", description="field with the assistant's reply")
    system: str | None = Field(None, description="field with a system prompt")
    id: str | None = Field(None, description="field with a stable row id (default: record number)")
    score: str | None = Field(None, description="field with a numeric quality score")
    lang: str | None = Field(None, description="field with a language code")


class TableSource(Params):
    """Rows from a JSONL, JSON (array of objects), CSV or Parquet file, mapped by `columns`."""

    format: Literal["jsonl", "json", "csv", "parquet"]
    name: str = Field(pattern=NAME_PATTERN, description="source name; row ids are NAME/N")
    path: str = Field(description="file path, relative to the recipe that names it")
    columns: Columns = Columns()
    limit: int | None = Field(None, ge=1, description="read at most this many records")


Record = tuple[int, dict[str, Any] | None, str | None]  # (record number, fields, error)


def _jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield n, None, f"line {n}: not UTF-8 (byte {exc.start})"
                continue
            if not text.strip():
                yield n, None, f"line {n}: empty line"
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                yield n, None, f"line {n}: invalid JSON ({exc})"
                continue
            yield (n, value, None) if isinstance(value, dict) else (n, None, f"line {n}: not a JSON object")


def _json(path: Path) -> Iterator[Record]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StepError(f"{path}: not a valid UTF-8 JSON file ({exc}); fix the file or use format: jsonl") from None
    if not isinstance(value, list):
        raise StepError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    for n, item in enumerate(value, start=1):
        yield (n, item, None) if isinstance(item, dict) else (n, None, f"record {n}: not a JSON object")


def _csv(path: Path) -> Iterator[Record]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for n, row in enumerate(reader, start=1):
        if None in row or any(v is None for v in row.values()):
            yield n, None, f"row {n}: wrong number of fields"
        elif any("\udc80" <= ch <= "\udcff" for v in row.values() for ch in v):
            yield n, None, f"row {n}: not UTF-8"
        else:
            yield n, dict(row), None


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for n, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield n, row, None


READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}


def _text(record: dict[str, Any], field: str | None, required: bool) -> str | None:
    if field is None:
        return None
    if field not in record or record[field] is None:
        if required:
            raise ValueError(f"missing field {field!r}")
        return None
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is {type(value).__name__}, not text")
    return value


def to_row(source: str, n: int, record: dict[str, Any], cols: Columns) -> dict[str, Any]:
    """One record as a conversation row; raises ValueError with the reason when it cannot be."""
    turns = []
    system = _text(record, cols.system, required=False)
    if system:
        turns.append({"role": "system", "text": system})
    turns.append({"role": "user", "text": _text(record, cols.prompt, required=True)})
    turns.append({"role": "assistant", "text": _text(record, cols.response, required=True)})
    score = record.get(cols.score) if cols.score else None
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ValueError(f"field {cols.score!r} is not a number")
    row_id = f"{source}/{record[cols.id]}" if cols.id and record.get(cols.id) is not None else f"{source}/{n}"
    return {"id": row_id, "source": source, "turns": turns, "score": score, "lang": _text(record, cols.lang, False)}


def write_source(ctx: StepContext, source: str, records: Iterator[Record], convert: Any) -> None:
    """Shared by every source format: convert records, keep rejects, write both tables."""
    import pyarrow as pa

    from runner.steps.tables import finish
    from stores.datastore import REJECT_COLUMNS, ROW_COLUMNS, connect

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    seen = 0
    for n, record, error in records:
        seen += 1
        if seen % 10000 == 0:
            ctx.progress(None, seen)
        if error is None:
            try:
                rows.append(convert(n, record))
                continue
            except ValueError as exc:
                error = f"record {n}: {exc}"
        rejects.append({"id": f"{source}/{n}", "source": source, "step": ctx.name, "reason": error})
    con = connect()
    try:
        con.execute(f"create table rows ({ROW_COLUMNS})")
        con.execute(f"create table rejects ({REJECT_COLUMNS})")
        if rows:
            con.register("new_rows", pa.Table.from_pylist(rows))
            con.execute("insert into rows select id, source, turns, score, lang from new_rows")
        if rejects:
            con.register("new_rejects", pa.Table.from_pylist(rejects))
            con.execute("insert into rejects select * from new_rejects")
        dupes = con.execute("select id, count(*) from rows group by id having count(*) > 1 limit 3").fetchall()
        if dupes:
            raise StepError(f"source {source}: row ids are not unique (e.g. {dupes[0][0]!r}); fix `columns.id`")
        finish(ctx, con, "select * from rows", "select * from rejects", seen)
    finally:
        con.close()


@step("source.table", version="1", params=TableSource, libs=("duckdb", "pyarrow"))
def read_table(ctx: StepContext) -> None:
    p: TableSource = ctx.params
    path = ctx.files[p.path]
    records = READERS[p.format](path)
    if p.limit:
        records = itertools.islice(records, p.limit)
    write_source(ctx, p.name, records, lambda n, rec: to_row(p.name, n, rec, p.columns))



class Mix(Params):
    """Concatenate several sources' rows, in the order the recipe lists them."""


@step("mix", version="1", params=Mix, libs=("duckdb",))
def mix_sources(ctx: StepContext) -> None:
    from runner.steps.tables import finish, open_input
    from stores.datastore import REJECT_COLUMNS, connect

    con = connect()
    try:
        parts = [
            f"select *, {i} as _part from {open_input(ctx, name, row_numbers=True)}"
            for i, name in enumerate(ctx.input_names)
        ]
        con.execute(f"create temp table t as {' union all '.join(parts)}")
        con.execute(f"create temp table none ({REJECT_COLUMNS})")
        dupes = con.execute("select id from t group by id having count(*) > 1 limit 1").fetchall()
        if dupes:
            raise StepError(f"mix: row id {dupes[0][0]!r} comes from two sources; give the sources distinct names")
        n = sum(int(a.manifest["rows"]["rows"]) for a in ctx.inputs)
        rows = "select * exclude (_part, file_row_number) from t order by _part, file_row_number"
        finish(ctx, con, rows, "select * from none", n)
    finally:
        con.close()
