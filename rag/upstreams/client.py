"""One upstream over HTTP: stream a completion, probe /health, read /v1/models.

    await client.stream(body, decoder, emit)   emit(chunk) per chunk as it arrives; raises
        UpstreamFailure      the upstream failed (can't connect, 5xx, 429, cut or bad stream):
                             try another one, take this one out
        UpstreamRequestError the upstream refused the request (4xx): the same request would
                             fail anywhere, so it is not retried
    await client.healthy()  -> (ok, error)

Runs on the pool's event loop (httpx.AsyncClient); cancelling the task closes the HTTP stream,
which an OpenAI-compatible server takes as the client leaving (it stops generating).

Ignores: which upstream to use and when to retry (pool.py), the JSON inside chunks (wire.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from inference.backend import GenerationChunk, GenerationError

import httpx

from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.wire import ChunkDecoder, UpstreamStreamError, error_message, sse_payload

_RETRYABLE_4XX = (408, 409, 429)  # timeout, conflict, too many requests: another one may take it


class UpstreamFailure(Exception):
    """This upstream failed; `num_tokens` is how many tokens it had streamed by then."""

    def __init__(self, upstream: str, message: str, num_tokens: int = 0) -> None:
        super().__init__(f"upstream {upstream}: {message}")
        self.num_tokens = num_tokens


class UpstreamRequestError(GenerationError):
    """The upstream refused the request itself (HTTP 4xx); status_code is its status."""

    def __init__(self, upstream: str, status_code: int, message: str) -> None:
        super().__init__(f"upstream {upstream} refused the request ({status_code}): {message}")
        self.status_code = status_code


def _headers(spec: UpstreamSpec) -> dict[str, str]:
    return {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}


class UpstreamClient:
    """HTTP to one upstream; one connection pool, shared by its requests."""

    def __init__(self, spec: UpstreamSpec, config: RouterConfig) -> None:
        self.spec = spec
        self.name = spec.name
        self._config = config
        timeout = httpx.Timeout(
            connect=config.connect_timeout_s,
            read=config.read_timeout_s,
            write=config.connect_timeout_s,
            pool=config.connect_timeout_s,
        )
        self._http = httpx.AsyncClient(base_url=spec.url, headers=_headers(spec), timeout=timeout)

    async def stream(
        self,
        body: dict[str, Any],
        decoder: ChunkDecoder,
        emit: Callable[[GenerationChunk], None],
    ) -> None:
        """POST /v1/completions and emit its chunks, the finish chunk last."""
        try:
            async with self._http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    await self._refuse(response)
                async for line in response.aiter_lines():
                    payload = sse_payload(line)
                    if payload is not None:
                        for chunk in decoder.feed(payload):
                            emit(chunk)
            emit(decoder.finish())
        except httpx.HTTPError as exc:
            if decoder.finished:  # cut after the finish: only the usage or [DONE] was lost
                emit(decoder.finish())
                return
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise UpstreamFailure(self.name, message, decoder.num_tokens) from exc
        except UpstreamStreamError as exc:
            raise UpstreamFailure(self.name, str(exc), decoder.num_tokens) from exc

    async def _refuse(self, response: httpx.Response) -> None:
        await response.aread()
        try:
            message = error_message(response.json())
        except (json.JSONDecodeError, UnicodeDecodeError):
            message = response.text[:300] or response.reason_phrase
        status = response.status_code
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            raise UpstreamRequestError(self.name, status, message)
        raise UpstreamFailure(self.name, f"HTTP {status}: {message}")

    async def healthy(self) -> tuple[bool, str | None]:
        """GET /health: 200 is healthy (vLLM, SGLang, llama-server and this appliance have it)."""
        try:
            response = await self._http.get("/health", timeout=self._config.connect_timeout_s)
        except httpx.HTTPError as exc:
            return False, f"health check: {type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return False, f"health check: HTTP {response.status_code}"
        return True, None

    async def aclose(self) -> None:
        await self._http.aclose()


def fetch_model_card(spec: UpstreamSpec, timeout_s: float) -> dict[str, Any] | None:
    """The upstream's /v1/models entry for spec.model (or its first chat model); None if down.

    Called once at start-up, before the pool's loop runs, so it is synchronous.
    """
    try:
        response = httpx.get(f"{spec.url}/v1/models", headers=_headers(spec), timeout=timeout_s)
        response.raise_for_status()
        cards = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    for card in cards:
        if not isinstance(card, dict):
            continue
        if spec.model is not None and card.get("id") == spec.model:
            return card
        # This appliance lists embedders, rerankers and "rag" too; vLLM lists no type.
        if spec.model is None and card.get("type", "chat") == "chat" and not card.get("rag"):
            return card
    return None
