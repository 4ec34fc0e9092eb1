"""The OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming),
/v1/embeddings, and document chat as model ids ending in `+docs` (answers carry their `sources`).

Bad requests get a 4xx with an OpenAI-style JSON error, never a crash: 400 bad JSON or fields,
401 missing/wrong bearer token, 404 unknown model, 413 body too large.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.retrieval import docs_prompt
from runner.serving import Model, ServeConfig


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    stream: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def create_app(models: dict[str, Model], config: ServeConfig, *, retriever: Any = None, token: str | None = None) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="runner", docs_url=None, redoc_url=None)
    doc_models = {f"{name}+docs": m for name, m in models.items()} if retriever is not None and config.docs else {}

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        what = "request body is not valid JSON" if first.get("type") == "json_invalid" else first.get("msg", "invalid request")
        return error(400, f"{where}: {what}" if where else what)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        if token is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong bearer token", "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return error(413, f"request body over {config.max_body_bytes} bytes")
        if length is None and request.method == "POST":
            body = await request.body()
            if len(body) > config.max_body_bytes:
                return error(413, f"request body over {config.max_body_bytes} bytes")
        return await call_next(request)

    def pick(name: str) -> tuple[Model, bool]:
        if name in models:
            return models[name], False
        if name in doc_models:
            return doc_models[name], True
        raise ApiError(404, f"no model {name!r}; models: {', '.join(list(models) + list(doc_models))}", "not_found")

    def limit(max_tokens: int | None) -> int:
        if max_tokens is not None and max_tokens > config.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {config.max_tokens}")
        return max_tokens or min(128, config.max_tokens)

    def with_docs(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        hits = retriever.search(question, config.top_k)
        sources = [{"id": h.chunk_id, "document": h.doc_id, "title": h.title, "score": round(h.score, 4),
                    "text": h.text} for h in hits]
        return messages[:-1] + [{"role": "user", "content": docs_prompt(question, hits)}], sources

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "runner"}
                                           for n in list(models) + list(doc_models)]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> Any:
        model, docs = pick(req.model)
        max_tokens = limit(req.max_tokens)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        if config.system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": config.system})
        sources: list[dict[str, Any]] = []
        if docs:
            messages, sources = with_docs(messages)
        prompt = model.prompt(messages)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse_chat(model, prompt, max_tokens, req.temperature, rid, created, req.model,
                                               sources), media_type="text/event-stream")
        text, n_prompt, n_out, finish = model.generate(prompt, max_tokens=max_tokens, temperature=req.temperature)
        body = {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}
        if docs:
            body["sources"] = sources
        return body

    @app.post("/v1/completions")
    def complete(req: CompletionRequest) -> Any:
        model, _ = pick(req.model)
        max_tokens = limit(req.max_tokens)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            def events() -> Iterator[str]:
                for piece in model.stream(req.prompt, max_tokens=max_tokens, temperature=req.temperature):
                    yield _event({"id": rid, "object": "text_completion", "created": created, "model": req.model,
                                  "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
                yield _event({"id": rid, "object": "text_completion", "created": created, "model": req.model,
                              "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, n_prompt, n_out, finish = model.generate(req.prompt, max_tokens=max_tokens, temperature=req.temperature)
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}}

    @app.post("/v1/embeddings")
    def embeddings(req: EmbeddingRequest) -> Any:
        if retriever is None:
            raise ApiError(404, "this recipe has no index, so no embedding model to serve", "not_found")
        if req.model not in (retriever.model_name, "default"):
            raise ApiError(400, f"the index's embedding model is {retriever.model_name!r}; ask for that one")
        texts = [req.input] if isinstance(req.input, str) else req.input
        vectors = retriever.embed(texts)
        return {"object": "list", "model": retriever.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    return app


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _sse_chat(model: Model, prompt: str, max_tokens: int, temperature: float, rid: str, created: int, name: str,
              sources: list[dict[str, Any]]) -> Iterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    if sources:
        first["sources"] = sources
    yield _event(first)
    for piece in model.stream(prompt, max_tokens=max_tokens, temperature=temperature):
        yield _event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    yield _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    yield "data: [DONE]\n\n"
