"""Optional API keys: `Authorization: Bearer KEY` (OpenAI clients) or `x-api-key: KEY` (Anthropic).

Keys are compared in constant time and never logged. With no keys configured every request is
let in, which is the right default for a server bound to 127.0.0.1.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from rag.server.errors import APIError, error_body

# Open without a key: liveness probes and the web page's own files (the page asks for the key).
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def presented_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    # Compare with every key, always: the time taken does not tell which key came close.
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


class APIKeyMiddleware:
    """Rejects requests without a valid key with a 401 in the route's error shape."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or _is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":  # CORS preflights carry no credentials
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = presented_key(headers)
        if key is not None and key_matches(key, self.keys):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if key is None else "invalid API key"
        error = APIError(401, message, code="invalid_api_key")
        await _send_json(send, 401, error_body(scope["path"], error))


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def _send_json(send: Send, status: int, body: dict) -> None:
    import json

    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
