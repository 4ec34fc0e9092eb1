"""The format step: conversation rows become training text (prompt + completion).

`human_bot` is h2oGPT's format: turns as `<human>: …` and `<bot>: …` lines (tool results
on the human side). The prompt ends with `<bot>:` and the completion starts with one space,
exactly as h2oGPT trains and prompts, so the first reply token is the same token at training
and at inference; the completion ends with the `<human>:` terminator so a tuned model learns
where to stop. `plain` joins the texts. `chat` uses a tokenizer's own chat template, the base
model's unless `tokenizer:` names a local tokenizer directory: the prompt is the template applied
to every turn but the last with the generation prompt added, the completion the rest, and
`replies` where the earlier assistant turns lie in the prompt (character offsets), so that
training learns every assistant turn.

Tools: a conversation's tool schemas (`tools`, a JSON list) open its prompt as one line,
`Available tools (JSON schemas): [...]`, in `human_bot` and `plain`; a chat template that
takes `tools` gets them as such, any other gets that line in its system message.

`render_prompt` renders an inference prompt the same way (serving and evaluation use it); a
test holds it equal to the SQL here on real data.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.reasons import rejected
from stores.sql import sql_string

TOOLS_LINE = "Available tools (JSON schemas): "
HUMAN, BOT, NEWLINE = "<human>: ", "<bot>:", "\n"
TEMPLATES = {
    # SQL building one turn's text from t.text; what opens the reply; what closes it
    "human_bot": (
        f"case t.role when 'user' then '{HUMAN}' || t.text when 'tool' then '{HUMAN}' || t.text "
        f"when 'assistant' then '{BOT} ' || t.text else t.text end",
        f"'{BOT}'",
        "' '",
        f"chr(10) || '{HUMAN.strip()}'",
    ),
    "plain": ("t.text", "''", "''", "''"),
}


_NL = "{{ '\\n' }}"  # a newline the template engine's trim_blocks cannot eat
_TOOLS = "{% if tools %}" + TOOLS_LINE + "{{ tools | tojson }}" + _NL + "{% endif %}"
CHAT_TEMPLATES = {
    # Jinja chat templates that render exactly what `render_prompt` does, for tokenizers saved beside a
    # packaged model (so `tokenizer.apply_chat_template` prompts it as runner trained and serves it)
    "human_bot": _TOOLS
    + "{% for m in messages %}{% if m['role'] == 'user' or m['role'] == 'tool' %}"
    + HUMAN
    + "{{ m['content'] }}{% elif m['role'] == 'assistant' %}"
    + BOT
    + " {{ m['content'] }}"
    "{% else %}{{ m['content'] }}{% endif %}" + _NL + "{% endfor %}"
    "{% if add_generation_prompt %}" + BOT + "{% endif %}",
    "plain": _TOOLS + "{% for m in messages %}{{ m['content'] }}" + _NL + "{% endfor %}",
}


def render_prompt(
    template: str, messages: list[dict[str, Any]], tokenizer: Any = None, tools: str | None = None
) -> str:
    """The prompt a model continues with its reply: `messages` ({role, content}) rendered as the format step
    renders the turns before a training reply. `tools` is a JSON list of tool schemas."""
    if template == "chat":
        return str(_apply_chat(tokenizer, messages, tools, add_generation_prompt=True))
    lines = [TOOLS_LINE + tools] if tools else []
    for m in messages:
        role, text = m["role"], m["content"]
        if template == "human_bot":
            text = {"user": HUMAN + text, "tool": HUMAN + text, "assistant": f"{BOT} {text}"}.get(role, text)
        lines.append(text)
    return NEWLINE.join(lines) + NEWLINE + (BOT if template == "human_bot" else "")


def _apply_chat(tok: Any, messages: list[dict[str, Any]], tools: str | None, **kw: Any) -> Any:
    if tools and "tools" in str(tok.chat_template):
        return tok.apply_chat_template(messages, tools=json.loads(tools), tokenize=False, **kw)
    if tools:  # a template that knows no tools: the schemas go into the system message
        line = TOOLS_LINE + tools
        if messages and messages[0]["role"] == "system":
            messages = [{"role": "system", "content": messages[0]["content"] + NEWLINE + line}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": line}, *messages]
    return tok.apply_chat_template(messages, tokenize=False, **kw)


class PromptFormat(Params):
    """How conversations become text. The last assistant turn is the completion the model learns; with `chat`,
    every earlier assistant turn is learnt too."""

    DIR_FIELDS = frozenset({"tokenizer"})

    template: Literal["human_bot", "plain", "chat"] = Field(
        "human_bot", description="h2oGPT `<human>:/<bot>:`, plain text, or the base model's chat template"
    )
    tokenizer: str | None = Field(
        None, description="for `chat`: a local tokenizer directory whose chat template is used instead of the base's"
    )

    @model_validator(mode="after")
    def _only_chat_takes_a_tokenizer(self) -> PromptFormat:
        if self.tokenizer is not None and self.template != "chat":
            raise ValueError("only template: chat uses `tokenizer:`")
        return self

    def external_paths(self) -> dict[str, str]:
        return {"tokenizer": self.tokenizer} if self.tokenizer else {}


@step("format", version="3", params=PromptFormat, libs=("duckdb", "transformers"))
def format_rows(ctx: StepContext) -> None:
    from runner.steps.tables import finish, open_input, scalar
    from stores.datastore import connect

    p: PromptFormat = ctx.params
    con = connect()
    try:
        problem = (
            f"case when len(turns) < 2 then {rejected('bad_shape', chr(39) + 'needs a prompt turn before the reply' + chr(39))} "
            f"when turns[-1].role <> 'assistant' then {rejected('bad_shape', chr(39) + 'does not end with an assistant turn' + chr(39))} "
            "else null end"
        )
        rows = ctx.input_names[0]  # `chat` without `tokenizer:` reads the base model's tokenizer step too
        if p.template == "chat":
            source = open_input(ctx, rows, row_numbers=True)
            table = con.sql(f"select id, turns, tools from {source}").fetch_record_batch(100_000).read_all()
            _register_chat(con, ctx, table)
            problem_chat = f"case when c.problem is not null then {rejected('template_failed', 'c.problem')} end"
            con.execute(f"""create temp table t as select s.id, s.source, s.group_id, s.file_row_number, c.prompt,
                c.completion, c.replies, coalesce({problem}, {problem_chat}) as _reject
                from {source} s join _chat c on s.id = c.id""")
        else:
            turn, opener, reply_start, closer = TEMPLATES[p.template]
            tools = f"case when tools is null then '' else '{TOOLS_LINE}' || tools || chr(10) end"
            con.execute(
                f"""create temp table t as select id, source, group_id, file_row_number,
                    {tools} || array_to_string(list_transform(turns[1:len(turns) - 1], lambda t: {turn}), chr(10))
                        || chr(10) || {opener} as prompt,
                    {reply_start} || turns[-1].text || {closer} as completion,
                    {problem} as _reject
                from {open_input(ctx, rows, row_numbers=True)}"""
            )
        replies = ", replies" if p.template == "chat" else ""
        finish(
            ctx,
            con,
            f"select id, source, group_id, prompt, completion, prompt || completion as text{replies} from t "
            "where _reject is null order by file_row_number",
            f"select id, source, {sql_string(ctx.name)} as step, _reject.reason as reason, _reject.detail as detail from t "
            "where _reject is not null order by file_row_number",
            scalar(con, "select count(*) from t"),
        )
    finally:
        con.close()


def _register_chat(con: Any, ctx: StepContext, table: Any) -> None:
    import pyarrow as pa

    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from transformers import AutoTokenizer

    own = ctx.params.tokenizer
    path = ctx.files[own] if own else ctx.input("tokenizer").file("tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StepError(f"tokenizer {path} could not be loaded ({exc})") from None
    if not getattr(tok, "chat_template", None):
        whose = f"tokenizer {path}" if own else "the base model's tokenizer"
        raise StepError(
            f"{whose} has no chat template: use data.prompt.template: human_bot (h2oGPT's) or plain, or set "
            "data.prompt.tokenizer to a tokenizer directory that has one"
        )
    out: dict[str, list[Any]] = {"id": [], "prompt": [], "completion": [], "replies": [], "problem": []}
    columns = (table.column(c).to_pylist() for c in ("id", "turns", "tools"))
    for row_id, turns, tools in zip(*columns, strict=False):
        messages = [{"role": t["role"], "content": t["text"]} for t in turns]
        prompt = completion = problem = None
        replies: list[dict[str, int]] = []
        if len(messages) >= 2 and messages[-1]["role"] == "assistant":
            try:
                prompt = _apply_chat(tok, messages[:-1], tools, add_generation_prompt=True)
                full = _apply_chat(tok, messages, tools)
            except Exception as exc:  # a Jinja template raises anything, e.g. on a role it does not know
                problem = f"chat template failed: {exc}"
            else:
                if full.startswith(prompt):
                    completion = full[len(prompt) :]
                    replies = _earlier_replies(tok, messages, tools, prompt)
                else:
                    problem = "chat template does not extend the prompt with the reply"
        out["id"].append(row_id)
        out["prompt"].append(prompt)
        out["completion"].append(completion)
        out["replies"].append(replies)
        out["problem"].append(problem)
    reply = pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())]))
    con.register("_chat", pa.table(out, schema=pa.schema([(k, reply if k == "replies" else pa.string()) for k in out])))


def _earlier_replies(tok: Any, messages: list[dict[str, str]], tools: str | None, prompt: str) -> list[dict[str, int]]:
    """Where each assistant turn before the last lies in `prompt` (its text and the template's end of turn, as
    character offsets): from the end of the conversation rendered up to the turn's generation prompt, to where the
    conversation rendered up to the turn parts from `prompt` (a template may close a conversation with more, as
    Phi-3.5's end-of-text). A turn whose start the template renders otherwise in a longer conversation is left out:
    it is not what the model sees."""
    spans = []
    for i, m in enumerate(messages[:-1]):
        if m["role"] != "assistant" or i == 0:
            continue
        before = _apply_chat(tok, messages[:i], tools, add_generation_prompt=True)
        upto = _apply_chat(tok, messages[: i + 1], tools)
        end = next(
            (n for n, (a, b) in enumerate(zip(upto, prompt, strict=False)) if a != b), min(len(upto), len(prompt))
        )
        if prompt.startswith(before) and end > len(before):
            spans.append({"start": len(before), "end": end})
    return spans
