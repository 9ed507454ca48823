"""Embeddings and rerank on a remote server: the appliance embeds queries and reranks over HTTP.

    openai client / httpx -> appliance (no local model at all) -> remote: one of our own servers
                                                                  (tiny llama, tiny BERT,
                                                                   embedding-similarity reranker)

What went remote is read from the remote's own /metrics (inputs embedded, documents reranked).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inference.embedder import Embedder
from inference.engine import EngineConfig

import httpx
import numpy as np
import openai
import pytest

from ingest.config import IngestConfig
from ingest.errors import IngestError
from ingest.pipeline import run_ingest
from ingest.store import SqliteVecStore
from rag.reranking import EmbeddingSimilarityReranker
from rag.server.app import create_app
from rag.server.loading import LoadOptions, load_services
from rag.server.services import Services
from rag.upstreams.config import RouterConfig, UpstreamSpec
from rag.upstreams.embeddings import RemoteEmbedder, connect_embedder
from rag.upstreams.rerank import RemoteReranker
from tests.e2e.test_upstreams import metric
from tests.fixtures.live_server import make_tiny_services, run_server

FAST = RouterConfig(retry_backoff_s=0.05, connect_timeout_s=1.0, health_interval_s=60)
DOCS = {
    "hours.md": "# Hours\n\nThe observatory opens on Friday nights at eight.\n",
    "tickets.md": "# Tickets\n\nTickets cost five euros; children enter for free.\n",
}


@dataclass
class Remote:
    url: str
    embedder: Embedder

    def embedded(self) -> float:
        return metric(self.url, "rag_embedded_inputs_total", model=self.embedder.name)

    def reranked(self) -> float:
        return metric(self.url, "rag_reranked_documents_total")


@pytest.fixture(scope="module")
def remote(tiny_llama_path: Path, tiny_bert_path: Path) -> Iterator[Remote]:
    tiny = make_tiny_services(
        tiny_llama_path, tiny_bert_path, engine_config=EngineConfig(prefix_cache_ssd_bytes=0)
    )
    assert tiny.embedder is not None
    services = Services(
        models=tiny.models,
        embedder=tiny.embedder,
        reranker=EmbeddingSimilarityReranker(tiny.embedder),
    )
    try:
        with run_server(create_app(services)) as url:
            yield Remote(url, Embedder.load(tiny_bert_path))
    finally:
        services.close()


@pytest.fixture(scope="module")
def index(tiny_bert_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote-models")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    path = root / "index.sqlite3"
    with SqliteVecStore.open(path) as store:  # ingested locally, with the same tiny BERT
        assert run_ingest([docs], store, lambda: Embedder.load(tiny_bert_path), IngestConfig()).ok
    return path


@pytest.fixture(scope="module")
def appliance(remote: Remote, index: Path, tiny_llama_path: Path) -> Iterator[str]:
    # As `rag serve --upstream URL --embedder-url URL --reranker-url URL` loads it.
    spec = UpstreamSpec(remote.url)
    options = LoadOptions(
        index_path=index,
        upstreams=(spec,),
        upstream_tokenizer=tiny_llama_path,
        embedder_url=spec,
        reranker_url=spec,
        router=FAST,
    )
    services = load_services(options)
    assert isinstance(services.embedder, RemoteEmbedder)
    assert isinstance(services.reranker, RemoteReranker)
    try:
        with run_server(create_app(services)) as url:
            yield url
    finally:
        services.close()


def test_embeddings_go_to_the_remote(remote: Remote, appliance: str) -> None:
    texts = ["Open on Friday.", "Tickets cost five."]  # the tiny BERT takes 24 tokens
    before = remote.embedded()
    client = openai.OpenAI(base_url=f"{appliance}/v1", api_key="unused", max_retries=0)
    reply = client.embeddings.create(input=texts, model=remote.embedder.name)
    assert remote.embedded() - before == 2
    assert reply.model == remote.embedder.name and reply.usage.prompt_tokens > 0
    local = remote.embedder.embed(texts).vectors
    got = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
    np.testing.assert_allclose(got, local, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match=r"input\[1\] has \d+ tokens") as error:
        client.embeddings.create(input=["short", "Friday nights " * 20], model=reply.model)
    assert error.value.code == "context_length_exceeded"  # the remote's refusal, kept
    models = {m["id"]: m for m in httpx.get(f"{appliance}/v1/models", timeout=10).json()["data"]}
    assert models[remote.embedder.name]["dimensions"] == remote.embedder.dim


def test_rag_query_embeds_and_reranks_remotely(remote: Remote, appliance: str) -> None:
    embedded, reranked = remote.embedded(), remote.reranked()
    reply = httpx.post(
        f"{appliance}/v1/rag/query",
        json={
            "question": "When does the observatory open?",
            "min_similarity": -1.0,
            "max_tokens": 4,
            "rerank": True,
        },
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    citations = reply.json()["citations"]
    assert citations
    assert remote.embedded() - embedded == 1  # the question; the passages come from the index
    assert remote.reranked() - reranked >= len(citations)  # the candidates the prompt took


def test_rerank_goes_to_the_remote(remote: Remote, appliance: str) -> None:
    body = {"query": "opening hours", "documents": list(DOCS.values()), "return_documents": False}
    here = httpx.post(f"{appliance}/v1/rerank", json=body, timeout=30).json()
    there = httpx.post(f"{remote.url}/v1/rerank", json=body, timeout=30).json()
    assert here["model"] == there["model"] == f"{remote.embedder.name}-similarity"
    assert [r["index"] for r in here["results"]] == [r["index"] for r in there["results"]]
    scores = [r["relevance_score"] for r in here["results"]]
    assert scores == pytest.approx([r["relevance_score"] for r in there["results"]])


def test_ingest_through_the_remote_embedder_is_refused_clearly(remote: Remote) -> None:
    embedder = connect_embedder(UpstreamSpec(remote.url), FAST)
    try:
        assert (embedder.name, embedder.dim) == (remote.embedder.name, remote.embedder.dim)
        with pytest.raises(IngestError, match="ingest with the same model locally"):
            embedder.token_spans("Some text to cut into chunks.")
    finally:
        embedder.close()


@pytest.mark.parametrize(
    ("name", "dim_offset", "refusal"), [(None, 1, "dims"), ("other-bert", 0, "other-bert")]
)
def test_an_index_of_another_embedder_is_refused(
    remote: Remote, tmp_path: Path, name: str | None, dim_offset: int, refusal: str
) -> None:
    path = tmp_path / "index.sqlite3"
    with SqliteVecStore.open(path) as store:
        store.bind_embedder(name or remote.embedder.name, remote.embedder.dim + dim_offset)
    options = LoadOptions(index_path=path, embedder_url=UpstreamSpec(remote.url), router=FAST)
    with pytest.raises(ValueError, match=f"was built with embedding model .*{refusal}"):
        load_services(options)
