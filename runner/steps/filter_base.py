"""What every filter shares: the fields it can look at, the hooks `run_filter` calls, and `filter_kind`, the one
place a filter kind is registered (its recipe `kind:`, its step `filter.KIND`).

A new filter is one class: subclass `FilterBase`, give it `kind: Literal["name"]` and a `reject_sql`, decorate it
with `@filter_kind()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import Field

from runner.params import Params
from runner.registry import Reproducible, StepContext, StepError, add_entry, literal_values, step
from runner.steps.sources import NAME_PATTERN

FieldName = Literal["text", "prompt", "response"]
FIELD_SQL = {"text": "text_of(turns)", "prompt": "prompt_of(turns)", "response": "response_of(turns)"}


class FilterBase(Params):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="step name (default: the kind)")
    if TYPE_CHECKING:
        kind: str  # each kind declares it as `kind: Literal["its name"]`

    def reject_sql(self) -> str:
        """SQL for a row's reject: NULL keeps the row, `rejected(reason, detail)` drops it. May read `_value`
        (see `python_input`)."""
        raise NotImplementedError

    def reject_sql_in(self, ctx: StepContext) -> str:
        """`reject_sql` for a step that may need its files (e.g. a word list); most filters need none."""
        return self.reject_sql()

    def derived(self) -> str | None:
        """Extra SQL columns (`expr as _name, ...`) computed once per row before `reject_sql` runs."""
        return None

    def transform(self) -> str | None:
        """SQL for new `turns` (a filter that rewrites text); None leaves rows as they are."""
        return None

    def python_input(self) -> str | None:
        """SQL select list (starting with `id`) of what `python` needs; None for pure-SQL filters."""
        return None

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        """One `_value` per row of `table` (a pyarrow table of `python_input`), for `reject_sql` to judge."""
        raise NotImplementedError

    def shuffle_by(self) -> str | None:
        """How `reject_sql` compares rows, for a run in shards: None when it judges each row alone; else SQL
        of the value whose equal rows it compares (a window's partition; `''`: every row with every other)."""
        return None


F = TypeVar("F", bound=type[FilterBase])


def filter_kind(*, libs: tuple[str, ...] = ("duckdb",), reproducible: Reproducible = True) -> Callable[[F], F]:
    """Make a `FilterBase` subclass a recipe filter (`kind: NAME` in `data.filters`) run by step `filter.NAME`.
    `libs`: the libraries whose versions are in its key; `reproducible`: see `registry.StepSpec`."""

    def add(cls: F) -> F:
        (name,) = literal_values(cls, "kind")
        step(f"filter.{name}", version="2", params=cls, libs=libs, reproducible=reproducible, sharded=_sharded)(
            run_filter
        )
        add_entry("filter", cls, f"filter.{name}")
        return cls

    return add


def _sharded(ctx: StepContext, pool: Any) -> None:
    from runner.steps.sharded import run_filter_sharded

    run_filter_sharded(ctx, pool, run_filter)


def run_filter(ctx: StepContext) -> None:
    """Filters that only drop rows write a masked view of their input (no copy of the rows);
    filters that rewrite text (clean, truncate) write the rows they keep."""
    import duckdb

    from runner.steps.tables import finish_rewritten, finish_view, open_input
    from stores.datastore import connect

    p = ctx.params
    source = open_input(ctx, row_numbers=True)
    if p.transform():
        source = f"(select * replace ({p.transform()} as turns) from {source})"
    con = connect()
    try:
        reject = p.reject_sql_in(ctx)
        if p.derived():
            source = f"(select *, {p.derived()} from {source})"
        if p.python_input():
            import pyarrow as pa  # here only: importing it costs more than most SQL filters' work

            # streamed out of DuckDB and put in order by Arrow: a sort carrying every text would have to fit in
            # DuckDB's memory limit, the Python side's copy does not
            query = f"select file_row_number as _n, {p.python_input()} from {source}"
            table = con.sql(query).fetch_record_batch(100_000).read_all().sort_by("_n").drop(["_n"])
            values = p.python(ctx, table)
            con.register("_py", pa.table({"_id": table.column("id"), "_value": pa.array(values)}))
            source = f"(select s.*, _py._value from {source} s join _py on s.id = _py._id)"
        try:
            if p.transform():  # rows change: write them (a plain scan and filter keeps their order)
                con.execute(f"create temp table t as select *, {reject} as _reject from {source}")
                finish_rewritten(ctx, con)
            else:
                # project only what the mask needs: a window (dedup) then never carries the text along
                judged = f"select file_row_number as n, id, source, {reject} as _reject from {source}"
                finish_view(ctx, con, f"select * from ({judged}) where _reject is not null")
        except duckdb.Error as exc:
            raise StepError(f"filter {ctx.name}: the SQL failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
