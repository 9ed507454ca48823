"""The main job end to end on the real default models: ingest examples/docs, then `rag ask`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.default_models


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ingest_examples_then_ask_cites_the_right_document() -> None:
    ingested = _cli("ingest", "examples/docs", "--json", "--quiet")
    assert ingested.returncode == 0, ingested.stderr
    asked = _cli("rag", "ask", "When are the public observing nights held?", "--json")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    assert "Friday" in answer["answer"]
    assert answer["finish_reason"] == "stop"
    sources = [c["source"] for c in answer["citations"]]
    assert any(s.endswith("visitor-guide.md") for s in sources)
    timings = answer["timings"]
    assert timings["num_prompt_tokens"] > 100 and timings["num_completion_tokens"] > 0

    off_topic = _cli("rag", "ask", "What is the capital of Peru?", "--json")
    assert off_topic.returncode == 0, off_topic.stderr
    assert json.loads(off_topic.stdout)["finish_reason"] == "not_found"


def test_ask_without_an_index_says_what_to_do() -> None:
    asked = _cli("rag", "ask", "anything")
    assert asked.returncode == 2
    assert "run `ingest" in asked.stderr
