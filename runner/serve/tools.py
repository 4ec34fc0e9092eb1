"""Tool calls in chat completions: the tools a request offers go to the model's own chat template (`tools=`), and
the calls in its answer are read back in the format that template teaches, as OpenAI's `tool_calls`.

The format is recognised from the template's text:
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Qwen2.5, Qwen3, Hermes);
- `llama3`: the whole answer is one JSON object `{"name": ..., "parameters": {...}}` (Llama 3.1 to 3.3);
- `mistral`: `[TOOL_CALLS]` and a JSON list of `{"name": ..., "arguments": {...}}` (Mistral's templates; the marker
  is a special token that decoding drops, so a bare list is read too).
A template that takes no `tools`, or teaches another format, gets none: such a request is refused by name.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
ALPHANUMERIC = string.ascii_letters + string.digits


def style(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or None when it takes no tools (or one not known here)."""
    text = chat_template or ""
    if "tools" not in text:
        return None
    if "<tool_call>" in text:
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if '"parameters"' in text:
        return "llama3"
    return None


def request_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The request's messages for a template: an assistant's `tool_calls` with their arguments as objects (OpenAI
    sends them as JSON text; templates write them with `tojson`), a tool result's `tool_call_id` kept."""
    out = []
    for m in messages:
        extra = m.model_extra or {}
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if extra.get("tool_calls"):
            message["tool_calls"] = [_as_template_call(c) for c in extra["tool_calls"]]
        if extra.get("tool_call_id"):
            message["tool_call_id"] = extra["tool_call_id"]
        out.append(message)
    return out


def _as_template_call(call: Any) -> dict[str, Any]:
    function = dict(call.get("function") or {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:
            pass
    return {**call, "function": function}


def parse(answer: str, fmt: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the text beside the calls, the calls as OpenAI's `tool_calls`) of a model's answer; no calls when it holds
    none that parse (the answer is then plain content)."""
    found: list[tuple[str, Any]] = []
    rest = answer
    if fmt == "hermes":
        for block in HERMES.findall(answer):
            call = _json(block)
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                found.append((call["name"], call.get("arguments", {})))
        rest = HERMES.sub("", answer)
    else:
        text = answer.strip().removeprefix("[TOOL_CALLS]").strip()
        value = _json(text)
        calls = value if isinstance(value, list) else [value]
        key = "parameters" if fmt == "llama3" else "arguments"
        if calls and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            found = [(c["name"], c.get(key, c.get("arguments", {}))) for c in calls]
            rest = ""
    tool_calls = [
        {
            "id": "".join(secrets.choice(ALPHANUMERIC) for _ in range(9)),  # Mistral's templates want 9 characters
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for name, args in found
    ]
    content = rest.strip() or None
    return (content if tool_calls else answer), tool_calls


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
