"""The format step: conversation rows become training text (prompt + completion).

`human_bot` is h2oGPT's format: turns as `<human>: …` and `<bot>: …` lines (tool results
on the human side), and the completion ends with the `<human>:` terminator so a tuned
model learns where to stop. `plain` joins the texts. `chat` uses a tokenizer's own chat
template (a local tokenizer directory): the prompt is the template applied to every turn
but the last with the generation prompt added, the completion the rest.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepContext, StepError, step

TEMPLATES = {
    # SQL building one turn's text from t.text; what opens the reply; what closes it
    "human_bot": (
        "case t.role when 'user' then '<human>: ' || t.text when 'tool' then '<human>: ' || t.text "
        "when 'assistant' then '<bot>: ' || t.text else t.text end",
        "'<bot>: '",
        "chr(10) || '<human>:'",
    ),
    "plain": ("t.text", "''", "''"),
}


class PromptFormat(Params):
    """How conversations become text. The last assistant turn is the completion the model learns."""

    DIR_FIELDS = frozenset({"tokenizer"})

    template: Literal["human_bot", "plain", "chat"] = Field(
        "human_bot", description="h2oGPT `<human>:/<bot>:`, plain text, or a tokenizer's chat template")
    tokenizer: str | None = Field(None, description="for `chat`: a local tokenizer directory with a chat template")

    @model_validator(mode="after")
    def _chat_needs_tokenizer(self) -> PromptFormat:
        if (self.template == "chat") != (self.tokenizer is not None):
            raise ValueError("template: chat needs `tokenizer:` (and only chat uses one)")
        return self

    def external_paths(self) -> dict[str, str]:
        return {"tokenizer": self.tokenizer} if self.tokenizer else {}


@step("format", version="1", params=PromptFormat, libs=("duckdb", "transformers"))
def format_rows(ctx: StepContext) -> None:
    from runner.steps.tables import finish, open_input, scalar
    from stores.datastore import connect

    p: PromptFormat = ctx.params
    con = connect()
    try:
        problem = ("case when len(turns) < 2 then 'needs a prompt turn before the reply' "
                   "when turns[-1].role <> 'assistant' then 'does not end with an assistant turn' else null end")
        if p.template == "chat":
            source = open_input(ctx, row_numbers=True)
            table = con.sql(f"select id, turns from {source}").to_arrow_table()
            _register_chat(con, ctx, table)
            con.execute(f"""create temp table t as select s.id, s.source, s.file_row_number, c.prompt, c.completion,
                coalesce({problem}, c.problem) as _reason from {source} s join _chat c on s.id = c.id""")
        else:
            turn, opener, closer = TEMPLATES[p.template]
            con.execute(
                f"""create temp table t as select id, source, file_row_number,
                    array_to_string(list_transform(turns[1:len(turns) - 1], lambda t: {turn}), chr(10))
                        || chr(10) || {opener} as prompt,
                    turns[-1].text || {closer} as completion,
                    {problem} as _reason
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


def _register_chat(con: Any, ctx: StepContext, table: Any) -> None:
    import pyarrow as pa

    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from transformers import AutoTokenizer

    path = ctx.files[ctx.params.tokenizer]
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StepError(f"tokenizer {path} could not be loaded ({exc})") from None
    if not getattr(tok, "chat_template", None):
        raise StepError(f"tokenizer {path} has no chat template; use template: human_bot or plain")
    out: dict[str, list[Any]] = {"id": [], "prompt": [], "completion": [], "problem": []}
    for row_id, turns in zip(table.column("id").to_pylist(), table.column("turns").to_pylist()):
        messages = [{"role": t["role"], "content": t["text"]} for t in turns]
        prompt = completion = problem = None
        if len(messages) >= 2 and messages[-1]["role"] == "assistant":
            try:
                prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                full = tok.apply_chat_template(messages, tokenize=False)
            except Exception as exc:  # a Jinja template raises anything, e.g. on a role it does not know
                problem = f"chat template failed: {exc}"
            else:
                if full.startswith(prompt):
                    completion = full[len(prompt):]
                else:
                    problem = "chat template does not extend the prompt with the reply"
        out["id"].append(row_id)
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["problem"].append(problem)
    con.register("_chat", pa.table(out))
