"""Synchronous JSON calls to one remote server, with retries: for embeddings and rerank.

    client = JSONClient(spec, RouterConfig())
    client.post("/v1/embeddings", body) -> dict     retried on connect errors, timeouts, 5xx, 429
    client.models() -> list of /v1/models cards

Embedding and rerank calls are idempotent (the same input gives the same answer), so any
failure that is not the request's own fault is retried after retry_backoff_s x 2^k, up to
max_attempts; a 4xx is raised at once as RemoteRequestError with the server's message. The
callers run on the server's encoder thread (or a CLI), which may block, so this is plain sync
httpx, not the generation pool's event loop.

Ignores: routing over several servers (one embedder or reranker is one URL: a load balancer in
front of it is the operator's choice), health probes (a failed call is retried, then reported).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx

from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.wire import error_message

log = logging.getLogger(__name__)

_RETRYABLE_4XX = (408, 409, 429)


class RemoteRequestError(ValueError):
    """The server refused the request itself (4xx); the same request would fail again."""

    def __init__(self, name: str, status_code: int, message: str) -> None:
        super().__init__(f"{name} refused the request ({status_code}): {message}")
        self.status_code = status_code
        self.message = message


class RemoteUnavailableError(ConnectionError):
    """Every attempt failed: the server is down, overloaded or answering nonsense."""


class JSONClient:
    """One server's base URL and key; `post` and `models` with retries."""

    def __init__(self, spec: UpstreamSpec, config: RouterConfig) -> None:
        self.spec = spec
        self.name = spec.name
        self._config = config
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        self._http = httpx.Client(base_url=spec.url, headers=headers, timeout=timeout)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    def models(self) -> list[dict[str, Any]]:
        cards = self._call("GET", "/v1/models", None).get("data") or []
        return [card for card in cards if isinstance(card, dict)]

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        errors: list[str] = []
        for attempt in range(self._config.max_attempts):
            if attempt:
                time.sleep(self._config.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = self._http.request(method, path, json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code == 200:
                try:
                    return response.json()
                except json.JSONDecodeError:
                    errors.append(f"not JSON: {response.text[:200]!r}")
                    continue
            message = _message(response)
            status = response.status_code
            if 400 <= status < 500 and status not in _RETRYABLE_4XX:
                raise RemoteRequestError(self.name, status, message)
            errors.append(f"HTTP {status}: {message}")
            log.warning(
                "%s %s%s failed (attempt %d): %s", method, self.name, path, attempt + 1, message
            )
        raise RemoteUnavailableError(
            f"{self.name}{path} failed {len(errors)} times: " + "; ".join(errors)
        )

    def close(self) -> None:
        self._http.close()


def _message(response: httpx.Response) -> str:
    try:
        return error_message(response.json())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:300] or response.reason_phrase
