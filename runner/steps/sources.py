"""Source steps: read external files into the common conversation table.

Every record read either becomes a row or a reject with its record number and why
(bad JSON, bad UTF-8, a missing or non-text field, no assistant reply). Row ids are
`<source name>/<record number>` unless the source names an id field.

Formats: generic tables (jsonl/json/csv/parquet with a column mapping), Alpaca, Dolly,
ShareGPT (incl. tool roles), h2oGPT `<human>:/<bot>:` text, a `datasets` dataset saved to
disk; OpenAssistant trees live in `oasst.py`. Each is one class registered by `source_kind`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field

from runner.cluster import RESUMED
from runner.params import Params
from runner.registry import StepContext, StepError, add_entry, step
from runner.steps.reasons import Rejected, rejected
from runner.steps.shards import task_dir
from stores.sql import sql_string

if TYPE_CHECKING:
    from runner.cluster import Pool, ShardStore

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
Record = tuple[int, dict[str, Any] | None, "Rejected | None"]  # (record number, fields, why it cannot be read)
Turn = dict[str, str]


def run_source(ctx: StepContext) -> None:
    ctx.params.read(ctx)


S = TypeVar("S", bound="type[SourceBase]")


def _sharded(ctx: StepContext, pool: Any) -> None:
    run_source_sharded(ctx, pool)  # defined below, with the tasks it runs


def source_kind(
    step_kind: str, *, version: str = "2", libs: tuple[str, ...] = ("duckdb", "pyarrow")
) -> Callable[[S], S]:
    """Make a `SourceBase` subclass a recipe source (the values of its `format:` field) run by step `step_kind`.
    A new source is one class with this decorator: its `row` (one record to a row), and its `records` (the
    file's records) unless it reads JSON/JSONL; or its own `read`. A source whose `path` may be a directory
    (`FILE_OR_DIR_FIELDS`) reads its files as Ray tasks under a cluster executor."""

    def add(cls: S) -> S:
        sharded = _sharded if "path" in cls.FILE_OR_DIR_FIELDS else None
        step(step_kind, version=version, params=cls, libs=libs, sharded=sharded, shardable=_shardable)(run_source)
        add_entry("source", cls, step_kind)
        return cls

    return add


def _shardable(params: Any, files: dict[str, Path]) -> bool:
    """Whether a source's run spreads over a cluster: a directory of several files, read whole."""
    path = files.get(params.path)
    if path is None or params.limit or not params.may_be_directory("path"):
        return False
    return len(source_files(path)) > 1


def source_files(path: Path) -> list[Path]:
    """The files a source reads: `path` itself, or every file under the directory `path` (hidden ones aside)
    in the order of their relative paths."""
    if not path.is_dir():
        return [path]
    return [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]


class SourceBase(Params):
    # a directory of files: read in name order, record numbers continuing from file to file
    FILE_OR_DIR_FIELDS = frozenset({"path"})

    name: str = Field(pattern=NAME_PATTERN, description="source name; row ids are NAME/N")
    path: str = Field(
        description="file relative to the recipe that names it, or a directory of files (jsonl, json, csv and the "
        "conversation formats: read in name order, record numbers continuing; on a cluster, a file per task)"
    )
    limit: int | None = Field(None, ge=1, description="read at most this many records")
    weight: float = Field(1.0, gt=0, description="mixing weight: <1 keeps a seeded sample, >1 repeats rows")

    def external_paths(self) -> dict[str, str]:
        return {"path": self.path}

    def read(self, ctx: StepContext) -> None:
        """Write the step's rows and rejects: each of `records` converted by `row`."""
        records = self.records_of(ctx.files[self.path])
        if self.limit:
            records = itertools.islice(records, self.limit)
        convert_records(ctx, self, records, self.row)

    def records(self, path: Path) -> Iterator[Record]:
        return _json_or_jsonl(path)

    def records_of(self, path: Path, first: int = 0) -> Iterator[Record]:
        """The records of `path` (a file, or a directory's files in turn), numbered on from `first`; a reject's
        detail names its file when there are several."""
        if not self.may_be_directory("path"):  # a directory is one input (a saved dataset)
            yield from self.records(path)
            return
        files = source_files(path)
        for file in files:
            last = 0
            for n, record, error in self.numbered(file, first, str(file.relative_to(path)) if len(files) > 1 else None):
                yield n, record, error
                last = n
            first = last or first

    def numbered(self, file: Path, first: int, label: str | None) -> Iterator[Record]:
        """One file's records, numbered on from `first`; with `label`, a reject's detail starts with it."""
        for n, record, error in self.records(file):
            if error is not None and label is not None:
                error = Rejected(error.reason, f"{label}: {error.detail}")
            yield first + n, record, error

    def row(self, n: int, record: dict[str, Any]) -> dict[str, Any]:
        """One record as a row (`_row(...)`), or raise `Rejected`."""
        raise NotImplementedError


class Columns(Params):
    """Which input fields hold what. Unset optional fields are left empty."""

    prompt: str = Field("prompt", description="field with the user's message")
    response: str = Field("response", description="field with the assistant's reply")
    system: str | None = Field(None, description="field with a system prompt")
    id: str | None = Field(None, description="field with a stable row id (default: record number)")
    score: str | None = Field(None, description="field with a numeric quality score")
    lang: str | None = Field(None, description="field with a language code")
    group: str | None = Field(
        None,
        description="field grouping rows for the split (e.g. a conversation id): "
        "rows sharing it land on one side (default: each record alone)",
    )


@source_kind("source.table", version="3")  # 3: a parquet file's rows are a view of its copy
class TableSource(SourceBase):
    """Any table: a JSONL, JSON (array of objects), CSV or Parquet file, mapped by `columns` (prompt, response,
    system, id, score, lang, group). Parquet converts in DuckDB, no Python loop; without `id` or `limit`, the
    source stores a copy of the file and its rows are computed from it as they are read."""

    format: Literal["jsonl", "json", "csv", "parquet"]
    columns: Columns = Columns()

    def may_be_directory(self, field: str) -> bool:
        # a parquet source reads one file (filters spread its row groups over a cluster)
        return super().may_be_directory(field) and self.format != "parquet"

    def read(self, ctx: StepContext) -> None:
        if self.format == "parquet":
            return parquet_source(ctx, self, ctx.files[self.path])
        return super().read(ctx)

    def records(self, path: Path) -> Iterator[Record]:
        return READERS[self.format](path)

    def row(self, n: int, record: dict[str, Any]) -> dict[str, Any]:
        return table_row(self, n, record)


@source_kind("source.alpaca")
class AlpacaSource(SourceBase):
    """Alpaca JSON/JSONL: `instruction`, optional `input` (appended after a blank line), `output`, optional `system`."""

    format: Literal["alpaca"]

    def row(self, n: int, record: dict[str, Any]) -> dict[str, Any]:
        return alpaca_row(self, n, record)


@source_kind("source.dolly")
class DollySource(SourceBase):
    """Dolly JSON/JSONL: `instruction`, optional `context`, `response`, `category`."""

    format: Literal["dolly"]
    categories: list[str] | None = Field(None, description="keep only these categories")

    def row(self, n: int, record: dict[str, Any]) -> dict[str, Any]:
        return dolly_row(self, n, record)


@source_kind("source.sharegpt")
class ShareGptSource(SourceBase):
    """ShareGPT JSON/JSONL: `conversations: [{from, value}]`, `function_call` turns as the assistant's and
    `observation` turns as `tool` turns; `system` and `tools` fields are kept; turns after the last assistant
    reply are dropped."""

    format: Literal["sharegpt"]
    field: str = Field("conversations", description="field holding the turn list")

    def row(self, n: int, record: dict[str, Any]) -> dict[str, Any]:
        return sharegpt_row(self, n, record)


@source_kind("source.h2ogpt")
class H2oGptSource(SourceBase):
    """h2oGPT text: one field holding `<human>: … <bot>: …` turns."""

    format: Literal["h2ogpt"]
    field: str = Field("input", description="field holding the text")

    def row(self, n: int, record: dict[str, Any]) -> dict[str, Any]:
        return h2ogpt_row(self, n, record)


@source_kind("source.hf_disk", libs=("duckdb", "pyarrow", "datasets"))
class HfDiskSource(SourceBase):
    """A Hugging Face `datasets` dataset saved with `save_to_disk`, mapped by `columns`."""

    DIR_FIELDS = frozenset({"path"})
    FILE_OR_DIR_FIELDS = frozenset()

    format: Literal["hf_disk"]
    split: str | None = Field(None, description="split of a DatasetDict (required if it has several)")
    columns: Columns = Columns()

    def records(self, path: Path) -> Iterator[Record]:
        return _hf_disk(path, self.split)

    def row(self, n: int, record: dict[str, Any]) -> dict[str, Any]:
        return table_row(self, n, record)


# -- reading records -----------------------------------------------------------


def _jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield n, None, Rejected("unreadable", f"line {n}: not UTF-8 (byte {exc.start})")
                continue
            if not text.strip():
                yield n, None, Rejected("unreadable", f"line {n}: empty line")
                continue
            try:
                value = json.loads(text)
            except (ValueError, RecursionError) as exc:
                yield n, None, Rejected("unreadable", f"line {n}: invalid JSON ({exc})")
                continue
            yield (
                (n, value, None)
                if isinstance(value, dict)
                else (n, None, Rejected("unreadable", f"line {n}: not a JSON object"))
            )


def _json(path: Path) -> Iterator[Record]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StepError(f"{path}: not a valid UTF-8 JSON file ({exc}); fix the file or use format: jsonl") from None
    if not isinstance(value, list):
        raise StepError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    for n, item in enumerate(value, start=1):
        yield (
            (n, item, None)
            if isinstance(item, dict)
            else (n, None, Rejected("unreadable", f"record {n}: not a JSON object"))
        )


def _json_or_jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return _json(path) if head.startswith(b"[") else _jsonl(path)


def _csv(path: Path) -> Iterator[Record]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for n, row in enumerate(reader, start=1):
        if None in row or any(v is None for v in row.values()):
            yield n, None, Rejected("unreadable", f"row {n}: wrong number of fields")
        elif any("\udc80" <= ch <= "\udcff" for v in row.values() for ch in v):
            yield n, None, Rejected("unreadable", f"row {n}: not UTF-8")
        else:
            yield n, dict(row), None


def _hf_disk(path: Path, split: str | None) -> Iterator[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise StepError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) != 1:
            raise StepError(f"{path} has splits {sorted(ds)}; choose one with `split:`")
        ds = ds[split or next(iter(ds))]
    for n, row in enumerate(ds, start=1):
        yield n, dict(row), None


# -- converting records to conversation rows ------------------------------------


def _text(record: dict[str, Any], field: str | None, required: bool) -> str | None:
    if field is None:
        return None
    if field not in record or record[field] is None:
        if required:
            raise Rejected("missing_field", f"missing field {field!r}")
        return None
    value = record[field]
    if not isinstance(value, str):
        raise Rejected("missing_field", f"field {field!r} is {type(value).__name__}, not text")
    return value


def _tools(value: Any) -> str | None:
    """A record's tool schemas as canonical JSON text (a list), or None when it has none."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise Rejected("bad_value", "tools is not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Rejected("bad_value", "tools is not a list of tool schemas")
    return json.dumps(value, sort_keys=True, ensure_ascii=False) if value else None


def _row(
    source: str,
    row_id: str,
    turns: list[Turn],
    score: Any = None,
    lang: str | None = None,
    *,
    group: str | None = None,
    tools: str | None = None,
) -> dict[str, Any]:
    if not any(t["role"] == "assistant" for t in turns):
        raise Rejected("no_reply", "no assistant reply")
    for i, t in enumerate(turns):
        if t["role"] in ("user", "assistant") and not t["text"].strip():
            raise Rejected("empty_text", f"turn {i + 1} ({t['role']}) is empty")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise Rejected("bad_value", "score is not a number")
    row_id = f"{source}/{row_id}"
    return {
        "id": row_id,
        "source": source,
        "turns": turns,
        "score": score,
        "lang": lang,
        "group_id": f"{source}/{group}" if group is not None else row_id,
        "tools": tools,
    }


def record_id(src: SourceBase, n: int, rec: dict[str, Any] | None) -> str:
    """A record's own id (its id field, where the format has one), else its record number."""
    field = (
        src.columns.id
        if isinstance(src, (TableSource, HfDiskSource))
        else "id"
        if isinstance(src, ShareGptSource)
        else None
    )
    value = rec.get(field) if field and rec is not None else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else str(n)


def table_row(src: TableSource | HfDiskSource, n: int, rec: dict[str, Any]) -> dict[str, Any]:
    cols = src.columns
    turns: list[Turn] = []
    system = _text(rec, cols.system, required=False)
    if system:
        turns.append({"role": "system", "text": system})
    turns.append({"role": "user", "text": _text(rec, cols.prompt, required=True) or ""})
    turns.append({"role": "assistant", "text": _text(rec, cols.response, required=True) or ""})
    score = rec.get(cols.score) if cols.score else None
    group = rec.get(cols.group) if cols.group else None
    return _row(
        src.name,
        record_id(src, n, rec),
        turns,
        score,
        _text(rec, cols.lang, False),
        group=None if group is None else str(group),
    )


def _instruction_row(
    src: SourceBase, n: int, rec: dict[str, Any], extra_field: str, reply_field: str
) -> dict[str, Any]:
    """Alpaca and Dolly: an instruction, optional extra text after a blank line, a reply."""
    prompt = _text(rec, "instruction", True) or ""
    extra = _text(rec, extra_field, False)
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    turns = [{"role": "user", "text": prompt}, {"role": "assistant", "text": _text(rec, reply_field, True) or ""}]
    system = _text(rec, "system", False)
    return _row(src.name, str(n), ([{"role": "system", "text": system}] if system and system.strip() else []) + turns)


def alpaca_row(src: AlpacaSource, n: int, rec: dict[str, Any]) -> dict[str, Any]:
    return _instruction_row(src, n, rec, "input", "output")


def dolly_row(src: DollySource, n: int, rec: dict[str, Any]) -> dict[str, Any]:
    category = _text(rec, "category", False)
    if src.categories is not None and category not in src.categories:
        raise Rejected("not_in_category", f"category {category!r} not in {src.categories}")
    return _instruction_row(src, n, rec, "context", "response")


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}


def sharegpt_row(src: ShareGptSource, n: int, rec: dict[str, Any]) -> dict[str, Any]:
    convo = rec.get(src.field)
    if not isinstance(convo, list):
        raise Rejected("missing_field", f"field {src.field!r} is missing or not a list")
    turns: list[Turn] = []
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        turns.append({"role": "system", "text": rec["system"]})
    for i, t in enumerate(convo):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise Rejected("missing_field", f"turn {i + 1} has no text `value`")
        role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise Rejected("bad_value", f"turn {i + 1} has unknown role {t.get('from')!r}")
        turns.append({"role": role, "text": t["value"]})
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    return _row(src.name, record_id(src, n, rec), turns, tools=_tools(rec.get("tools")))


_H2O_MARK = re.compile(r"<(human|bot)>:")


def h2ogpt_row(src: H2oGptSource, n: int, rec: dict[str, Any]) -> dict[str, Any]:
    text = _text(rec, src.field, True) or ""
    parts = _H2O_MARK.split(text)
    turns: list[Turn] = []
    if parts[0].strip():
        turns.append({"role": "system", "text": parts[0].strip()})
    for who, body in zip(parts[1::2], parts[2::2], strict=False):
        turns.append({"role": "user" if who == "human" else "assistant", "text": body.strip()})
    while turns and (turns[-1]["role"] != "assistant" or not turns[-1]["text"]):
        turns.pop()
    return _row(src.name, str(n), turns)


# -- writing ---------------------------------------------------------------------


def reject(source: str, step: str, row_id: str, why: Rejected, n: int | None = None) -> dict[str, Any]:
    detail = (
        why.detail if n is None or why.detail.startswith(("line ", "row ", "record ")) else f"record {n}: {why.detail}"
    )
    return {"id": f"{source}/{row_id}", "source": source, "step": step, "reason": why.reason, "detail": detail}


def write_tables(
    ctx: StepContext,
    rows: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    n_in: int,
    *,
    used: int | None = None,
    unit: str = "rows",
) -> None:
    """Write a source's rows (ids unique) and rejects, checking nothing was lost."""
    from runner.steps.tables import finish, load_table
    from stores.datastore import REJECT_COLUMNS, ROW_COLUMNS, connect

    con = connect()
    try:
        load_table(con, "rows", ROW_COLUMNS, rows)
        load_table(con, "rejects", REJECT_COLUMNS, rejects)
        finish(ctx, con, "select * from rows", "select * from rejects", n_in, used=used, unit=unit)
    finally:
        con.close()


def convert_records(
    ctx: StepContext,
    src: SourceBase,
    records: Iterator[Record],
    convert: Callable[[int, dict[str, Any]], dict[str, Any]],
) -> None:
    """Each record becomes a row or a reject; a record repeating an earlier row's id is a `duplicate_id` reject."""
    collect_rows(ctx, src, (convert_record(src, ctx.name, r, convert) for r in records))


Converted = tuple[int, "dict[str, Any] | None", str, "dict[str, Any] | None"]  # (n, row, its record's id, reject)


def convert_record(
    src: SourceBase, step_name: str, item: Record, convert: Callable[[int, dict[str, Any]], dict[str, Any]]
) -> Converted:
    """One record as a row or a reject (ids are checked for repeats by `collect_rows`)."""
    n, record, error = item
    if error is None:
        try:
            return n, convert(n, record), record_id(src, n, record), None  # type: ignore[arg-type]
        except Rejected as exc:
            error = exc
    return n, None, "", reject(src.name, step_name, record_id(src, n, record), error, n)


def collect_rows(ctx: StepContext, src: SourceBase, converted: Iterator[Converted]) -> None:
    """Write the converted records' rows and rejects, in record order; a row repeating an earlier row's id is a
    `duplicate_id` reject."""
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    first: dict[str, int] = {}  # row id -> the record that brought it
    seen = 0
    for n, row, rid, rejected_as in converted:
        seen += 1
        if seen % 10000 == 0:
            ctx.progress(None, seen)
        if row is None:
            rejects.append(rejected_as)  # type: ignore[arg-type]
        elif row["id"] in first:
            why = Rejected("duplicate_id", f"record {n} repeats the id of record {first[row['id']]}, which is kept")
            rejects.append(reject(src.name, ctx.name, rid, why, n))
        else:
            first[row["id"]] = n
            rows.append(row)
    write_tables(ctx, rows, rejects, seen)


READERS: dict[str, Callable[[Path], Iterator[Record]]] = {
    "jsonl": _jsonl,
    "json": _json,
    "csv": _csv,
}


VIEW_ROW_GROUP_LIMIT = 1_048_576  # a Parquet source with larger row groups writes its rows (see parquet_source)


def parquet_source(ctx: StepContext, p: TableSource, path: Path) -> None:
    """Parquet is typed, so it is converted in DuckDB without a Python loop, with the same rejects as
    the other table formats (missing or empty text, a repeated id).

    Without an id column or a limit, the source keeps a copy of the file as it is, and its rows are a view
    computed from it as they are read (`datastore.table_sql`), through a mask of the records that are not
    rejects: writing the rows again costs more than most of the filters after it, a copy of the file almost
    nothing, and reading the view is no slower. A file whose row groups are too large to be
    read in parallel (over 1,048,576 rows) is written as rows instead, in row groups of 100,000."""
    import shutil

    from runner.steps.tables import MASK, REJECTS, check_balance, finish, scalar, write_mask
    from stores.datastore import connect, quote_ident, quote_path, write_parquet
    from stores.sql import sql_string

    cols = p.columns
    con = connect()
    try:
        source = f"read_parquet({quote_path(path)}, file_row_number = true)"
        try:
            types = dict(
                con.execute(f"select column_name, column_type from (describe select * from {source})").fetchall()
            )
            largest_group = scalar(con, f"select max(row_group_num_rows) from parquet_metadata({quote_path(path)})")
        except Exception as exc:  # duckdb raises IOException/InvalidInputException for a bad file
            raise StepError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        wanted = {
            "prompt": cols.prompt,
            "response": cols.response,
            "system": cols.system,
            "id": cols.id,
            "score": cols.score,
            "lang": cols.lang,
            "group": cols.group,
        }
        for role, column in wanted.items():
            if column is None:
                continue
            if column not in types:
                raise StepError(f"{path}: no column {column!r} (for {role}); columns: {', '.join(types)}")
            numeric = types[column].split("(")[0] in ("DOUBLE", "FLOAT", "DECIMAL", "INTEGER", "BIGINT", "SMALLINT")
            if role == "score" and not numeric:
                raise StepError(f"{path}: column {column!r} (score) is {types[column]}, not a number")
            if role in ("prompt", "response", "system", "lang") and types[column] != "VARCHAR":
                raise StepError(f"{path}: column {column!r} ({role}) is {types[column]}, not text")
        q = {k: quote_ident(v) for k, v in wanted.items() if v is not None}
        turn = "{'role': %s, 'text': %s}"
        turns = f"[{turn % (sql_string('user'), q['prompt'])}, {turn % (sql_string('assistant'), q['response'])}]"
        if "system" in q:
            sys_turn = turn % ("'system'", q["system"])
            turns = f"case when coalesce({q['system']}, '') <> '' then [{sys_turn}] || {turns} else {turns} end"
        n = "(file_row_number + 1)"
        name = sql_string(p.name)
        row_id = f"{name} || '/' || " + (
            f"coalesce({q['id']}::varchar, {n}::varchar)" if "id" in q else f"{n}::varchar"
        )
        group = f"coalesce({name} || '/' || {q['group']}::varchar, {row_id})" if "group" in q else row_id
        columns = f"""{row_id} as id, {name} as source,
            {turns}::STRUCT(role VARCHAR, text VARCHAR)[] as turns,
            {q.get("score", "null")}::DOUBLE as score, {q.get("lang", "null")}::VARCHAR as lang,
            {group} as group_id, null::varchar as tools"""
        empty = "regexp_full_match({0}, '\\s*')"
        invalid = f"""case when {q["prompt"]} is null then {rejected("missing_field", sql_string(f"missing field {cols.prompt}"))}
                 when {q["response"]} is null then {rejected("missing_field", sql_string(f"missing field {cols.response}"))}
                 when {empty.format(q["prompt"])} then {rejected("empty_text", "'turn 1 (user) is empty'")}
                 when {empty.format(q["response"])} then {rejected("empty_text", "'turn 2 (assistant) is empty'")}
            end"""

        def reject(number: str) -> str:  # a reject's step, reason and detail, `number` its file row number
            detail = f"'record ' || ({number} + 1) || ': ' || _reject.detail"
            return f"{sql_string(ctx.name)} as step, _reject.reason as reason, {detail} as detail"

        if "id" not in q and not p.limit and (largest_group or 0) <= VIEW_ROW_GROUP_LIMIT:
            shutil.copyfile(path, ctx.out / "input.parquet")
            source = f"read_parquet({quote_path(ctx.out / 'input.parquet')}, file_row_number = true)"
            con.execute(
                f"create temp table _rejected as select * from (select file_row_number as n, {row_id} as id, "
                f"{invalid} as _reject from {source}) where _reject is not null"
            )
            n_rejected = write_parquet(
                con, f"select id, {name} as source, {reject('n')} from _rejected order by n", ctx.out / REJECTS
            )
            total = int(scalar(con, f"select count(*) from {source}"))
            kept = write_mask(ctx, con, f"(select i as n, true as keep from range({total}) t(i))")
            ctx.view("rows", None, "input.parquet", MASK, kept, columns)
            ctx.table("rejects", REJECTS, n_rejected, side=True)
            check_balance(ctx, total, kept, n_rejected)
            return
        limit = f"where file_row_number < {p.limit}" if p.limit else ""
        rows = f"select {columns}, {invalid} as _reject, file_row_number from {source} {limit}"
        if "id" in q:
            # ids from an id column may repeat (later ones are rejects): a window over every row, so the rows
            # are materialised and written in file order
            con.execute(f"create temp table r as {rows}")
            first = "min(file_row_number) over (partition by id, _reject is null) + 1"
            repeated = rejected("duplicate_id", f"'repeats the id of record ' || ({first}) || ', which is kept'")
            con.execute(f"""create temp table t as select * exclude (_reject),
                case when _reject is null and row_number() over (partition by id, _reject is null
                                                                 order by file_row_number) > 1
                     then {repeated}
                     else _reject end as _reject
                from r""")
            table, order = "t", " order by file_row_number"
        else:
            # record numbers never repeat: the file is streamed straight to the rows (a scan and filter keep
            # the file's order), no copy of the rows in between
            table, order = f"({rows})", ""
        finish(
            ctx,
            con,
            f"select id, source, turns, score, lang, group_id, tools from {table} where _reject is null{order}",
            f"select id, source, {reject('file_row_number')} from {table} where _reject is not null order by file_row_number",
            int(scalar(con, f"select count(*) from {source} {limit}")),
        )
    finally:
        con.close()


class Mix(Params):
    """Concatenate sources in recipe order, each sampled or repeated by its weight."""

    weights: list[float] = Field(default_factory=list)
    seed: int = 0


@step("mix", version="2", params=Mix, libs=("duckdb",))
def mix_sources(ctx: StepContext) -> None:
    """weight w: floor(w) copies of every row, plus a seeded (w - floor(w)) sample for one more.

    Rows sampled out go to rejects; repeated copies get ids `ID#2`, `ID#3`, ….
    """
    import math

    from runner.steps.tables import finish, open_input, scalar
    from stores.datastore import connect

    p: Mix = ctx.params
    weights = p.weights or [1.0] * len(ctx.inputs)
    con = connect()
    try:
        parts = []
        for i, name in enumerate(ctx.input_names):
            w = weights[i]
            full, frac = math.floor(w), w - math.floor(w)
            pick = f"md5_number('{p.seed}:' || id) % 1000000 < {round(frac * 1_000_000)}"
            copies = f"{full} + ({pick})::int" if frac else str(full)
            parts.append(f"select *, {i} as _part, {copies} as _copies from {open_input(ctx, name, row_numbers=True)}")
        con.execute(f"create temp table t as {' union all '.join(parts)}")
        dupes = con.execute("select id from t group by id having count(*) > 1 limit 1").fetchall()
        if dupes:
            raise StepError(f"mix: row id {dupes[0][0]!r} comes from two sources; give the sources distinct names")
        n = sum(int(a.manifest["rows"]["rows"]) for a in ctx.inputs)
        rows = (
            "select case when c = 1 then id else id || '#' || c end as id, source, turns, score, lang, group_id, tools "
            "from t, generate_series(1, _copies) s(c) order by _part, file_row_number, c"
        )
        weight = f"[{', '.join(map(str, weights))}][_part + 1]"
        dropped = rejected("not_sampled", f"'source weight ' || {weight} || ' < 1, seed {p.seed}'")
        rejects = (
            f"select id, source, {sql_string(ctx.name)} as step, _reject.reason as reason, _reject.detail as detail "
            f"from (select *, {dropped} as _reject from t where _copies = 0) order by _part, file_row_number"
        )
        used = int(scalar(con, "select count(*) from t where _copies > 0"))
        finish(ctx, con, rows, rejects, n, used=used if any(w != 1 for w in weights) else None)
    finally:
        con.close()


# -- a directory's files as tasks on a cluster -----------------------------------
# Record numbers continue from file to file, so a file's first number is the count of records before it: a
# first stage of tasks counts each file's records, a second converts each file's records (numbered on from
# the files before it), and the driver walks them in order as a local read does (`collect_rows`: a row
# repeating an earlier row's id becomes a reject). Files reach the workers through the shared store.


def _local(url: str, tmp: Path) -> Path:
    """A path to read the file at `url` from: itself when local, else a copy in `tmp`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return Path(path)
    local = tmp / "input"
    fs.get_file(path, str(local))
    return local


def count_task(item: tuple[Any, str]) -> int:
    """How many records a file holds (the number of its last one)."""
    params, url = item
    with task_dir() as tmp:
        last = 0
        for n, _, _ in params.records(_local(url, tmp)):
            last = n
        return last


def convert_task(item: tuple[Any, str, str, int, str | None, ShardStore, int]) -> str:
    """One file's records, numbered on from `first`, converted: a JSON list of `Converted` (JSON, not pickle:
    the driver reads it from a shared bucket, and JSON keeps ints, floats and strings as they were)."""
    params, step_name, url, first, label, store, k = item
    out = f"src/{k:05d}.json"
    if store.exists(out):
        return RESUMED
    with task_dir() as tmp:
        records = params.numbered(_local(url, tmp), first, label)
        converted = [convert_record(params, step_name, r, params.row) for r in records]
        (tmp / "out").write_text(json.dumps(converted, ensure_ascii=False), encoding="utf-8")
        store.put(tmp / "out", out)
    return "done"


def run_source_sharded(ctx: StepContext, pool: Pool) -> None:
    """`run_source`, a task per file of the source's directory."""
    p = ctx.params
    root = ctx.files[p.path]
    files = source_files(root)
    if len(files) < 2 or p.limit:
        p.read(ctx)
        return
    urls = [pool.share(f, f"in/{k:05d}") for k, f in enumerate(files)]
    counts = pool.map(count_task, [(p, u) for u in urls], stage="count", progress=ctx.progress)
    firsts = [sum(counts[:k]) for k in range(len(files))]
    labels = [str(f.relative_to(root)) for f in files]
    items = [(p, ctx.name, u, firsts[k], labels[k], pool.store, k) for k, u in enumerate(urls)]
    pool.map(convert_task, items, stage="convert", progress=ctx.progress)

    def converted() -> Iterator[Converted]:
        local = ctx.scratch / "shards"
        for k in range(len(files)):
            got = pool.store.get(f"src/{k:05d}.json", local / f"{k}.json")
            yield from (tuple(c) for c in json.loads(got.read_text(encoding="utf-8")))

    collect_rows(ctx, p, converted())
    pool.store.remove("")
