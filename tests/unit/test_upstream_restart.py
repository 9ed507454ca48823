"""A non-streamed (restartable) request survives its upstream dying mid-answer; a streamed one
ends with an error. The upstream is a real HTTP server that cuts every other answer after 2
tokens (the 1st, 3rd, ...): in the pool alone, and behind the appliance's OpenAI and Anthropic
routes (which mark their non-streamed requests restartable)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from inference.backend import GenerationError, GenerationRequest
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import httpx
import pytest

from rag.server.app import create_app
from rag.server.services import Services, StaticModelRegistry
from rag.upstreams.backend import make_remote_backend
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.pool import UpstreamPool
from tests.fixtures.live_server import run_server

FAST = RouterConfig(retry_backoff_s=0.01, connect_timeout_s=1.0, health_interval_s=60)


class FlakyUpstream(BaseHTTPRequestHandler):
    """/v1/completions: odd answers are cut after 2 tokens, even ones are whole (3 tokens)."""

    protocol_version = "HTTP/1.0"  # no length: the body ends when the connection closes
    bodies: list[dict]

    def do_GET(self) -> None:  # /health
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        first = len(self.bodies) % 2 == 1
        for i, token in enumerate([7, 8] if first else [4, 5, 6]):
            self._event({"choices": [{"text": f"t{token}", "token_ids": [token]}]})
            if first and i == 1:
                return  # the upstream dies mid-answer: the connection closes, no finish
        self._event({"choices": [{"text": "", "finish_reason": "length"}]})
        usage = {"prompt_tokens": 3, "completion_tokens": 3}
        self._event({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def flaky_upstream() -> Iterator[tuple[UpstreamSpec, list[dict]]]:
    bodies: list[dict] = []
    handler = type("Handler", (FlakyUpstream,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield UpstreamSpec(f"http://127.0.0.1:{server.server_address[1]}", "m"), bodies
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def flaky() -> Iterator[tuple[UpstreamPool, list[dict]]]:
    with flaky_upstream() as (spec, bodies):
        pool = UpstreamPool([spec], FAST, model="m", max_model_len=64, encode=lambda t: [])
        try:
            yield pool, bodies
        finally:
            pool.close()


def request(*, restartable: bool) -> GenerationRequest:
    return GenerationRequest(
        (1, 2, 3),
        SamplingParams(temperature=0.8, seed=42),
        StopParams(max_tokens=3),
        restartable=restartable,
    )


def test_a_restartable_request_starts_over_and_shows_only_the_whole_answer(
    flaky: tuple[UpstreamPool, list[dict]],
) -> None:
    pool, bodies = flaky
    chunks = list(pool.start(request(restartable=True)))
    assert "".join(c.text for c in chunks) == "t4t5t6"  # nothing of the cut answer
    assert [t for c in chunks for t in c.token_ids] == [4, 5, 6]
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 3
    assert len(bodies) == 2 and bodies[0] == bodies[1] and bodies[1]["seed"] == 42
    (stats,) = pool.stats()
    assert stats.num_restarts == 1 and stats.num_failures >= 1


def test_a_streamed_request_ends_with_an_error_after_its_tokens(
    flaky: tuple[UpstreamPool, list[dict]],
) -> None:
    pool, bodies = flaky
    texts: list[str] = []
    with pytest.raises(GenerationError, match=r"after 2 tokens .* cannot be resumed"):
        for chunk in pool.start(request(restartable=False)):
            texts.append(chunk.text)
    assert texts == ["t7", "t8"] and len(bodies) == 1
    assert pool.stats()[0].num_restarts == 0


def test_the_routes_restart_non_streamed_answers(tiny_llama_path: Path) -> None:
    with flaky_upstream() as (spec, bodies):
        backend = make_remote_backend([spec], FAST, tiny_llama_path)
        services = Services(models=StaticModelRegistry([backend]))
        try:
            with run_server(create_app(services)) as base_url:
                messages = [{"role": "user", "content": "Hi"}]
                body = {"model": "m", "max_tokens": 3, "messages": messages}
                chat = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
                assert chat.status_code == 200, chat.text
                assert chat.json()["choices"][0]["message"]["content"] == "t4t5t6"
                reply = httpx.post(f"{base_url}/v1/messages", json=body, timeout=30)
                assert reply.status_code == 200, reply.text
                assert reply.json()["content"][0]["text"] == "t4t5t6"
                assert reply.json()["usage"]["output_tokens"] == 3
                assert len(bodies) == 4  # each cut once, then answered whole
                stream = httpx.post(
                    f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
                )
                assert '"content":"t7"' in stream.text.replace(" ", "")
                assert "cannot be resumed" in stream.text and len(bodies) == 5
        finally:
            services.close()
