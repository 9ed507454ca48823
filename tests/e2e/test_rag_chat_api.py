"""RAG through `/v1/chat/completions` with the official `openai` client: model "rag" or the
`rag` extension field, streaming and not; citations ride along as extra fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from inference.embedder import Embedder

import openai
import pytest

from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.store import SqliteVecStore
from rag.answer import NOT_FOUND_ANSWER
from tests.e2e.test_rag_api import write_docs
from tests.fixtures.live_server import (
    TINY_MODEL,
    TinyServer,
    make_tiny_services,
    tiny_server_running,
)

ANSWER_ANYWAY = {"min_similarity": -1.0}  # the tiny embedder is random: force retrieval through
QUESTION = [{"role": "user", "content": "When does the observatory open?"}]


@pytest.fixture(scope="module")
def rag_server(
    tiny_llama_path: Path, tiny_bert_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyServer]:
    root = tmp_path_factory.mktemp("rag_chat")
    docs = write_docs(root / "docs")
    index = root / "index.sqlite3"
    with SqliteVecStore.open(index) as store:
        assert run_ingest([docs], store, lambda: Embedder.load(tiny_bert_path), IngestConfig()).ok
    services = make_tiny_services(tiny_llama_path, tiny_bert_path, index_path=index)
    with tiny_server_running(services) as server:
        yield server


@pytest.fixture
def client(rag_server: TinyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{rag_server.base_url}/v1", api_key="unused", max_retries=0)


def test_extension_field_answers_with_citations(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=TINY_MODEL,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body={"rag": {"top_k": 2, **ANSWER_ANYWAY}},
    )
    extra = response.model_extra or {}
    assert len(extra["citations"]) == 2
    assert {c["number"] for c in extra["citations"]} == {1, 2}
    assert all(c["source"].endswith((".md", ".txt")) for c in extra["citations"])
    assert extra["rag_timings"]["num_prompt_tokens"] == response.usage.prompt_tokens
    assert response.usage.completion_tokens <= 8
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.model == TINY_MODEL


def test_model_rag_streams_citations_first(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="rag",
        messages=QUESTION,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"rag": ANSWER_ANYWAY},
    )
    chunks = list(stream)
    first, usage_chunk = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert len((first.model_extra or {})["citations"]) == 5
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and "rag_timings" in (finish[0].model_extra or {})
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens <= 6


def test_not_found_answer_when_nothing_is_similar(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="rag:" + TINY_MODEL,
        messages=QUESTION,
        extra_body={"rag": {"min_similarity": 1.0}},
    )
    assert response.choices[0].message.content == NOT_FOUND_ANSWER
    assert (response.model_extra or {})["citations"] == []
    assert response.choices[0].finish_reason == "stop"


def test_rag_errors_are_openai_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.chat.completions.create(
            model=TINY_MODEL, messages=QUESTION, extra_body={"rag": {"top_k": 0}}
        )
    with pytest.raises(openai.BadRequestError, match=r"n > 1"):
        client.chat.completions.create(model="rag", messages=QUESTION, n=2)
    with pytest.raises(openai.BadRequestError, match=r"rag\.bogus"):
        client.chat.completions.create(
            model=TINY_MODEL, messages=QUESTION, extra_body={"rag": {"bogus": 1}}
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="rag:no-such-model", messages=QUESTION)
