"""The server's frame on a real uvicorn: health, model list, metrics, error shapes, keys, limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rag.server.settings import ServerSettings
from tests.fixtures.live_server import (
    TINY_MODEL,
    TinyServer,
    make_tiny_services,
    tiny_server_running,
)

KEY = "sk-test-0123456789"


def test_health_and_models(tiny_server: TinyServer) -> None:
    health = httpx.get(f"{tiny_server.base_url}/health").json()
    assert health["status"] == "ok" and health["chat_models"] == [TINY_MODEL]
    models = httpx.get(f"{tiny_server.base_url}/v1/models").json()
    assert models["object"] == "list"
    by_type = {m["type"]: m for m in models["data"]}
    assert by_type["chat"]["id"] == TINY_MODEL and by_type["chat"]["max_model_len"] == 2048
    assert by_type["embedding"]["dimensions"] > 0


def test_unknown_route_gets_openai_error_shape(tiny_server: TinyServer) -> None:
    response = httpx.get(f"{tiny_server.base_url}/v1/nothing-here")
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "no route" in error["message"]
    assert response.headers["x-request-id"]


def test_metrics_are_prometheus_text(tiny_server: TinyServer) -> None:
    httpx.get(f"{tiny_server.base_url}/health")
    text = httpx.get(f"{tiny_server.base_url}/metrics").text
    assert 'rag_requests_total{route="/health",status="200"}' in text
    assert f'rag_generation_requests{{model="{TINY_MODEL}",state="waiting"}} 0.0' in text
    assert f'rag_prefix_cache_bytes{{model="{TINY_MODEL}",tier="ram"}}' in text


def test_metrics_count_prefix_cache_hits(tiny_server: TinyServer) -> None:
    # The same long prompt twice: the second restores its full blocks from the RAM tier.
    prompt = " ".join(f"w{i % 7}" for i in range(120))  # a few hundred tokens, several blocks
    for _ in range(2):
        response = httpx.post(
            f"{tiny_server.base_url}/v1/completions",
            json={"model": TINY_MODEL, "prompt": prompt, "max_tokens": 1},
            timeout=60,
        )
        assert response.status_code == 200
    cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    text = httpx.get(f"{tiny_server.base_url}/metrics").text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith(f'rag_prefix_cache_hit_tokens_total{{model="{TINY_MODEL}",tier="ram"}}')
    )
    assert float(line.split()[-1]) >= cached


def test_oversized_body_is_413(tiny_server: TinyServer) -> None:
    limit = tiny_server.settings.max_request_bytes
    response = httpx.post(
        f"{tiny_server.base_url}/v1/embeddings",
        content=b"x" * (limit + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_path: Path) -> Iterator[TinyServer]:
    settings = ServerSettings(api_keys=(KEY, "sk-second-key"))
    with tiny_server_running(make_tiny_services(tiny_llama_path), settings) as server:
        yield server


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"authorization": KEY}],
)
def test_bad_or_missing_key_is_401(keyed_server: TinyServer, headers: dict) -> None:
    response = httpx.get(f"{keyed_server.base_url}/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_anthropic_routes_get_anthropic_401(keyed_server: TinyServer) -> None:
    response = httpx.post(f"{keyed_server.base_url}/v1/messages", json={})
    assert response.status_code == 401
    assert response.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "missing API key"},
    }


@pytest.mark.parametrize(
    "headers", [{"authorization": f"Bearer {KEY}"}, {"x-api-key": "sk-second-key"}]
)
def test_good_key_passes_and_health_is_open(keyed_server: TinyServer, headers: dict) -> None:
    assert httpx.get(f"{keyed_server.base_url}/v1/models", headers=headers).status_code == 200
    assert httpx.get(f"{keyed_server.base_url}/health").status_code == 200
