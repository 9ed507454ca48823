"""Upstream failures keep their meaning on the appliance's API: an upstream's own 4xx stays that
4xx, no upstream at all is a 503 (not a 500), on the OpenAI and Anthropic routes alike."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from rag.server.app import create_app
from rag.server.services import Services, StaticModelRegistry
from rag.upstreams.backend import make_remote_backend
from rag.upstreams.config import RouterConfig, UpstreamSpec
from tests.fixtures.live_server import run_server

FAST = RouterConfig(retry_backoff_s=0.01, connect_timeout_s=0.5, health_interval_s=60)
CHAT = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}


class RefusingUpstream(BaseHTTPRequestHandler):
    """Healthy, but refuses every completion with a 422, as vLLM does for a bad parameter."""

    def do_GET(self) -> None:  # /health
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": "min_p is out of range"}}).encode()
        self.send_response(422)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def refusing_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), RefusingUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def appliance(url: str, tiny_llama_path: Path) -> Iterator[str]:
    backend = make_remote_backend([UpstreamSpec(url, "m")], FAST, tiny_llama_path)
    services = Services(models=StaticModelRegistry([backend]))
    try:
        with run_server(create_app(services)) as base_url:
            yield base_url
    finally:
        services.close()


def test_an_upstream_4xx_is_kept(refusing_url: str, tiny_llama_path: Path) -> None:
    with appliance(refusing_url, tiny_llama_path) as base_url:
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, timeout=30)
        assert reply.status_code == 422, reply.text
        assert "min_p is out of range" in reply.json()["error"]["message"]
        reply = httpx.post(f"{base_url}/v1/messages", json=CHAT, timeout=30)
        assert reply.status_code == 422, reply.text
        assert reply.json()["type"] == "error"


def test_no_upstream_is_a_503(tiny_llama_path: Path) -> None:
    with appliance(f"http://127.0.0.1:{closed_port()}", tiny_llama_path) as base_url:
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, timeout=30)
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert "no upstream could take the request" in error["message"]
        assert error["code"] == "unavailable"
        reply = httpx.post(f"{base_url}/v1/messages", json=CHAT, timeout=30)
        assert reply.status_code == 503, reply.text
