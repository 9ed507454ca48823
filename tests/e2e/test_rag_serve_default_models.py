"""`rag serve` as users start it: a real process on the default models, then a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.default_models


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rag_serve_starts_lists_models_and_stops_on_sigterm() -> None:
    port = _free_port()
    env = {**os.environ, "RAG_API_KEYS": "sk-one,sk-two"}
    server = subprocess.Popen(
        [sys.executable, "-m", "rag", "serve", "--port", str(port), "--log-json"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "rag serve did not come up"
            time.sleep(0.5)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        models = httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer sk-two"}).json()
        by_id = {m["id"]: m for m in models["data"]}
        assert by_id["SmolLM2-135M-Instruct"]["loaded"] and by_id["rag"]["rag"]
        by_type = {m["type"]: m for m in models["data"]}
        assert by_type["embedding"]["dimensions"] == 384
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    # uvicorn shuts down cleanly, then exits by the signal it got (as service managers expect).
    assert server.returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr
    assert "sk-one" not in stderr and "sk-two" not in stderr  # keys are never logged
    assert '"path": "/v1/models", "route": "/v1/models", "status": 200' in stderr  # access log
