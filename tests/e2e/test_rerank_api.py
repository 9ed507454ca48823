"""`/v1/rerank`, `/v2/rerank` and `/rerank` with plain httpx on a live server (tiny cross-encoder).

Cohere / Jina requests (`documents`) get `{id, model, results, meta, usage}`; TEI requests
(`texts`) get TEI's bare list. Scores must be the cross-encoder's own, sorted best first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from inference.reranker import CrossEncoder

import httpx
import pytest

from rag.reranking import CrossEncoderReranker
from tests.fixtures.live_server import TinyServer, make_tiny_services, tiny_server_running

QUERY = "what is the capital of france"
DOCUMENTS = [
    "paris is the capital of france",
    "rome",
    "the capital of italy is rome, the capital of france is paris.",
    "retrieval augmented generation",
    "",
]
LONG = "the capital of france is paris and the capital of italy is rome " * 4


@pytest.fixture(scope="module")
def encoder(tiny_cross_encoder_path: Path) -> CrossEncoder:
    return CrossEncoder.load(tiny_cross_encoder_path)


@pytest.fixture(scope="module")
def server(tiny_llama_path: Path, tiny_cross_encoder_path: Path) -> Iterator[TinyServer]:
    services = make_tiny_services(tiny_llama_path)
    services.reranker = CrossEncoderReranker(CrossEncoder.load(tiny_cross_encoder_path))
    with tiny_server_running(services) as running:
        yield running


@pytest.fixture(scope="module")
def expected(encoder: CrossEncoder) -> list[float]:
    return encoder.score(QUERY, DOCUMENTS).scores


def post(server: TinyServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=30)


# --- Cohere / Jina ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_cohere_shape_on_every_path(
    server: TinyServer, expected: list[float], encoder: CrossEncoder, path: str
) -> None:
    response = post(server, path, {"model": encoder.name, "query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == encoder.name and body["id"]
    results = body["results"]
    assert [r["index"] for r in results] == sorted(
        range(len(DOCUMENTS)), key=lambda i: -expected[i]
    )
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=1e-6)
        assert 0 <= r["relevance_score"] <= 1
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}  # return_documents defaults on
    tokens = sum(encoder.score(QUERY, DOCUMENTS).num_tokens)
    assert body["usage"]["total_tokens"] == tokens
    assert body["meta"]["tokens"]["input_tokens"] == tokens
    assert body["meta"]["api_version"]["version"] == ("2" if path.startswith("/v2") else "1")


def test_top_n_and_return_documents(server: TinyServer, expected: list[float]) -> None:
    body = {"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": False}
    results = post(server, "/v1/rerank", body).json()["results"]
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in results] == best
    assert all(set(r) == {"index", "relevance_score"} for r in results)
    body["top_n"] = 99  # more than there are: all of them
    assert len(post(server, "/v1/rerank", body).json()["results"]) == len(DOCUMENTS)


def test_document_objects_and_ignored_fields(server: TinyServer, expected: list[float]) -> None:
    body = {
        "query": QUERY,
        "documents": [{"text": d, "title": "kept aside"} for d in DOCUMENTS],
        "max_chunks_per_doc": 3,
        "rank_fields": ["text"],
    }
    results = post(server, "/v1/rerank", body).json()["results"]
    by_index = {r["index"]: r for r in results}
    assert by_index[1]["document"] == {"text": "rome"}
    assert by_index[0]["relevance_score"] == pytest.approx(expected[0], abs=1e-6)


def test_long_documents_are_cut_not_refused(server: TinyServer, encoder: CrossEncoder) -> None:
    response = post(server, "/v1/rerank", {"query": QUERY, "documents": [LONG]})
    assert response.status_code == 200
    assert response.json()["usage"]["total_tokens"] == encoder.max_tokens


# --- TEI ----------------------------------------------------------------------------------------


def test_tei_shape_is_a_bare_list(server: TinyServer, expected: list[float]) -> None:
    response = post(server, "/rerank", {"query": QUERY, "texts": DOCUMENTS})
    assert response.status_code == 200
    results = response.json()
    assert isinstance(results, list)
    assert [r["index"] for r in results] == sorted(
        range(len(DOCUMENTS)), key=lambda i: -expected[i]
    )
    assert all(set(r) == {"index", "score"} for r in results)
    assert results[0]["score"] == pytest.approx(max(expected), abs=1e-6)


def test_tei_raw_scores_and_return_text(server: TinyServer, encoder: CrossEncoder) -> None:
    body = {"query": QUERY, "texts": DOCUMENTS, "raw_scores": True, "return_text": True}
    results = post(server, "/rerank", body).json()
    raw = encoder.score(QUERY, DOCUMENTS).raw
    for r in results:
        assert r["score"] == pytest.approx(float(raw[r["index"]]), abs=1e-5)  # a logit
        assert r["text"] == DOCUMENTS[r["index"]]
    assert any(r["score"] < 0 for r in results)  # raw logits, not probabilities


# --- metrics and the model list ----------------------------------------------------------------


def test_reranked_documents_are_counted_and_listed(
    server: TinyServer, encoder: CrossEncoder
) -> None:
    def counted() -> float:
        text = httpx.get(f"{server.base_url}/metrics").text
        prefix = f'rag_reranked_documents_total{{model="{encoder.name}"}} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].removeprefix(prefix)) if lines else 0.0

    before = counted()
    post(server, "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert counted() == before + len(DOCUMENTS)
    models = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    rerank = [m for m in models if m["type"] == "rerank"]
    assert len(rerank) == 1 and rerank[0]["id"] == encoder.name
    assert rerank[0]["reranker_kind"] == "cross-encoder"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"query": QUERY, "documents": []}, "documents", "empty"),
        ({"query": QUERY, "texts": []}, "texts", "empty"),
        ({"query": QUERY}, "documents", "exactly one"),
        ({"query": QUERY, "documents": ["a"], "texts": ["a"]}, "documents", "exactly one"),
        ({"query": " ", "documents": ["a"]}, "query", "empty"),
        ({"query": QUERY, "documents": ["a"], "top_n": 0}, "top_n", "at least 1"),
        # param stays None: errors.py drops a body field named "query" from the location.
        ({"documents": ["a"]}, None, "required"),
        ({"query": QUERY, "documents": [{"title": "no text"}]}, None, ""),
    ],
)
def test_bad_requests_are_400(
    server: TinyServer, body: dict, param: str | None, words: str
) -> None:
    response = post(server, "/v1/rerank", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert words in error["message"]


def test_too_many_documents_is_400(server: TinyServer) -> None:
    limit = server.settings.max_rerank_documents
    response = post(server, "/v1/rerank", {"query": QUERY, "documents": ["a"] * (limit + 1)})
    assert response.status_code == 400
    assert f"at most {limit}" in response.json()["error"]["message"]


def test_unknown_model_is_404(server: TinyServer, encoder: CrossEncoder) -> None:
    body = {"model": "rerank-english-v3.0", "query": QUERY, "documents": ["a"]}
    response = post(server, "/v1/rerank", body)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and encoder.name in error["message"]


def test_no_reranker_says_how_to_enable_one(tiny_server: TinyServer) -> None:
    assert tiny_server.services.reranker is None
    response = post(tiny_server, "/v1/rerank", {"query": QUERY, "documents": ["a"]})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "--reranker" in error["message"]
