"""The chat page's Content-Security-Policy, as ASGI middleware around the page's app.

Scripts run only from the page's own origin or from the page's own HTML with this response's nonce: an inline
event handler (`<img onerror=...>`) or a `javascript:` URL that reached the page anyway does not run. Nothing loads
from, connects to or frames from another origin, and no other site may frame the page."""

from __future__ import annotations

import re
import secrets
from typing import Any

_ASSETS = ("/assets/", "/gradio_api/", "/static/")  # scripts, styles and JSON: never an HTML page
_SCRIPT = re.compile(rb"<script(?=[\s>])")

POLICY = (
    "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; media-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


class ContentPolicy:
    """Adds the policy (and nosniff, no referrer) to every response of `app`; an HTML page's own `<script>` tags
    get the response's nonce. A page is asked for uncompressed, so that its tags can be read."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        nonce = secrets.token_urlsafe(18)
        headers = [
            (b"content-security-policy", POLICY.format(nonce=nonce).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]
        if not scope.get("path", "").startswith(_ASSETS):
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k != b"accept-encoding"]}
        start: dict[str, Any] = {}
        body: list[bytes] = []

        async def policed(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message, headers=[*message.get("headers", []), *headers])
                if not _is_html(start):
                    await send(start)
                return
            if not start or not _is_html(start) or message["type"] != "http.response.body":
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            page = _SCRIPT.sub(b'<script nonce="' + nonce.encode() + b'"', b"".join(body))
            fixed = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*fixed, (b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})
            return None

        return await self.app(scope, receive, policed)


def _is_html(start: dict[str, Any]) -> bool:
    headers = {k.lower(): v for k, v in start.get("headers", [])}
    return headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers
