"""The OpenAI API's shapes: requests (validated, unknown parameters refused by name), answers, and the error
shape `{"error": {"message", "type", "param", "code"}}`. Pure pydantic: testable without FastAPI.

A request parameter lives in three places: its field here (with its limits, or a refusal in `check` when no engine
could honour it with this server), its `Sampling` field (`GenerationRequest.sampling`) when it changes how tokens
are chosen, and the engines that honour it (`Engine.supports`); every other engine refuses it by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from runner.serve.engine import Output, Prompt, Sampling


class ApiError(Exception):
    """An answer with an error: HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_json(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code if code is not None else status}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id, refusal: carried, not used
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            if self.role != "assistant":
                raise ApiError(400, f"a {self.role} message needs content", param="messages")
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What both generation endpoints take. Unknown parameters are refused by name, never ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=0, description="0: no answer, only the echoed prompt (needs echo)")
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: no end-of-text token before this many tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0 (the default here): greedy, repeatable")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # accepted, and they do not change the answer
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or not all(v)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def check(self) -> None:
        """Refuse what this server cannot do for any engine."""
        if self.stream and self.n > 1:
            raise ApiError(400, "n > 1 is not supported with stream: true", param="n")

    def logprobs_asked(self) -> int | None:
        """Alternatives per token to report (0: only the chosen token's); None: no log-probabilities."""
        return None

    def echo_asked(self) -> bool:
        """Whether the answer starts with the prompt."""
        return False

    def sampling(self, limit: int) -> Sampling:
        """How to pick this request's tokens, within the server's `limit` on max_tokens."""
        self.check()
        max_tokens = self.max_completion_tokens or self.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {limit}", param="max_tokens")
        if max_tokens == 0 and not self.echo_asked():
            raise ApiError(400, "max_tokens 0 asks for nothing; it needs echo: true", param="max_tokens")
        max_tokens = min(128, limit) if max_tokens is None else max_tokens
        if self.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens {self.min_tokens} is over max_tokens {max_tokens}", param="min_tokens")
        try:
            bias = tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items()))
        except ValueError:
            raise ApiError(400, "logit_bias keys are token ids", param="logit_bias") from None
        return Sampling(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            logprobs=self.logprobs_asked(),
            min_tokens=self.min_tokens,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=bias,
            echo=self.echo_asked(),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted: without tools it changes nothing

    def check(self) -> None:
        super().check()
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, 'response_format other than {"type": "text"} is not supported', param="response_format")
        if self.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, "tool_choice other than auto or none is not supported", param="tool_choice")
        if self.tools and self.stream:
            raise ApiError(400, "tools are not supported with stream: true", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs and self.stream:
            raise ApiError(400, "logprobs is not supported with stream: true", param="logprobs")

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def offers_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def conversation(self, system: str | None) -> list[dict[str, Any]]:
        """The messages as {role, content} (developer is system; an assistant's tool calls and a tool result's call
        id kept), `system` first unless they have one."""
        from runner.serve.tools import request_messages

        messages = request_messages(self.messages)
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return messages


class CompletionRequest(GenerationRequest):
    # every shape the OpenAI API takes: a string, strings, token ids, lists of token ids (lm-evaluation-harness
    # sends the last)
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[Prompt]:
        """The prompts, each text or token ids (an empty list is one empty prompt)."""
        p: Any = self.prompt  # its shape is known by what its first item is
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p) or [""]

    def check(self) -> None:
        super().check()
        if self.suffix or (self.best_of or 1) > 1:
            raise ApiError(400, "suffix and best_of are not supported", param="suffix" if self.suffix else "best_of")
        if self.logprobs is not None and self.stream:
            raise ApiError(400, "logprobs is not supported with stream: true", param="logprobs")
        if self.echo and self.stream:
            raise ApiError(400, "echo is not supported with stream: true", param="echo")
        prompts = len(self.prompts())
        if prompts * self.n > 8:
            raise ApiError(400, "at most 8 completions per request (prompts x n)", param="prompt")
        if self.stream and prompts > 1:
            raise ApiError(400, "several prompts are not supported with stream: true", param="prompt")
        if any(isinstance(p, list) and not p for p in self.prompts()):
            raise ApiError(400, "a prompt of token ids is empty", param="prompt")

    def logprobs_asked(self) -> int | None:
        return self.logprobs

    def echo_asked(self) -> bool:
        return self.echo


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1)
    k: int = Field(5, ge=1, le=100)
    group_by: Literal["document", "chunk"] | None = None


@dataclass(frozen=True)
class Endpoint:
    """How one generation endpoint's answers look."""

    chat: bool
    object: str  # of a whole answer
    chunk_object: str  # of a streamed event
    id_prefix: str
    prompt_param: str  # the request field a too-long prompt is blamed on

    def choice(self, index: int, o: Output, top: int | None, tool_format: str | None = None) -> dict[str, Any]:
        """A whole answer's choice (`top`: alternatives asked per token, for completions' logprobs; `tool_format`:
        the calls in a chat answer are read back in that format, `tools.parse`)."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": o.text}
            if tool_format:
                from runner.serve.tools import parse

                message["content"], calls = parse(o.text, tool_format)
                message.update({"tool_calls": calls} if calls else {})
            return {
                "index": index,
                "message": message,
                "finish_reason": "tool_calls" if message.get("tool_calls") else o.finish_reason,
                "logprobs": None if o.logprobs is None else {"content": [_chat_logprob(e) for e in o.logprobs]},
            }
        return {
            "index": index,
            "text": o.text,
            "finish_reason": o.finish_reason,
            "logprobs": None if o.logprobs is None else _completion_logprobs(o.logprobs, top),
        }

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]:
        """A streamed event's choice: a piece of text (None: none, at the end), and why the answer ended."""
        if self.chat:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        return {"index": 0, "text": text or "", "finish_reason": finish}


CHAT = Endpoint(True, "chat.completion", "chat.completion.chunk", "chatcmpl", "messages")
COMPLETION = Endpoint(False, "text_completion", "text_completion", "cmpl", "prompt")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprob(e: dict[str, Any]) -> dict[str, Any]:
    tops = [{**t, "bytes": list(t["token"].encode())} for t in e.get("top_logprobs", [])]
    return {**e, "bytes": list(e["token"].encode()), "top_logprobs": tops}


def _completion_logprobs(entries: list[dict[str, Any]], top: int | None) -> dict[str, Any]:
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e.get("top_logprobs", ()) is None else {t["token"]: t["logprob"] for t in e.get("top_logprobs", [])}
            for e in entries
        ]
        if top
        else None,
        "text_offset": offsets,
    }
