"""The format step: conversation rows become training text (prompt + completion).

`human_bot` is h2oGPT's format: turns as `<human>: …` and `<bot>: …` lines, and the
completion ends with the `<human>:` terminator so a tuned model learns where to stop.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, step

TEMPLATES = {
    # role -> SQL building one turn's text from t.text; then what opens and closes the reply
    "human_bot": (
        "case t.role when 'user' then '<human>: ' || t.text when 'assistant' then '<bot>: ' || t.text else t.text end",
        "'<bot>: '",
        "chr(10) || '<human>:'",
    ),
    "plain": ("t.text", "''", "''"),
}


class PromptFormat(Params):
    """How conversations become text. The last assistant turn is the completion the model learns."""

    template: Literal["human_bot", "plain"] = Field("human_bot", description="h2oGPT `<human>:/<bot>:` or plain text")


@step("format", version="1", params=PromptFormat, libs=("duckdb",))
def format_rows(ctx: StepContext) -> None:
    from runner.steps.tables import finish, open_input, scalar
    from stores.datastore import connect

    p: PromptFormat = ctx.params
    turn, opener, closer = TEMPLATES[p.template]
    con = connect()
    try:
        con.execute(
            f"""create temp table t as select id, source, file_row_number,
                array_to_string(list_transform(turns[1:len(turns) - 1], lambda t: {turn}), chr(10))
                    || chr(10) || {opener} as prompt,
                turns[-1].text || {closer} as completion,
                case when len(turns) < 2 then 'needs a prompt turn before the reply'
                     when turns[-1].role <> 'assistant' then 'does not end with an assistant turn'
                     else null end as _reason
            from {open_input(ctx, row_numbers=True)}"""
        )
        finish(
            ctx,
            con,
            "select id, source, prompt, completion, prompt || completion as text from t "
            "where _reason is null order by file_row_number",
            f"select id, source, '{ctx.name}' as step, _reason as reason from t "
            "where _reason is not null order by file_row_number",
            scalar(con, "select count(*) from t"),
        )
    finally:
        con.close()
