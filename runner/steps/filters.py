"""Filter steps. Each is SQL in DuckDB: an expression giving the reason a row is dropped (NULL keeps it).

Kept rows go on in input order; dropped rows go to the step's rejects table with the reason.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.sources import NAME_PATTERN

FieldName = Literal["text", "prompt", "response"]
FIELD_SQL = {"text": "text_of(turns)", "prompt": "prompt_of(turns)", "response": "response_of(turns)"}


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class FilterBase(Params):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="step name (default: the kind)")


class SqlFilter(FilterBase):
    """Keep rows for which a DuckDB SQL predicate is true (columns: id, source, turns, score, lang)."""

    kind: Literal["sql"]
    where: str = Field(min_length=1, description="predicate, e.g. `score >= 0.5 and lang = 'en'`")

    def reason(self) -> str:
        return f"case when coalesce(({self.where}), false) then null else {_lit('not: ' + self.where)} end"


class LengthFilter(FilterBase):
    """Drop rows whose field is shorter or longer than the bounds (in characters and/or words)."""

    kind: Literal["length"]
    field: FieldName = "response"
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_bound(self) -> LengthFilter:
        if all(v is None for v in (self.min_chars, self.max_chars, self.min_words, self.max_words)):
            raise ValueError("set at least one of min_chars, max_chars, min_words, max_words")
        return self

    def reason(self) -> str:
        value = f"coalesce({FIELD_SQL[self.field]}, '')"
        words = f"len(regexp_split_to_array(trim({value}), '\\s+')) * (trim({value}) <> '')::int"
        checks = []
        for bound, measure, unit, op in (
            (self.min_chars, f"length({value})", "chars", "<"),
            (self.max_chars, f"length({value})", "chars", ">"),
            (self.min_words, words, "words", "<"),
            (self.max_words, words, "words", ">"),
        ):
            if bound is not None:
                word = "below min" if op == "<" else "above max"
                checks.append(
                    f"when {measure} {op} {bound} then "
                    f"{_lit(self.field + ' has ')} || ({measure}) || {_lit(f' {unit}, {word}_{unit} {bound}')}"
                )
        return "case " + " ".join(checks) + " else null end"


class DedupFilter(FilterBase):
    """Drop exact duplicates of a field (after lower-casing and collapsing whitespace, by default); the first stays."""

    kind: Literal["dedup"]
    field: FieldName = "text"
    normalize: bool = True

    def reason(self) -> str:
        value = FIELD_SQL[self.field]
        if self.normalize:
            value = f"regexp_replace(lower(trim({value})), '\\s+', ' ', 'g')"
        first = f"first(id) over (partition by {value} order by file_row_number)"
        return f"case when {first} <> id then 'duplicate of ' || {first} else null end"


class CleanFilter(FilterBase):
    """Normalise text (Unicode NFC, no control characters, collapsed blank runs); drop turns left empty."""

    kind: Literal["clean"]
    collapse_whitespace: bool = True

    def transform(self) -> str:
        text = "nfc_normalize(t.text)"
        text = f"regexp_replace({text}, '[\\x00-\\x08\\x0B\\x0C\\x0E-\\x1F\\x7F]', '', 'g')"
        if self.collapse_whitespace:
            text = f"regexp_replace(regexp_replace({text}, '[ \\t]+', ' ', 'g'), '\\n{{3,}}', chr(10) || chr(10), 'g')"
        return f"list_transform(turns, lambda t: {{'role': t.role, 'text': trim({text})}})"

    def reason(self) -> str:
        return "case when list_bool_or(list_transform(turns, lambda t: t.text = '')) then 'a turn is empty after cleaning' else null end"


class RegexFilter(FilterBase):
    """Keep (or drop) rows whose field matches a regular expression (RE2 syntax)."""

    kind: Literal["regex"]
    pattern: str = Field(min_length=1)
    field: FieldName = "text"
    action: Literal["keep", "drop"] = "drop"

    def reason(self) -> str:
        hit = f"regexp_matches(coalesce({FIELD_SQL[self.field]}, ''), {_lit(self.pattern)})"
        if self.action == "drop":
            return f"case when {hit} then {_lit(f'{self.field} matches /{self.pattern}/')} else null end"
        return f"case when {hit} then null else {_lit(f'{self.field} does not match /{self.pattern}/')} end"


class SampleFilter(FilterBase):
    """Keep a seeded random sample of at most `n` rows (chosen by hashing ids, so stable across runs)."""

    kind: Literal["sample"]
    n: int = Field(ge=1)
    seed: int = 0

    def reason(self) -> str:
        rank = f"row_number() over (order by md5_number({_lit(str(self.seed) + ':')} || id), id)"
        return f"case when {rank} > {self.n} then {_lit(f'not in the sample of {self.n} (seed {self.seed})')} else null end"


Filter = Annotated[
    SqlFilter | LengthFilter | DedupFilter | CleanFilter | RegexFilter | SampleFilter,
    Field(discriminator="kind"),
]
FILTERS = (SqlFilter, LengthFilter, DedupFilter, CleanFilter, RegexFilter, SampleFilter)


def run_filter(ctx: StepContext) -> None:
    import duckdb

    from runner.steps.tables import finish, open_input, scalar
    from stores.datastore import connect

    p = ctx.params
    source = open_input(ctx, row_numbers=True)
    if isinstance(p, CleanFilter):
        source = f"(select * replace ({p.transform()} as turns) from {source})"
    con = connect()
    try:
        try:
            con.execute(f"create temp table t as select *, {p.reason()} as _reason from {source}")
        except duckdb.Error as exc:
            raise StepError(f"filter {ctx.name}: the SQL failed: {str(exc).splitlines()[0]}") from None
        n_in = scalar(con, "select count(*) from t")
        finish(
            ctx,
            con,
            "select * exclude (_reason, file_row_number) from t where _reason is null order by file_row_number",
            f"select id, source, {_lit(ctx.name)} as step, _reason as reason from t "
            "where _reason is not null order by file_row_number",
            n_in,
        )
    finally:
        con.close()


for _model in FILTERS:
    _kind = _model.model_fields["kind"].annotation.__args__[0]  # type: ignore[union-attr]
    step(f"filter.{_kind}", version="1", params=_model, libs=("duckdb",))(run_filter)
