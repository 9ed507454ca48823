"""Prometheus metrics of one server: requests, tokens, latency, queue depth.

Each app owns its registry (tests start several servers in one process). Routes record through
the small methods here, so metric names live in one file:

    rag_requests_total{route,status}            rag_request_duration_seconds{route}
    rag_prompt_tokens_total{model}              rag_cached_prompt_tokens_total{model}
    rag_completion_tokens_total{model}          rag_time_to_first_token_seconds{model}
    rag_time_per_output_token_seconds{model}    rag_generation_requests{model,state}
    rag_embedded_inputs_total{model}            rag_reranked_documents_total{model}
    rag_prefix_cache_{lookups,hits}_total{model}  rag_prefix_cache_hit_tokens_total{model,tier}
    rag_prefix_cache_{blocks,bytes}{model,tier}   rag_prefix_cache_evictions_total{model,tier}
    rag_decoded_tokens_total{model,lane}          rag_mtp_{cycles,drafted_tokens}_total{model}
    rag_mtp_accepted_drafts_total{model,depth}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Latency buckets from 5 ms to 2 minutes: a TTFT on a long RAG prompt can take seconds on CPU.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

# model name -> (num_waiting, num_running), read at scrape time.
LoadProbe = Callable[[], dict[str, tuple[int, int]]]
# model name -> its prefix cache's stats (inference.prefix_cache.PrefixCacheStats), at scrape time.
CacheProbe = Callable[[], dict[str, Any]]

# model name -> its MTP lane's counters (inference.engine_mtp.LaneTotals), at scrape time.
MTPProbe = Callable[[], dict[str, Any]]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _LoadCollector(Collector):
    def __init__(self, probe: LoadProbe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "rag_generation_requests",
            "Generation requests in the engine: waiting for the batch (queue depth) or running",
            labels=["model", "state"],
        )
        for model, (num_waiting, num_running) in sorted(self.probe().items()):
            gauge.add_metric([model, "waiting"], num_waiting)
            gauge.add_metric([model, "running"], num_running)
        yield gauge


class _PrefixCacheCollector(Collector):
    """The engines' shared-prefix KV cache: hit rate inputs, contents and evictions per tier."""

    def __init__(self, probe: CacheProbe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "rag_prefix_cache_lookups", "Prompts looked up in the prefix cache", labels=["model"]
        )
        hits = CounterMetricFamily(
            "rag_prefix_cache_hits", "Lookups that found at least one block", labels=["model"]
        )
        hit_tokens = CounterMetricFamily(
            "rag_prefix_cache_hit_tokens",
            "Prompt tokens restored from the cache, by tier",
            labels=["model", "tier"],
        )
        blocks = GaugeMetricFamily(
            "rag_prefix_cache_blocks", "Blocks held, by tier", labels=["model", "tier"]
        )
        size = GaugeMetricFamily(
            "rag_prefix_cache_bytes", "Bytes held, by tier", labels=["model", "tier"]
        )
        evictions = CounterMetricFamily(
            "rag_prefix_cache_evictions", "Blocks evicted, by tier", labels=["model", "tier"]
        )
        corrupt = CounterMetricFamily(
            "rag_prefix_cache_corrupt_files", "SSD block files that failed checks", labels=["model"]
        )
        for model, s in sorted(self.probe().items()):
            if not s.enabled:
                continue
            lookups.add_metric([model], s.num_lookups)
            hits.add_metric([model], s.num_hits)
            hit_tokens.add_metric([model, "ram"], s.num_hit_tokens - s.num_ssd_hit_tokens)
            hit_tokens.add_metric([model, "ssd"], s.num_ssd_hit_tokens)
            for tier in ("ram", "ssd"):
                blocks.add_metric([model, tier], getattr(s, f"{tier}_blocks"))
                size.add_metric([model, tier], getattr(s, f"{tier}_bytes"))
                evictions.add_metric([model, tier], getattr(s, f"{tier}_evictions"))
            corrupt.add_metric([model], s.ssd_corrupt)
        yield from (lookups, hits, hit_tokens, blocks, size, evictions, corrupt)


class _MTPCollector(Collector):
    """The engines' speculative lane: which lane decoded the tokens, and how drafts fared."""

    def __init__(self, probe: MTPProbe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "rag_decoded_tokens",
            "Generated tokens by lane: mtp (draft-verify cycles) or batch (one per step)",
            labels=["model", "lane"],
        )
        cycles = CounterMetricFamily(
            "rag_mtp_cycles", "Draft-verify cycles of the MTP lane", labels=["model"]
        )
        drafted = CounterMetricFamily(
            "rag_mtp_drafted_tokens", "Draft tokens verified", labels=["model"]
        )
        accepted = CounterMetricFamily(
            "rag_mtp_accepted_drafts",
            "Cycles whose draft at this depth stood",
            labels=["model", "depth"],
        )
        for model, t in sorted(self.probe().items()):
            tokens.add_metric([model, "mtp"], t.mtp_tokens)
            tokens.add_metric([model, "batch"], t.batch_tokens)
            cycles.add_metric([model], t.num_cycles)
            drafted.add_metric([model], t.num_drafted)
            for depth, count in enumerate(t.accepted_by_depth, start=1):
                accepted.add_metric([model, str(depth)], count)
        yield from (tokens, cycles, drafted, accepted)


class ServerMetrics:
    def __init__(
        self,
        load_probe: LoadProbe | None = None,
        cache_probe: CacheProbe | None = None,
        mtp_probe: MTPProbe | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rag_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "rag_request_duration_seconds",
            "HTTP request duration until the last byte",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("rag_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.cached_tokens = Counter(
            "rag_cached_prompt_tokens",
            "Prompt tokens served from the KV cache",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "rag_completion_tokens", "Generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            "rag_time_to_first_token_seconds",
            "Submit to first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "rag_time_per_output_token_seconds",
            "Decode time per generated token after the first",
            ["model"],
            buckets=_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.embedded_inputs = Counter(
            "rag_embedded_inputs", "Texts embedded", ["model"], registry=r
        )
        self.reranked_documents = Counter(
            "rag_reranked_documents", "Documents scored by the reranker", ["model"], registry=r
        )
        if load_probe is not None:
            r.register(_LoadCollector(load_probe))
        if cache_probe is not None:
            r.register(_PrefixCacheCollector(cache_probe))
        if mtp_probe is not None:
            r.register(_MTPCollector(mtp_probe))

    def observe_request(self, route: str, status: int, duration_s: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(duration_s)

    def observe_generation(
        self,
        model: str,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        decode_s: float | None,
    ) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.cached_tokens.labels(model).inc(cached_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        if decode_s is not None and completion_tokens > 1:
            self.tpot.labels(model).observe(decode_s / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
