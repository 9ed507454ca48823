"""`POST /v1/rag/query` on a real uvicorn over the tiny models and a small ingested index.

The tiny embedder is random, so similarity means nothing: `min_similarity` -1 forces an answer
and 1 forces the not-found path. Citations are checked against `/v1/chunks/{id}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from inference.backend import GenerationChunk, GenerationError, GenerationRequest, Usage
from inference.embedder import Embedder

import httpx
import pytest

from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.store import SqliteVecStore
from rag.answer import NOT_FOUND_ANSWER
from rag.reranking import RerankScores
from rag.server.services import StaticModelRegistry
from tests.fixtures.ingest_fakes import HashingEmbedder
from tests.fixtures.live_server import (
    TINY_MODEL,
    TinyServer,
    make_tiny_services,
    tiny_server_running,
)

DOCS = {
    "hours.md": "# Opening hours\n\nThe observatory opens on Friday nights for the public.\n\n"
    "## Tickets\n\nTickets cost five euros at the door.\n",
    "telescope.txt": "The main telescope is a refractor with a lens of sixty centimetres.\n",
    "notes/parking.md": "# Parking\n\nVisitors park beside the north gate of the campus.\n",
}
ANSWER = {"min_similarity": -1.0, "max_tokens": 8}
TIMING_KEYS = {
    "retrieve_s",
    "rerank_s",
    "prefill_s",
    "decode_s",
    "num_prompt_tokens",
    "num_cached_tokens",
    "num_completion_tokens",
}


def write_docs(root: Path) -> Path:
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def rag_server(
    tiny_llama_path: Path, tiny_bert_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyServer]:
    root = tmp_path_factory.mktemp("rag_api")
    docs = write_docs(root / "docs")
    index = root / "index.sqlite3"
    with SqliteVecStore.open(index) as store:
        report = run_ingest([docs], store, lambda: Embedder.load(tiny_bert_path), IngestConfig())
    assert report.ok and report.added == len(DOCS)
    services = make_tiny_services(tiny_llama_path, tiny_bert_path, index_path=index)
    with tiny_server_running(services) as server:
        yield server


def query(server: TinyServer, **body: object) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/rag/query", json=body, timeout=60)


def sse(response: httpx.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def test_answer_json_shape_and_citations_are_real_chunks(rag_server: TinyServer) -> None:
    response = query(rag_server, question="When does the observatory open?", **ANSWER)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == TINY_MODEL
    assert body["finish_reason"] in ("stop", "length")
    assert set(body["timings"]) == TIMING_KEYS
    assert body["timings"]["num_prompt_tokens"] > 0
    assert 0 < body["timings"]["num_completion_tokens"] <= 8
    assert body["timings"]["rerank_s"] == 0
    assert 1 <= len(body["citations"]) <= 5
    assert [c["number"] for c in body["citations"]] == list(range(1, len(body["citations"]) + 1))
    for citation in body["citations"]:
        chunk = httpx.get(f"{rag_server.base_url}/v1/chunks/{citation['chunk_id']}").json()
        assert chunk["text"].strip() == citation["text"]
        assert chunk["path"] == citation["source"]
        assert chunk["heading"] == citation["heading"]
        assert citation["snippet"] and citation["text"].startswith(citation["snippet"][:40])


def test_stream_sends_sources_deltas_then_done(rag_server: TinyServer) -> None:
    response = query(rag_server, question="How much are tickets?", stream=True, **ANSWER)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response)
    names = [name for name, _ in events]
    assert names[0] == "sources" and names[-1] == "done"
    assert set(names[1:-1]) <= {"delta"}
    sources, done = events[0][1], events[-1][1]
    assert sources["model"] == TINY_MODEL and sources["citations"]
    text = "".join(data["text"] for name, data in events if name == "delta")
    assert done["answer"] == text
    assert done["finish_reason"] in ("stop", "length")
    assert set(done["timings"]) == TIMING_KEYS


def test_nothing_similar_enough_is_not_found(rag_server: TinyServer) -> None:
    for stream in (False, True):
        response = query(rag_server, question="capital of Peru", min_similarity=1.0, stream=stream)
        assert response.status_code == 200
        if stream:
            events = sse(response)
            assert [name for name, _ in events] == ["sources", "delta", "done"]
            assert events[0][1]["citations"] == []
            assert events[-1][1]["finish_reason"] == "not_found"
        else:
            body = response.json()
            assert body["answer"] == NOT_FOUND_ANSWER and body["finish_reason"] == "not_found"
            assert body["citations"] == [] and body["timings"]["num_prompt_tokens"] == 0


def docs_root(server: TinyServer) -> Path:
    assert server.services.index_path is not None
    return (server.services.index_path.parent / "docs").resolve()


def test_sources_filter_keeps_passages_under_the_prefix(rag_server: TinyServer) -> None:
    folder = str(docs_root(rag_server) / "notes")
    body = query(rag_server, question="Where?", sources=[folder], top_k=10, **ANSWER).json()
    assert body["citations"]
    assert all(c["source"].startswith(folder + "/") for c in body["citations"])
    one = str(docs_root(rag_server) / "telescope.txt")
    body = query(rag_server, question="lens", sources=[one], top_k=10, **ANSWER).json()
    assert {c["source"] for c in body["citations"]} == {one}


def test_keyword_mode_and_top_k(rag_server: TinyServer) -> None:
    body = query(
        rag_server, question="telescope lens", mode="keyword", top_k=1, max_tokens=4
    ).json()
    assert len(body["citations"]) == 1
    assert body["citations"][0]["source"].endswith("telescope.txt")


class LastPlaceReranker:
    """Prefers the candidate that fusion ranked last (a stand-in for a cross-encoder)."""

    name = "last-place"
    kind = "cross-encoder"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, query: str, documents: Sequence[str]) -> RerankScores:
        self.calls.append(list(documents))
        return RerankScores([0.0] * (len(documents) - 1) + [1.0], 0)


def test_rerank_picks_from_all_candidates(rag_server: TinyServer) -> None:
    reranker = LastPlaceReranker()
    rag_server.services.reranker = reranker
    try:
        question = {"question": "visitors", "top_k": 1, "mode": "vector", **ANSWER}
        plain = query(rag_server, **question).json()
        assert reranker.calls == [] and plain["timings"]["rerank_s"] == 0
        reranked = query(rag_server, **question, rerank=True).json()
    finally:
        rag_server.services.reranker = None
    [candidates] = reranker.calls
    assert len(candidates) > 1  # every fused candidate was scored, not just the top_k
    assert candidates[0].strip() == plain["citations"][0]["text"]
    assert [c["text"] for c in reranked["citations"]] == [candidates[-1].strip()]
    assert reranked["timings"]["rerank_s"] > 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"question": "   "}, "question"),
        ({"question": "x", "top_k": 0}, "top_k"),
        ({"question": "x", "top_k": 1000}, "top_k"),
        ({"question": "x", "mode": "fuzzy"}, "mode"),
        ({"question": "x", "temperature": -1}, "temperature"),
        ({"question": "x", "max_tokens": 999999}, "max_tokens"),
        ({"question": "x", "rerank": True}, "rerank"),
        ({"question": "x", "topk": 3}, "topk"),
        ({}, "question"),
    ],
)
def test_bad_requests_are_400(rag_server: TinyServer, body: dict, param: str) -> None:
    response = query(rag_server, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_model_is_404(rag_server: TinyServer) -> None:
    response = query(rag_server, question="x", model="nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


class BreakingStream:
    def __init__(self, request: GenerationRequest) -> None:
        self.request_id = request.request_id

    async def _chunks(self) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(self.request_id, "Half", (1,), Usage(3, 0, 1))
        raise GenerationError("the accelerator caught fire")

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._chunks()

    def cancel(self) -> None:
        pass


class BreakingBackend:
    """Starts an answer, then fails: the stream must end in an error event."""

    model_name = "breaking"
    max_model_len = 4096

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def apply_chat_template(self, messages, *, add_generation_prompt=True):  # type: ignore[no-untyped-def]
        return [1, 2, 3]

    def submit(self, request: GenerationRequest) -> BreakingStream:
        return BreakingStream(request)

    def close(self) -> None:
        pass


def test_failure_mid_stream_ends_with_an_error_event(rag_server: TinyServer) -> None:
    services = rag_server.services
    served = services.models
    services.models = StaticModelRegistry([BreakingBackend()])  # type: ignore[list-item]
    try:
        response = query(rag_server, question="When?", stream=True, **ANSWER)
    finally:
        services.models = served
    assert response.status_code == 200
    events = sse(response)
    assert [name for name, _ in events] == ["sources", "delta", "error"]
    error = events[-1][1]["error"]
    assert error["type"] == "server_error" and "caught fire" in error["message"]


def completion_tokens(server: TinyServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    prefix = f'rag_completion_tokens_total{{model="{TINY_MODEL}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_client_leaving_mid_stream_frees_the_engine(rag_server: TinyServer) -> None:
    before = completion_tokens(rag_server)
    body = {"question": "Tell me everything", "stream": True, "min_similarity": -1.0}
    body["max_tokens"] = 1500  # about 4 s of decoding on the tiny model, if nobody stops it
    with httpx.stream("POST", f"{rag_server.base_url}/v1/rag/query", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("event: delta"):
                break  # leave after the first token
    deadline = time.monotonic() + 10
    while rag_server.services.models.load()[TINY_MODEL] != (0, 0):
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.05)
    time.sleep(0.1)  # the metrics are recorded as the stream closes
    assert 0 < completion_tokens(rag_server) - before < 1000


# -- an index the server cannot query ---------------------------------------------------------


def test_missing_empty_and_foreign_indexes_are_409(rag_server: TinyServer, tmp_path: Path) -> None:
    missing = tmp_path / "none" / "index.sqlite3"
    empty = tmp_path / "empty.sqlite3"
    SqliteVecStore.open(empty).close()
    foreign = tmp_path / "foreign.sqlite3"
    with SqliteVecStore.open(foreign) as store:
        run_ingest([docs_root(rag_server)], store, HashingEmbedder)
    services = rag_server.services
    served = services.index_path
    try:
        for index, code, words in [
            (missing, "no_index", "ingest"),
            (empty, "index_empty", "ingest"),
            (foreign, "embedder_mismatch", "hashing-64"),
            (None, "no_index", "no index"),
        ]:
            services.index_path = index  # the routes read it per request
            response = query(rag_server, question="When?")
            assert response.status_code == 409, response.text
            error = response.json()["error"]
            assert error["code"] == code and words in error["message"]
    finally:
        services.index_path = served
    assert not missing.exists()  # a query never creates an index
