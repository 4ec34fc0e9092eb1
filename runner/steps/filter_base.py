"""What every filter shares: the fields it can look at and the hooks `run_filter` calls."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext
from runner.steps.sources import NAME_PATTERN

FieldName = Literal["text", "prompt", "response"]
FIELD_SQL = {"text": "text_of(turns)", "prompt": "prompt_of(turns)", "response": "response_of(turns)"}





class FilterBase(Params):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="step name (default: the kind)")

    def reason(self) -> str:
        """SQL giving why a row is dropped (NULL keeps it). May read `_value` (see `python_input`)."""
        raise NotImplementedError

    def derived(self) -> str | None:
        """Extra SQL columns (`expr as _name, ...`) computed once per row before `reason` runs."""
        return None

    def transform(self) -> str | None:
        """SQL for new `turns` (a filter that rewrites text); None leaves rows as they are."""
        return None

    def python_input(self) -> str | None:
        """SQL select list (starting with `id`) of what `python` needs; None for pure-SQL filters."""
        return None

    def python(self, ctx: StepContext, table: Any) -> list[Any]:
        """One `_value` per row of `table` (a pyarrow table of `python_input`), for `reason` to judge."""
        raise NotImplementedError
