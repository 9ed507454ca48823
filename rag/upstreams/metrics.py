"""Per-upstream Prometheus metrics, read from the pools at scrape time.

    rag_upstream_up{model,upstream}                   1 in service, 0 taken out
    rag_upstream_in_flight{model,upstream}            requests streaming from it now
    rag_upstream_requests_total{model,upstream}       attempts sent to it
    rag_upstream_failures_total{model,upstream}       failed attempts and failed health probes
    rag_upstream_restarts_total{model,upstream}       non-streamed requests it failed mid-answer,
                                                      started over on another upstream

Registered on the server's registry by loading.py; kept here so the server's metrics.py needs
no knowledge of upstreams.

Ignores: token counts and latency (the server's own metrics see every backend alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rag.upstreams.pool import UpstreamStats

# model name -> its upstreams' stats
StatsProbe = Callable[[], Mapping[str, Sequence[UpstreamStats]]]


class UpstreamCollector(Collector):
    def __init__(self, probe: StatsProbe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "upstream"]
        up = GaugeMetricFamily("rag_upstream_up", "1: in service; 0: taken out", labels=labels)
        in_flight = GaugeMetricFamily(
            "rag_upstream_in_flight", "Requests streaming from the upstream now", labels=labels
        )
        requests = CounterMetricFamily(
            "rag_upstream_requests", "Attempts sent to the upstream", labels=labels
        )
        failures = CounterMetricFamily(
            "rag_upstream_failures",
            "Attempts the upstream failed, and failed health probes",
            labels=labels,
        )
        restarts = CounterMetricFamily(
            "rag_upstream_restarts",
            "Non-streamed requests the upstream failed mid-answer, started over elsewhere",
            labels=labels,
        )
        for model, stats in sorted(self.probe().items()):
            for s in stats:
                up.add_metric([model, s.name], 1 if s.up else 0)
                in_flight.add_metric([model, s.name], s.in_flight)
                requests.add_metric([model, s.name], s.num_requests)
                failures.add_metric([model, s.name], s.num_failures)
                restarts.add_metric([model, s.name], s.num_restarts)
        yield from (up, in_flight, requests, failures, restarts)
