"""The OpenAI-compatible HTTP app: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming),
/v1/embeddings, /v1/search, and document chat as model ids ending in `+docs` (answers carry `sources`).

Every answer is either a valid OpenAI response or an OpenAI-shaped JSON error, never a crash: 400 bad JSON, fields
or an unsupported parameter (named), 400 `context_length_exceeded` when prompt + max_tokens do not fit the model,
401 missing or wrong bearer token, 404 unknown model or path, 405 wrong method, 408 a body that does not arrive in
time, 413 body too large (the last three and 401 from `guard.Guard`). A client that disconnects mid-stream frees the
model within one token step."""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request  # imported only by `runner serve` (api.serve_app), never by the CLI at large
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from runner.retrieval import docs_prompt
from runner.schema import ServeConfig
from runner.serve.codec import BadTokens, ContextTooLong
from runner.serve.engine import Engine, NotSupported, Output, Prompt, Sampling, astream, check_supported
from runner.serve.guard import Guard
from runner.serve.openai import (
    CHAT,
    COMPLETION,
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Endpoint,
    GenerationRequest,
    SearchRequest,
    error_json,
    usage,
)
from runner.serve.thread import on_model_thread

if TYPE_CHECKING:
    from runner.retrieval import Retriever

log = logging.getLogger("runner.serve")


def create_app(
    models: dict[str, Engine], config: ServeConfig, *, retriever: Retriever | None = None, token: str | None = None
) -> Guard:
    """The app (behind the Guard: token, body size, access log) over these models and index."""
    from fastapi import FastAPI

    from runner.serve.load import attach_batchers

    app = FastAPI(title="runner", docs_url=None, redoc_url=None)
    _error_handlers(app)
    attach_batchers(models, config)
    service = Service(models, config, retriever)
    app.get("/v1/models")(service.list_models)
    app.post("/v1/chat/completions")(service.chat)
    app.post("/v1/completions")(service.complete)
    app.post("/v1/embeddings")(service.embeddings)
    app.post("/v1/search")(service.search)
    page = None
    if config.ui and models and _ui_available():
        from runner.serve.csp import ContentPolicy
        from runner.serve.ui import mount

        page = ContentPolicy(mount(app, service, token))
    return Guard(app, config, token, page=page)


def _ui_available() -> bool:
    """Whether the `ui` extra is installed (asked without importing it: the API starts as fast without it)."""
    import importlib.util

    return importlib.util.find_spec("gradio") is not None


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


def tool_format(model: Engine, name: str) -> str:
    """The tool-call format of a model's chat template (`tools.style`); a model without one is refused by name."""
    from runner.serve.tools import style

    chat = model.codec.template == "chat"
    fmt = style(getattr(model.codec.tokenizer, "chat_template", None)) if chat else None
    if fmt is None:
        why = (
            "its chat template takes no tools, or calls them in a format runner does not read"
            if chat
            else f"it is prompted with template {model.codec.template}, which has no tool calls"
        )
        raise ApiError(400, f"model {name} cannot be offered tools: {why}", param="tools")
    return fmt


class Service:
    """What the endpoints share: the models (and their `+docs` twins answering from the index), the limits."""

    def __init__(self, models: dict[str, Engine], config: ServeConfig, retriever: Retriever | None) -> None:
        self.models, self.config, self.retriever = models, config, retriever
        self.doc_models = (
            {f"{name}+docs": m for name, m in models.items()} if retriever is not None and config.docs else {}
        )

    def pick(self, name: str) -> tuple[Engine, bool]:
        """The model a request names, and whether it answers from the documents."""
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

    def docs_turn(self, question: str) -> tuple[str, list[dict[str, Any]]]:
        """The user turn of a document chat (the retrieved chunks, then the question) and its sources."""
        assert self.retriever is not None
        retriever = self.retriever
        hits = on_model_thread(retriever.search, question, self.config.top_k) if question.strip() else []
        sources = [
            {"id": h.chunk_id, "document": h.doc_id, "title": h.title, "score": round(h.score, 4), "text": h.text}
            for h in hits
        ]
        return docs_prompt(question, hits), sources

    def list_models(self) -> dict[str, Any]:
        now = int(time.time())
        every = {**self.models, **self.doc_models}
        names = list(every) + ([self.retriever.model_name] if self.retriever is not None else [])
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
        s = self.sampling(req, model)
        messages = req.conversation(self.config.system)
        sources = None
        if docs:
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            turn, sources = await run_in_threadpool(self.docs_turn, question)
            messages = [*messages[:-1], {"role": "user", "content": turn}]
        fmt = tool_format(model, req.model) if req.offers_tools() else None
        tools = json.dumps(req.tools) if fmt else None
        return await self._answer(request, req, s, CHAT, model, [model.codec.prompt(messages, tools)], sources, fmt)

    async def complete(self, req: CompletionRequest, request: Request) -> Any:
        model, docs = self.pick(req.model)
        s = self.sampling(req, model)
        prompts = req.prompts()
        sources = None
        if docs:  # document chat on a plain completion: the prompt is the question
            texts = [p if isinstance(p, str) else model.codec.tokenizer.decode(p) for p in prompts]
            found = [await run_in_threadpool(self.docs_turn, p) for p in texts]
            prompts, sources = [f for f, _ in found], [x for _, srcs in found for x in srcs]
        return await self._answer(request, req, s, COMPLETION, model, prompts, sources)

    async def _answer(
        self,
        request: Request,
        req: GenerationRequest,
        s: Sampling,
        endpoint: Endpoint,
        model: Engine,
        prompts: list[Prompt],
        sources: list[dict[str, Any]] | None,
        tool_format: str | None = None,
    ) -> Any:
        """The one flow of both generation endpoints: the answers, whole or streamed, in the endpoint's shape (with
        the documents' `sources` for document chat)."""
        rid, created = f"{endpoint.id_prefix}-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            base = {"id": rid, "object": endpoint.chunk_object, "created": created, "model": req.model}
            return self._streaming(request, endpoint, model, prompts[0], s, base, sources or [], req.include_usage)
        outputs = await run_in_threadpool(self._whole, endpoint, model, prompts, s, req.n)
        counts = usage(sum(o.prompt_tokens for o in outputs[:: req.n]), sum(o.completion_tokens for o in outputs))
        request.state.tokens = counts["total_tokens"]
        body = {
            "id": rid,
            "object": endpoint.object,
            "created": created,
            "model": req.model,
            "choices": [endpoint.choice(i, o, s.logprobs, tool_format) for i, o in enumerate(outputs)],
            "usage": counts,
        }
        return body if sources is None else {**body, "sources": sources}

    def sampling(self, req: GenerationRequest, model: Engine) -> Sampling:
        """How to pick the request's tokens; a parameter the model's engine does not honour is refused by name."""
        s = req.sampling(self.config.max_tokens)
        try:
            check_supported(model, s)
        except NotSupported as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        return s

    def _whole(self, endpoint: Endpoint, model: Engine, prompts: list[Prompt], s: Sampling, n: int) -> list[Output]:
        """`n` answers to each prompt, in order (a seeded request's choice i uses seed + i)."""
        jobs = [(p, s if s.seed is None or i == 0 else s.reseeded(s.seed + i)) for p in prompts for i in range(n)]
        try:
            return model.generate_all(jobs)
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), param=endpoint.prompt_param, code="context_length_exceeded") from None
        except BadTokens as exc:
            raise ApiError(400, str(exc), param=endpoint.prompt_param) from None

    def _streaming(
        self,
        request: Request,
        endpoint: Endpoint,
        model: Engine,
        prompt: Prompt,
        s: Sampling,
        base: dict[str, Any],
        sources: list[dict[str, Any]],
        include_usage: bool,
    ) -> StreamingResponse:
        try:
            ids = model.codec.encode(prompt, s.max_tokens)  # a prompt that does not fit is refused before the stream
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), param=endpoint.prompt_param, code="context_length_exceeded") from None
        except BadTokens as exc:
            raise ApiError(400, str(exc), param=endpoint.prompt_param) from None

        async def events() -> AsyncIterator[str]:
            done: dict[str, Any] = {}
            pieces = astream(model, ids, s, done)
            try:
                if endpoint.chat:
                    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    first = {**base, "choices": [role]}
                    yield _event({**first, "sources": sources} if sources else first)
                # a client gone cancels this generator at its next await (StreamingResponse listens for the
                # disconnect), and closing `pieces` frees the model
                # a piece's event is _event(piece), its JSON around the text rendered once
                head, _, tail = _event({**base, "choices": [endpoint.delta(_HOLE, None)]}).rpartition(json.dumps(_HOLE))
                async for text in pieces:
                    yield head + json.dumps(text) + tail
                # the last events go out in one write
                end = _event({**base, "choices": [endpoint.delta(None, done["finish_reason"])]})
                counts = usage(done["prompt_tokens"], done["completion_tokens"])
                if include_usage:
                    end += _event({**base, "choices": [], "usage": counts})
                request.state.tokens = counts["total_tokens"]
                yield end + "data: [DONE]\n\n"
            finally:
                await pieces.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    def embeddings(self, req: EmbeddingRequest, request: Request) -> Any:
        if self.retriever is None:
            raise ApiError(404, "this recipe has no index, so no embedding model to serve", "not_found", param="model")
        retriever = self.retriever
        if req.model not in (retriever.model_name, "default"):
            raise ApiError(
                400, f"the index's embedding model is {retriever.model_name!r}; ask for that one", param="model"
            )
        texts = [req.input] if isinstance(req.input, str) else req.input
        vectors = on_model_thread(retriever.embed, texts)  # torch: on the one thread that runs models
        tokens = sum(len(ids) for ids in retriever.model.tokenizer(texts, truncation=True)["input_ids"])
        request.state.tokens = tokens
        return {
            "object": "list",
            "model": retriever.model_name,
            "data": [
                {"object": "embedding", "index": i, "embedding": _vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def search(self, req: SearchRequest) -> Any:
        """The index alone: the documents (or chunks) closest to a query, best first."""
        if self.retriever is None:
            raise ApiError(404, "this recipe has no index to search", "not_found")
        if not req.query.strip():
            raise ApiError(400, "query is empty", param="query")
        retriever = self.retriever
        hits = on_model_thread(lambda: retriever.search(req.query, req.k, group_by=req.group_by))
        return {"object": "list", "data": [h._asdict() for h in hits]}


def _vector(v: Any, encoding: str) -> Any:
    """float: a list; base64: little-endian float32 bytes, as OpenAI's clients ask by default."""
    import base64

    import numpy as np

    return v.tolist() if encoding == "float" else base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


_HOLE = "\x00piece\x00"  # stands for a piece's text in its event's rendered JSON (the last one there is it)


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"
