"""Filter steps. Each is SQL in DuckDB: an expression giving a row's reject (NULL keeps it), a struct of a
stable `reason` (see `reasons.py`) and the row's `detail`.

Kept rows go on in input order; dropped rows go to the step's rejects table with reason and detail.
"""

from __future__ import annotations

import re
from typing import Any, Literal, cast

from pydantic import Field, model_validator

from runner.registry import StepContext, StepError
from runner.steps.filter_base import FIELD_SQL, FieldName, FilterBase, filter_kind
from runner.steps.reasons import rejected
from stores.sql import sql_string


@filter_kind()
class SqlFilter(FilterBase):
    """Keep rows for which a DuckDB SQL predicate is true (columns: id, source, turns, score, lang, group_id, tools)."""

    kind: Literal["sql"]
    where: str = Field(min_length=1, description="predicate, e.g. `score >= 0.5 and lang = 'en'`")

    def reject_sql(self) -> str:
        return f"case when coalesce(({self.where}), false) then null else {rejected('sql_predicate', sql_string('not: ' + self.where))} end"


@filter_kind(libs=("duckdb", "tokenizers"))
class LengthFilter(FilterBase):
    """Drop rows whose field is shorter or longer than the bounds: characters, words, and/or tokens
    (tokens need `tokenizer`, a local tokenizer directory)."""

    DIR_FIELDS = frozenset({"tokenizer"})

    kind: Literal["length"]
    field: FieldName = "response"
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    tokenizer: str | None = Field(None, description="local tokenizer directory, for token bounds")

    @model_validator(mode="after")
    def _some_bound(self) -> LengthFilter:
        bounds = (self.min_chars, self.max_chars, self.min_words, self.max_words, self.min_tokens, self.max_tokens)
        if all(v is None for v in bounds):
            raise ValueError("set at least one of min/max_chars, min/max_words, min/max_tokens")
        if (self.min_tokens is not None or self.max_tokens is not None) and self.tokenizer is None:
            raise ValueError("token bounds need `tokenizer:` (a local tokenizer directory)")
        return self

    def external_paths(self) -> dict[str, str]:
        return {"tokenizer": self.tokenizer} if self.tokenizer else {}

    def python_input(self) -> str | None:
        return f"id, {FIELD_SQL[self.field]} as text" if self.tokenizer else None

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        from runner.steps.scoring import load_tokenizer

        tok = load_tokenizer(ctx.files[self.tokenizer])  # type: ignore[index]
        texts = [t or "" for t in table.column("text").to_pylist()]
        counts: list[int] = []
        for i in range(0, len(texts), 4096):
            counts.extend(len(ids) for ids in tok(texts[i : i + 4096], add_special_tokens=False)["input_ids"])
            ctx.progress(len(texts), min(i + 4096, len(texts)))
        return counts

    def reject_sql(self) -> str:
        value = f"coalesce({FIELD_SQL[self.field]}, '')"
        words = f"len(regexp_split_to_array(trim({value}), '\\s+')) * (trim({value}) <> '')::int"
        checks = []
        for bound, measure, unit, op in (
            (self.min_chars, f"length({value})", "chars", "<"),
            (self.max_chars, f"length({value})", "chars", ">"),
            (self.min_words, words, "words", "<"),
            (self.max_words, words, "words", ">"),
            (self.min_tokens, "_value", "tokens", "<"),
            (self.max_tokens, "_value", "tokens", ">"),
        ):
            if bound is not None:
                word = "below min" if op == "<" else "above max"
                detail = f"{sql_string(self.field + ' has ')} || ({measure}) || {sql_string(f' {unit}, {word}_{unit} {bound}')}"
                checks.append(
                    f"when {measure} {op} {bound} then {rejected('too_short' if op == '<' else 'too_long', detail)}"
                )
        return "case " + " ".join(checks) + " else null end"


def normalise_sql(value: str) -> str:
    """SQL for `regexp_replace(lower(trim(value)), '\\s+', ' ', 'g')` (RE2's `\\s` is `[\\t\\n\\f\\r ]`), the
    same string computed faster: those four characters become spaces (plain replaces), and only a text
    holding a run of spaces pays for the regex collapsing it (DuckDB computes the repeated expression once)."""
    spaced = f"lower(trim({value}))"
    for code in (9, 10, 12, 13):
        spaced = f"replace({spaced}, chr({code}), ' ')"
    return f"(case when contains({spaced}, '  ') then regexp_replace({spaced}, ' {{2,}}', ' ', 'g') else {spaced} end)"


@filter_kind()
class DedupFilter(FilterBase):
    """Drop exact duplicates of a field (after lower-casing and collapsing whitespace, by default); the first stays."""

    kind: Literal["dedup"]
    field: FieldName = "text"
    normalize: bool = True

    def derived(self) -> str:
        value = FIELD_SQL[self.field]
        if self.normalize:
            value = normalise_sql(value)
        # a 128-bit hash of the text, computed once: the window then sorts numbers, not text
        return f"md5_number({value}) as _dedup_key"

    def shuffle_by(self) -> str:
        return "_dedup_key"

    def reject_sql(self) -> str:
        first = "first(id) over (partition by _dedup_key order by file_row_number)"
        return (
            f"case when {first} <> id then {rejected('duplicate', f'{chr(39)}of {chr(39)} || {first}')} else null end"
        )


@filter_kind()
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

    def reject_sql(self) -> str:
        empty = "list_position(list_transform(turns, lambda t: t.text = ''), true)"
        return (
            f"case when {empty} > 0 then {rejected('empty_after_clean', f'{chr(39)}turn {chr(39)} || {empty} || {chr(39)} is empty{chr(39)}')} "
            "else null end"
        )


@filter_kind()
class RegexFilter(FilterBase):
    """Keep (or drop) rows whose field matches a regular expression (RE2 syntax)."""

    kind: Literal["regex"]
    pattern: str = Field(min_length=1)
    field: FieldName = "text"
    action: Literal["keep", "drop"] = "drop"

    def reject_sql(self) -> str:
        hit = f"regexp_matches(coalesce({FIELD_SQL[self.field]}, ''), {sql_string(self.pattern)})"
        if self.action == "drop":
            return f"case when {hit} then {rejected('regex', sql_string(f'{self.field} matches /{self.pattern}/'))} else null end"
        return f"case when {hit} then null else {rejected('regex', sql_string(f'{self.field} does not match /{self.pattern}/'))} end"


@filter_kind()
class SampleFilter(FilterBase):
    """Keep a seeded random sample of at most `n` rows (chosen by hashing ids, so stable across runs)."""

    kind: Literal["sample"]
    n: int = Field(ge=1)
    seed: int = 0

    def shuffle_by(self) -> str:
        return ""

    def reject_sql(self) -> str:
        rank = f"row_number() over (order by md5_number({sql_string(str(self.seed) + ':')} || id), id)"
        return f"case when {rank} > {self.n} then {rejected('not_sampled', sql_string(f'not in the sample of {self.n} (seed {self.seed})'))} else null end"


@filter_kind(libs=("duckdb", "better-profanity"))
class ProfanityFilter(FilterBase):
    """Drop rows containing a profane word (whole words, any case): better-profanity's list (as h2oGPT uses),
    plus words from a file (one per line) and `extra_words` (h2oGPT's censor words, say)."""

    kind: Literal["profanity"]
    field: FieldName = "text"
    default_list: bool = Field(True, description="use better-profanity's word list")
    words_file: str | None = Field(None, description="extra words, one per line (relative to the recipe)")
    extra_words: list[str] = Field(default_factory=list)

    def external_paths(self) -> dict[str, str]:
        return {"words_file": self.words_file} if self.words_file else {}

    def words(self, files: dict[str, Any]) -> list[str]:
        words = list(self.extra_words)
        if self.default_list:
            words += _read_words(_better_profanity_list())
        if self.words_file:
            words += _read_words(files[self.words_file])
        return sorted({w.strip().lower() for w in words if w.strip()})

    def reject_sql(self) -> str:
        raise AssertionError("built in reject_sql_in, which knows the word files")

    def reject_sql_in(self, ctx: StepContext) -> str:
        words = self.words(ctx.files)
        if not words:
            return "null"
        pattern = sql_string(words_regex(words))
        value = f"coalesce({FIELD_SQL[self.field]}, '')"
        return (
            f"case when regexp_matches({value}, {pattern}) then "
            f"{rejected('profanity', f'lower(regexp_extract({value}, {pattern}, 1))')} else null end"
        )


def _better_profanity_list() -> Any:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("better_profanity")
    if spec is None or not spec.submodule_search_locations:
        raise StepError("the profanity filter needs the better-profanity package (pip install better-profanity)")
    return Path(next(iter(spec.submodule_search_locations))) / "profanity_wordlist.txt"


def _read_words(path: Any) -> list[str]:
    return [w for w in path.read_text(encoding="utf-8").splitlines() if w.strip() and not w.startswith("#")]


def words_regex(words: list[str]) -> str:
    escaped = (re.escape(w).replace("\\ ", "\\s+") for w in sorted(words, key=len, reverse=True))
    return "(?i)(?:^|[^\\pL\\pN_])(" + "|".join(escaped) + ")(?:$|[^\\pL\\pN_])"


UNHELPFUL = [
    "as an ai language model",
    "as a language model",
    "i'm just an ai",
    "i am just an ai",
    "i'm sorry, but i cannot",
    "i am sorry, but i cannot",
    "i'm sorry, but i can't",
    "i cannot fulfill",
    "i'm not able to provide",
    "i am not able to provide",
    "i don't have personal opinions",
    "i do not have personal opinions",
    "i don't have the ability",
    "i do not have the ability",
    "i'm unable to",
    "i am unable to",
    "my knowledge cutoff",
    "i apologize, but",
]


@filter_kind()
class UnhelpfulFilter(FilterBase):
    """Drop replies containing refusal / "as an AI language model" phrases (case-insensitive)."""

    kind: Literal["unhelpful"]
    field: FieldName = "response"
    phrases: list[str] = Field(
        default_factory=lambda: list(UNHELPFUL), description="phrases (default: a built-in list)"
    )
    extra_phrases: list[str] = Field(default_factory=list)

    def reject_sql(self) -> str:
        phrases = sorted({p.lower() for p in self.phrases + self.extra_phrases if p.strip()}, key=len, reverse=True)
        if not phrases:
            return "null"
        pattern = "(" + "|".join(re.escape(p) for p in phrases) + ")"
        value = f"lower(coalesce({FIELD_SQL[self.field]}, ''))"
        detail = f"regexp_extract({value}, {sql_string(pattern)}, 1)"
        return f"case when regexp_matches({value}, {sql_string(pattern)}) then {rejected('unhelpful', detail)} else null end"


@filter_kind(libs=("duckdb", "torch", "transformers"), reproducible=lambda p: p.model is None)
class QualityFilter(FilterBase):
    """Keep rows whose quality score is within bounds: the `score` column (e.g. oasst's quality label),
    or a reward model's score when `model` (a local sequence-classification model directory) is given."""

    DIR_FIELDS = frozenset({"model"})

    kind: Literal["quality"]
    min_score: float | None = None
    max_score: float | None = None
    missing: Literal["keep", "drop"] = Field("keep", description="rows without a score")
    model: str | None = Field(None, description="reward model directory (scores prompt + response)")
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _some_bound(self) -> QualityFilter:
        if self.min_score is None and self.max_score is None:
            raise ValueError("set min_score and/or max_score")
        return self

    def external_paths(self) -> dict[str, str]:
        return {"model": self.model} if self.model else {}

    def python_input(self) -> str | None:
        return "id, prompt_of(turns) as prompt, response_of(turns) as response" if self.model else None

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        from runner.steps.scoring import reward_scores

        return reward_scores(ctx.files[self.model], table, self.batch_size, ctx.progress)  # type: ignore[index]

    def reject_sql(self) -> str:
        score = "_value" if self.model else "score"
        checks = [f"when {score} is null then " + (rejected("no_score") if self.missing == "drop" else "null")]
        if self.min_score is not None:
            detail = f"'score ' || round({score}, 4) || ' < {self.min_score}'"
            checks.append(f"when {score} < {self.min_score} then {rejected('score_out_of_range', detail)}")
        if self.max_score is not None:
            detail = f"'score ' || round({score}, 4) || ' > {self.max_score}'"
            checks.append(f"when {score} > {self.max_score} then {rejected('score_out_of_range', detail)}")
        return "case " + " ".join(checks) + " else null end"


@filter_kind()
class LimitFilter(FilterBase):
    """Keep the first `n` rows (in order)."""

    kind: Literal["limit"]
    n: int = Field(ge=0)

    def shuffle_by(self) -> str:
        return ""

    def reject_sql(self) -> str:
        return (
            f"case when row_number() over (order by file_row_number) > {self.n} "
            f"then {rejected('beyond_limit', sql_string(f'beyond the first {self.n}'))} else null end"
        )


Role = Literal["system", "user", "assistant", "tool"]


@filter_kind()
class TruncateFilter(FilterBase):
    """Cut every turn's text to at most `max_chars` characters (at a word boundary when one is near)."""

    kind: Literal["truncate"]
    max_chars: int = Field(ge=1)
    roles: list[Role] = Field(default_factory=lambda: cast(list[Role], ["system", "user", "assistant", "tool"]))

    def transform(self) -> str:
        roles = ", ".join(sql_string(r) for r in self.roles)
        cut = f"left(t.text, {self.max_chars})"
        soft = f"regexp_replace({cut}, '\\s+\\S*$', '')"
        short = f"case when length(t.text) <= {self.max_chars} then t.text when length({soft}) >= {self.max_chars} * 0.8 then {soft} else {cut} end"
        return f"list_transform(turns, lambda t: {{'role': t.role, 'text': case when t.role in ({roles}) then {short} else t.text end}})"

    def reject_sql(self) -> str:
        return "null"
