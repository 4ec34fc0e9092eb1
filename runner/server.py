"""The OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming),
/v1/embeddings, /v1/search, and document chat as model ids ending in `+docs` (answers carry `sources`).

Every answer is either a valid OpenAI response or an OpenAI-shaped JSON error
(`{"error": {"message", "type", "param", "code"}}`), never a crash: 400 bad JSON, fields or
an unsupported parameter (named), 400 `context_length_exceeded` when prompt + max_tokens do
not fit the model, 401 missing/wrong bearer token, 404 unknown model or path, 405 wrong method,
408 a body that does not arrive in time, 413 body too large (counted while it is read, so a
chunked upload stops at the limit). A client that disconnects mid-stream frees the model
within one token step. Each request is logged (method, path, status, latency, tokens; never bodies).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request  # imported only by `runner serve` (api.serve_app), never by the CLI at large
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from runner.retrieval import docs_prompt
from runner.schema import ServeConfig
from runner.serving import ContextTooLong, Model, NotSupported, Output, Sampling, batching, on_model_thread

log = logging.getLogger("runner.serve")
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive

# accepted, and they do not change the answer
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


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


class Common(BaseModel):
    """What both generation endpoints take. Unknown parameters are refused by name, never ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="vLLM's extension: no end-of-text token before this many tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0 (the default here): greedy, repeatable")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
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
        if self.frequency_penalty or self.presence_penalty:
            raise ApiError(
                400, "frequency_penalty and presence_penalty are not supported (only 0)", param="frequency_penalty"
            )
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream and self.n > 1:
            raise ApiError(400, "n > 1 is not supported with stream: true", param="n")

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, 'response_format other than {"type": "text"} is not supported', param="response_format")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tools and tool_choice are not supported by this server", param="tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.logprobs and self.stream:
            raise ApiError(400, "logprobs is not supported with stream: true", param="logprobs")


class CompletionRequest(Common):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def by_ids(self) -> bool:
        """The prompt is one prompt, given as token ids."""
        return isinstance(self.prompt, list) and bool(self.prompt) and isinstance(self.prompt[0], int)

    def check(self) -> None:
        super().check()
        if self.echo or self.suffix or (self.best_of or 1) > 1:
            raise ApiError(400, "echo, suffix and best_of are not supported", param="echo")
        if self.logprobs is not None and self.stream:
            raise ApiError(400, "logprobs is not supported with stream: true", param="logprobs")
        prompts = 1 if isinstance(self.prompt, str) or self.by_ids else max(1, len(self.prompt))
        if prompts * self.n > 8:
            raise ApiError(400, "at most 8 completions per request (prompts x n)", param="prompt")


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


class ApiError(Exception):
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


def create_app(
    models: dict[str, Model], config: ServeConfig, *, retriever: Any = None, token: str | None = None
) -> Any:
    """The OpenAI-compatible app (behind the Guard: token, body size, access log) over these models and index."""
    from fastapi import FastAPI

    app = FastAPI(title="runner", docs_url=None, redoc_url=None)
    _error_handlers(app)
    service = Service(batching(models, config), config, retriever)
    app.get("/v1/models")(service.list_models)
    app.post("/v1/chat/completions")(service.chat)
    app.post("/v1/completions")(service.complete)
    app.post("/v1/embeddings")(service.embeddings)
    app.post("/v1/search")(service.search_endpoint)
    return Guard(app, config, token)


def _error_handlers(app: Any) -> None:
    """Every error as OpenAI's error JSON: ours (ApiError), HTTP's, invalid requests, and bugs (500, logged)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
    ) -> JSONResponse:
        return JSONResponse(error_json(status, message, kind, param, code), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        kind = first.get("type")
        if kind == "json_invalid":
            return error(400, "request body is not valid JSON")
        if kind == "extra_forbidden":
            return error(400, f"unsupported parameter {loc[-1]!r}", param=loc[-1] if loc else None)
        what = str(first.get("msg", "invalid request"))
        return error(400, f"{where}: {what}" if where else what, param=loc[0] if loc else None)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error(500, f"internal error ({type(exc).__name__}); the server log has the details", "server_error")


def _usage(outputs: list[Output]) -> dict[str, int]:
    p, c = outputs[0].prompt_tokens if outputs else 0, sum(o.completion_tokens for o in outputs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Service:
    """What the endpoints share: the models (and their `+docs` twins answering from the index), the limits."""

    def __init__(self, models: dict[str, Model], config: ServeConfig, retriever: Any) -> None:
        self.models, self.config, self.retriever = models, config, retriever
        self.doc_models = (
            {f"{name}+docs": m for name, m in models.items()} if retriever is not None and config.docs else {}
        )

    def pick(self, name: str) -> tuple[Model, bool]:
        if name in self.models:
            return self.models[name], False
        if name in self.doc_models:
            return self.doc_models[name], True
        raise ApiError(
            404,
            f"no model {name!r}; models: {', '.join(list(self.models) + list(self.doc_models)) or 'none'}",
            "not_found",
            param="model",
            code="model_not_found",
        )

    def sampling(self, req: Common, logprobs: int | None = None) -> Sampling:
        req.check()
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens > self.config.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is over this server's limit of {self.config.max_tokens}",
                param="max_tokens",
            )
        max_tokens = max_tokens or min(128, self.config.max_tokens)
        if req.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens {req.min_tokens} is over max_tokens {max_tokens}", param="min_tokens")
        return Sampling(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stops(),
            logprobs=logprobs,
            min_tokens=req.min_tokens,
        )

    def search(self, question: str) -> tuple[str, list[dict[str, Any]]]:
        hits = on_model_thread(self.retriever.search, question, self.config.top_k) if question.strip() else []
        sources = [
            {"id": h.chunk_id, "document": h.doc_id, "title": h.title, "score": round(h.score, 4), "text": h.text}
            for h in hits
        ]
        return docs_prompt(question, hits), sources

    def run(self, model: Model, prompts: list[str], s: Sampling, n: int) -> list[Output]:
        """`n` answers to each prompt, in order (a seeded request's choice i uses seed + i). Answers the batcher
        takes are asked at once, so they share its token steps; the others run one after another."""
        jobs = [(p, s if s.seed is None or i == 0 else _reseed(s, s.seed + i)) for p in prompts for i in range(n)]
        try:
            return model.generate_all(jobs)
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except NotSupported as exc:
            raise ApiError(400, str(exc)) from None

    def list_models(self) -> dict[str, Any]:
        now = int(time.time())
        names = (
            list(self.models)
            + list(self.doc_models)
            + ([self.retriever.model_name] if self.retriever is not None else [])
        )
        every = {**self.models, **self.doc_models}
        return {
            "object": "list",
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "created": now,
                    "owned_by": "runner",
                    **({"precision": every[n].precision} if n in every else {}),
                }
                for n in names
            ],
        }

    async def chat(self, req: ChatRequest, request: Request) -> Any:
        model, docs = self.pick(req.model)
        s = self.sampling(req, (req.top_logprobs or 0) if req.logprobs else None)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        if self.config.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.config.system})
        sources: list[dict[str, Any]] = []
        if docs:
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            turn, sources = await run_in_threadpool(self.search, question)
            messages = messages[:-1] + [{"role": "user", "content": turn}]
        prompt = model.prompt(messages)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
            return self._streaming(
                request,
                model,
                prompt,
                s,
                base,
                sources,
                chat=True,
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
            )
        outputs = await run_in_threadpool(self.run, model, [prompt], s, req.n)
        request.state.tokens = _usage(outputs)["total_tokens"]
        choices = []
        for i, o in enumerate(outputs):
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": o.text},
                "finish_reason": o.finish_reason,
                "logprobs": None,
            }
            if o.logprobs is not None:
                choice["logprobs"] = {
                    "content": [
                        {
                            **e,
                            "bytes": list(e["token"].encode()),
                            "top_logprobs": [
                                {**t, "bytes": list(t["token"].encode())} for t in e.get("top_logprobs", [])
                            ],
                        }
                        for e in o.logprobs
                    ]
                }
            choices.append(choice)
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": _usage(outputs),
        }
        if docs:
            body["sources"] = sources
        return body

    async def complete(self, req: CompletionRequest, request: Request) -> Any:
        model, docs = self.pick(req.model)
        s = self.sampling(req, req.logprobs)
        if isinstance(req.prompt, str):
            prompts = [req.prompt]
        elif req.by_ids:
            prompts = [model.tokenizer.decode(req.prompt)]
        else:
            prompts = [str(p) for p in req.prompt] or [""]
        sources: list[dict[str, Any]] = []
        if docs:  # document chat on a plain completion: the prompt is the question
            found = [await run_in_threadpool(self.search, p) for p in prompts]
            prompts, sources = [f for f, _ in found], [x for _, srcs in found for x in srcs]
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            if len(prompts) > 1:
                raise ApiError(400, "several prompts are not supported with stream: true", param="prompt")
            base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
            return self._streaming(
                request,
                model,
                prompts[0],
                s,
                base,
                sources,
                chat=False,
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
            )
        outputs = await run_in_threadpool(self.run, model, prompts, s, req.n)
        request.state.tokens = _usage(outputs)["total_tokens"]
        choices = []
        for i, o in enumerate(outputs):
            choice: dict[str, Any] = {"index": i, "text": o.text, "finish_reason": o.finish_reason, "logprobs": None}
            if o.logprobs is not None:
                offsets, at = [], 0
                for e in o.logprobs:
                    offsets.append(at)
                    at += len(e["token"])
                choice["logprobs"] = {
                    "tokens": [e["token"] for e in o.logprobs],
                    "token_logprobs": [e["logprob"] for e in o.logprobs],
                    "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in o.logprobs]
                    if req.logprobs
                    else None,
                    "text_offset": offsets,
                }
            choices.append(choice)
        body = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": {**_usage(outputs), "prompt_tokens": sum(o.prompt_tokens for o in outputs[:: req.n])},
        }
        body["usage"]["total_tokens"] = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        if docs:
            body["sources"] = sources
        return body

    def _streaming(
        self,
        request: Request,
        model: Model,
        prompt: str,
        s: Sampling,
        base: dict[str, Any],
        sources: list[dict[str, Any]],
        *,
        chat: bool,
        include_usage: bool,
    ) -> Any:
        try:
            ids = model.encode(prompt, s.max_tokens)  # a prompt that does not fit is refused before the stream
        except ContextTooLong as exc:
            raise ApiError(
                400, str(exc), param="messages" if chat else "prompt", code="context_length_exceeded"
            ) from None

        def piece(text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return {**base, "choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}

        async def events() -> AsyncIterator[str]:
            # the tokens come from the model thread straight to this loop, which decodes them: a stream holds
            # no thread while it waits (a thread reading them for the loop cost a wake-up at every token)
            loop, tokens = asyncio.get_running_loop(), asyncio.Queue[Any]()

            def put(item: Any) -> None:  # on the model thread
                try:
                    loop.call_soon_threadsafe(tokens.put_nowait, item)
                except RuntimeError:  # the loop is closed (the server stopped): nobody is reading
                    pass

            pieces = model.unfold(ids, s, threading.Event(), put)
            try:
                if chat:
                    first = {
                        **base,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }
                    yield _event({**first, "sources": sources} if sources else first)
                # a client gone cancels this generator at its next await (StreamingResponse listens for the
                # disconnect), and the finally below frees the model
                # a piece's event is _event(piece(text, None)), its JSON around the text rendered once
                head, _, tail = _event(piece(_HOLE, None)).rpartition(json.dumps(_HOLE))
                while not pieces.done:
                    if text := pieces.take(await tokens.get()):
                        yield head + json.dumps(text) + tail
                done = pieces.usage(len(ids), s.max_tokens)
                end = _event(piece(None, done["finish_reason"]))  # the last events go out in one write
                if include_usage:
                    p, c = done["prompt_tokens"], done["completion_tokens"]
                    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                    end += _event({**base, "choices": [], "usage": usage})
                request.state.tokens = done["prompt_tokens"] + done["completion_tokens"]
                yield end + "data: [DONE]\n\n"
            finally:
                pieces.cancel.set()  # a client gone (or done): the model is free within one token step

        return StreamingResponse(events(), media_type="text/event-stream")

    def embeddings(self, req: EmbeddingRequest, request: Request) -> Any:
        if self.retriever is None:
            raise ApiError(404, "this recipe has no index, so no embedding model to serve", "not_found", param="model")
        if req.model not in (self.retriever.model_name, "default"):
            raise ApiError(
                400, f"the index's embedding model is {self.retriever.model_name!r}; ask for that one", param="model"
            )
        texts = [req.input] if isinstance(req.input, str) else req.input
        vectors = on_model_thread(self.retriever.embed, texts)  # torch: on the one thread that runs models
        tokens = sum(len(ids) for ids in self.retriever.model.tokenizer(texts, truncation=True)["input_ids"])
        request.state.tokens = tokens
        return {
            "object": "list",
            "model": self.retriever.model_name,
            "data": [
                {"object": "embedding", "index": i, "embedding": _vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def search_endpoint(self, req: SearchRequest) -> Any:
        """The index alone: the documents (or chunks) closest to a query, best first."""
        if self.retriever is None:
            raise ApiError(404, "this recipe has no index to search", "not_found")
        if not req.query.strip():
            raise ApiError(400, "query is empty", param="query")
        hits = on_model_thread(lambda: self.retriever.search(req.query, req.k, group_by=req.group_by))
        return {"object": "list", "data": [h._asdict() for h in hits]}


def _vector(v: Any, encoding: str) -> Any:
    """float: a list; base64: little-endian float32 bytes, as OpenAI's clients ask by default."""
    import base64

    import numpy as np

    return v.tolist() if encoding == "float" else base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def _reseed(s: Sampling, seed: int) -> Sampling:
    from dataclasses import replace

    return replace(s, seed=seed)


_HOLE = "\x00piece\x00"  # stands for a piece's text in its event's rendered JSON (the last one there is it)


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Guard:
    """ASGI middleware in front of the app: bearer token (any path, scheme case-insensitive), the body read here
    and counted as it arrives (a chunked body stops at the limit: memory stays bounded), a body read timeout,
    and one access-log line per request."""

    def __init__(self, app: Any, config: ServeConfig, token: str | None) -> None:
        self.app, self.config, self.token = app, config, token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def reply(code: int, message: str, kind: str = "invalid_request_error") -> None:
            status[0] = code
            await send(
                {"type": "http.response.start", "status": code, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": json.dumps(error_json(code, message, kind)).encode()})

        async def logged_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if self.token is not None:
                scheme, _, given = headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not secrets.compare_digest(
                    given.strip().encode(), self.token.encode()
                ):
                    return await reply(401, "missing or wrong bearer token", "authentication_error")
            limit = self.config.max_body_bytes
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                return await reply(413, f"request body over {limit} bytes")
            # read the body here, counting as it comes: the app sees it only when it is whole and within limits
            parts: list[bytes] = []
            size, more = 0, True
            while more:
                try:
                    message = await asyncio.wait_for(receive(), timeout=BODY_TIMEOUT)
                except asyncio.TimeoutError:
                    return await reply(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s")
                if message["type"] == "http.disconnect":
                    return None
                parts.append(message.get("body", b""))
                size += len(parts[-1])
                more = message.get("more_body", False)
                if size > limit:
                    return await reply(413, f"request body over {limit} bytes")
            body, replayed = b"".join(parts), [False]

            async def replay() -> dict[str, Any]:
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect, when it comes

            await self.app(scope, replay, logged_send)
        finally:
            tokens = scope.get("state", {}).get("tokens", "-")
            log.info(
                "%s %s %s %.1f ms tokens=%s",
                scope.get("method"),
                scope.get("path"),
                status[0] or "-",
                (time.perf_counter() - started) * 1000,
                tokens,
            )
