"""The ASGI guard in front of the app: bearer token, request body limits, one access-log line per request; with
the chat page, the routing of every path outside the API to it."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

from runner.schema import ServeConfig
from runner.serve.openai import error_json

log = logging.getLogger("runner.serve")
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive


class Guard:
    """ASGI middleware: bearer token (any path, scheme case-insensitive), the body read here and counted as it
    arrives (a chunked body stops at the limit: memory stays bounded), a body read timeout, and one access-log line
    per request (method, path, status, latency, tokens; never bodies)."""

    def __init__(self, app: Any, config: ServeConfig, token: str | None, page: Any = None) -> None:
        self.app, self.config, self.token, self.page = app, config, token, page

    def _route(self, path: str) -> tuple[Any, bool]:
        """The app a path goes to, and whether it needs the bearer token: the API's paths do; the chat page's
        (every other path, when there is a page) ask for the token in its sign-in form and keep a cookie."""
        if self.page is None or path.startswith("/v1/") or path in ("/v1", "/openapi.json"):
            return self.app, True
        return self.page, False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]
        app, needs_token = self._route(scope.get("path", ""))

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
            if needs_token and self.token is not None and not self._authorized(headers.get("authorization", "")):
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
                except TimeoutError:
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
                return await receive()  # after the body: the disconnect

            await app(scope, replay, logged_send)
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
        return None

    def _authorized(self, header: str) -> bool:
        assert self.token is not None
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token.encode())
