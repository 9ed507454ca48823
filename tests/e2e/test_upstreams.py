"""Scale-out on loopback: an appliance routing generation to two upstreams of our own server.

    openai client -> appliance (RemoteBackend, no local engine) -> upstream A | upstream B
                                                                   (tiny llama each)

Where requests went is read from the upstreams' own /metrics (request counters, prefix cache
hits), as an operator would; the appliance's /metrics shows each upstream's health.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from inference.backend import GenerationRequest
from inference.embedder import Embedder
from inference.engine import EngineConfig
from inference.sampling import SamplingParams
from inference.stopping import StopParams

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.store import SqliteVecStore
from rag.server.app import create_app
from rag.server.loading import LoadOptions, load_services
from rag.server.services import Services
from rag.upstreams.backend import RemoteBackend, make_remote_backend
from rag.upstreams.config import RouterConfig, UpstreamSpec
from tests.fixtures.live_server import TINY_MODEL, make_tiny_services, run_server

# Fast probes and retries, so a test sees an upstream leave and come back within a second.
ROUTER = RouterConfig(
    retry_backoff_s=0.05,
    connect_timeout_s=1.0,
    health_interval_s=0.2,
    probe_backoff_s=0.2,
    probe_backoff_max_s=0.4,
)
# Text the tiny tokenizer knows, so a few hundred characters are a few hundred tokens.
WORDS = "The capital of France is Paris. SQLite stores the index; MLX runs the models. "
COMPLETIONS = "/v1/completions"
IGNORE_EOS = {"ignore_eos": True}
LONG = 800  # tokens of a long answer: far more than the upstream's grace lets it finish


class Upstream:
    """One of our servers on a fixed port, which a test can stop (gracefully) and start again."""

    def __init__(self, services: Services, grace_s: float = 0.25) -> None:
        self.services = services
        self.grace_s = grace_s
        self.app = create_app(services)
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        # A short grace: answers still running after it are cut mid-way (a dying upstream).
        config = uvicorn.Config(
            self.app, log_level="warning", timeout_graceful_shutdown=self.grace_s, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        assert wait_for(lambda: self._server is not None and self._server.started, 30)

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def completions_served(self) -> float:
        return metric(self.url, "rag_requests_total", route=COMPLETIONS, status="200")

    def prefix_cache_hits(self) -> float:
        return metric(self.url, "rag_prefix_cache_hits_total", model=TINY_MODEL)


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@dataclass
class Cluster:
    base_url: str
    upstreams: list[Upstream]
    backend: RemoteBackend
    client: openai.OpenAI

    def served(self) -> list[float]:
        return [u.completions_served() for u in self.upstreams]

    def upstream_up(self, upstream: Upstream) -> float:
        return metric(self.base_url, "rag_upstream_up", upstream=upstream.name)

    def restarts(self, upstream: Upstream) -> float:
        return metric(self.base_url, "rag_upstream_restarts_total", upstream=upstream.name)


def running(upstream: Upstream) -> float:
    """Requests the upstream's engine is generating now."""
    return metric(upstream.url, "rag_generation_requests", model=TINY_MODEL, state="running")


def write_index(root: Path, tiny_bert_path: Path) -> Path:
    docs = root / "docs"
    docs.mkdir(parents=True)
    (docs / "hours.md").write_text("# Hours\n\nThe observatory opens on Friday nights.\n")
    index = root / "index.sqlite3"
    with SqliteVecStore.open(index) as store:
        report = run_ingest([docs], store, lambda: Embedder.load(tiny_bert_path), IngestConfig())
    assert report.ok
    return index


@pytest.fixture(scope="module")
def cluster(
    tiny_llama_path: Path, tiny_bert_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # No SSD tier: both upstreams run in this process and would share one kv-cache folder.
    engine = EngineConfig(max_num_seqs=4, prefix_cache_ssd_bytes=0)
    upstreams = [Upstream(make_tiny_services(tiny_llama_path, engine_config=engine)) for _ in "ab"]
    for upstream in upstreams:
        upstream.start()
    # As `rag serve --upstream URL --upstream-tokenizer ... --embedder ...` loads it; no model
    # named, so the appliance asks the upstreams' /v1/models.
    options = LoadOptions(
        embedder=tiny_bert_path,
        index_path=write_index(tmp_path_factory.mktemp("upstreams"), tiny_bert_path),
        upstreams=tuple(UpstreamSpec(u.url) for u in upstreams),
        router=ROUTER,
        upstream_tokenizer=tiny_llama_path,
    )
    try:
        services = load_services(options)
        backend = services.models.get(None)
        assert isinstance(backend, RemoteBackend)
        try:
            with run_server(create_app(services)) as base_url:
                client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
                yield Cluster(base_url, upstreams, backend, client)
        finally:
            services.close()
    finally:
        for upstream in upstreams:
            upstream.stop()
            upstream.services.close()


def chat(
    cluster: Cluster, system: str, question: str, max_tokens: int = 4
) -> openai.types.chat.ChatCompletion:
    return cluster.client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )


def test_every_generation_route_goes_to_the_upstreams(cluster: Cluster) -> None:
    before = sum(cluster.served())
    models = {m.id: m for m in cluster.client.models.list().data}
    assert models[TINY_MODEL].max_model_len == 2048  # type: ignore[attr-defined]
    reply = chat(cluster, "Be brief.", "Paris?")
    assert reply.model == TINY_MODEL and reply.usage is not None
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    text = cluster.client.completions.create(model=TINY_MODEL, prompt="The capital", max_tokens=3)
    assert text.usage is not None and text.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        cluster.client.completions.create(model=TINY_MODEL, prompt=[5, 99999], max_tokens=3)
    messages = httpx.post(
        f"{cluster.base_url}/v1/messages",
        json={
            "model": TINY_MODEL,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}],
        },
        timeout=30,
    )
    assert messages.status_code == 200, messages.text
    assert messages.json()["usage"]["output_tokens"] == 3
    rag = httpx.post(
        f"{cluster.base_url}/v1/rag/query",
        json={"question": "When does it open?", "min_similarity": -1.0, "max_tokens": 4},
        timeout=30,
    )
    assert rag.status_code == 200, rag.text
    assert rag.json()["citations"]
    assert sum(cluster.served()) == before + 4


def test_a_shared_prefix_stays_on_one_upstream(cluster: Cluster) -> None:
    system = "Affinity test. " + WORDS * 8  # well past the 256 tokens the ring hashes
    served, hits = cluster.served(), [u.prefix_cache_hits() for u in cluster.upstreams]
    replies = [chat(cluster, system, f"Question {i}?") for i in range(8)]
    added = [a - b for a, b in zip(cluster.served(), served, strict=True)]
    assert sorted(added) == [0, 8], added
    target = cluster.upstreams[added.index(8)]
    assert target.prefix_cache_hits() - hits[added.index(8)] >= 7
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies[1:]]  # type: ignore[union-attr]
    assert min(cached) >= 256, cached  # the upstream's cache, reported through the appliance


def test_different_prefixes_spread_and_round_robin_alternates(cluster: Cluster) -> None:
    served = cluster.served()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: chat(cluster, f"Topic {i}. " + WORDS * 5, "Why?"), range(16)))
    added = [a - b for a, b in zip(cluster.served(), served, strict=True)]
    assert sum(added) == 16 and min(added) >= 2, added

    # The benchmark's baseline policy, driven through the backend itself (`for`, as `rag ask`).
    specs = [UpstreamSpec(u.url, TINY_MODEL) for u in cluster.upstreams]
    config = RouterConfig(policy="round_robin")
    backend = make_remote_backend(specs, config, cluster.backend.tokenizer_folder)
    try:
        served = cluster.served()
        prompt = backend.apply_chat_template([{"role": "user", "content": WORDS * 5}])
        for _ in range(4):
            request = GenerationRequest(prompt, SamplingParams(temperature=0), StopParams(2))
            chunks = list(backend.submit(request))
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 2
        added = [a - b for a, b in zip(cluster.served(), served, strict=True)]
        assert added == [2, 2], added
    finally:
        backend.close()


def test_leaving_a_stream_stops_the_upstream(cluster: Cluster) -> None:
    stream = cluster.client.chat.completions.create(
        model=TINY_MODEL,
        messages=[{"role": "user", "content": "Count."}],
        max_tokens=1500,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()

    def upstreams_idle() -> bool:
        running = [
            metric(u.url, "rag_generation_requests", model=TINY_MODEL, state="running")
            for u in cluster.upstreams
        ]
        return sum(running) == 0 and cluster.backend.load().num_running == 0

    assert wait_for(upstreams_idle, 5)


def test_an_upstream_dies_and_rejoins(cluster: Cluster) -> None:
    # A second router that probes once a minute, so only requests can find the dead upstream.
    specs = [UpstreamSpec(u.url, TINY_MODEL) for u in cluster.upstreams]
    unprobed = make_remote_backend(
        specs,
        RouterConfig(health_interval_s=60, retry_backoff_s=0.01),
        cluster.backend.tokenizer_folder,
    )
    # 1. A long stream, and which upstream serves it.
    story = [{"role": "user", "content": "Tell a long story."}]
    stream = cluster.client.chat.completions.create(
        model=TINY_MODEL, messages=story, max_tokens=1800, stream=True, extra_body=IGNORE_EOS
    )
    events = iter(stream)
    for _ in range(5):
        next(events)
    busy = [u for u in cluster.upstreams if running(u)]
    assert len(busy) == 1
    victim = busy[0]
    survivor = next(u for u in cluster.upstreams if u is not victim)
    restarts = cluster.restarts(victim)

    # 2. Two long non-streamed answers with the stream's prompt (so on the victim, by affinity),
    # mid-answer when it dies; short ones over many prefixes before and after.
    def long_chat() -> tuple[int, str | None]:
        reply = cluster.client.chat.completions.create(
            model=TINY_MODEL, messages=story, max_tokens=LONG, extra_body=IGNORE_EOS
        )
        return (reply.usage.completion_tokens if reply.usage else 0), reply.choices[0].finish_reason

    def long_completion() -> tuple[int, str | None]:
        prompt = cluster.backend.apply_chat_template(story)
        reply = cluster.client.completions.create(
            model=TINY_MODEL, prompt=prompt, max_tokens=LONG, extra_body=IGNORE_EOS
        )
        return (reply.usage.completion_tokens if reply.usage else 0), reply.choices[0].finish_reason

    def ask(i: int) -> int:
        reply = chat(cluster, f"Outage {i}. " + WORDS * 4, "Still there?", max_tokens=3)
        return reply.usage.completion_tokens if reply.usage else 0

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        long_ones = [pool.submit(long_chat), pool.submit(long_completion)]
        assert wait_for(lambda: running(victim) == 3, 10)  # the stream and both long answers
        # One batch decodes all three: 20 more stream tokens mean 20 decode steps of each answer.
        for _ in range(20):
            next(events)
        short = [pool.submit(ask, i) for i in range(8)]
        victim.stop()  # refuses new connections at once; answers still running are cut
        short += [pool.submit(ask, i) for i in range(8, 24)]
        assert [r.result() for r in long_ones] == [(LONG, "length")] * 2  # whole, from the survivor
        assert [r.result() for r in short] == [3] * 24  # no non-streamed request failed
    assert cluster.restarts(victim) - restarts >= 2  # both long answers were cut mid-way

    # 3. The stream on the victim ends with an error event, not a silent cut.
    with pytest.raises(openai.APIError, match=r"upstream .* tokens of this answer had been sent"):
        for _ in events:
            pass
    assert cluster.upstream_up(victim) == 0

    # 4. Requests that meet the dead upstream first go to the next one, without a probe's help.
    try:
        for i in range(16):
            prompt = unprobed.apply_chat_template([{"role": "user", "content": f"{i} {WORDS}"}])
            chunks = list(unprobed.submit(GenerationRequest(prompt, stop=StopParams(2))))
            assert chunks[-1].finish_reason == "length"
        stats = {s.name: s for s in unprobed.upstream_stats()}
        assert not stats[victim.name].up and stats[victim.name].num_failures >= 1
        assert stats[survivor.name].num_requests == 16
    finally:
        unprobed.close()

    # 5. Back on the same port: the health probe takes it in, and it gets traffic again.
    victim.start()
    assert wait_for(lambda: cluster.upstream_up(victim) == 1, 5)
    served = victim.completions_served()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: chat(cluster, f"Rejoin {i}. " + WORDS * 4, "Back?"), range(12)))
    assert victim.completions_served() > served
    assert survivor.completions_served() > 0
