"""Prometheus metrics, one registry per app so that several apps can live in one process.

Names follow vLLM's `vllm:*` where they mean the same (end-to-end latency, time to first
token, time per output token, requests waiting and running), under `idlegrid_`; the
request histograms carry the model and the provider (node id) that served.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    disable_created_metrics,
    generate_latest,
)

# No `_created` series beside every counter and summary: they doubled the scrape and no
# dashboard reads them (prometheus_client's own switch; process-wide).
disable_created_metrics()  # type: ignore[no-untyped-call]

# vLLM's request-latency buckets (seconds), and its per-output-token ones.
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    """The coordinator's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "idlegrid_requests_total",
            "Inference requests by outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "idlegrid_tokens_total", "Tokens served", ["model", "kind"], registry=r
        )
        self.ttft = Histogram(
            "idlegrid_time_to_first_token_seconds",
            "Gateway time to first token",
            ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.failovers = Counter(
            "idlegrid_failovers_total", "Attempts taken from a provider", ["reason"], registry=r
        )
        self.live_nodes = Gauge("idlegrid_live_nodes", "Providers heard from recently", registry=r)
        self.auth_failures = Counter(
            "idlegrid_node_auth_failures_total", "Refused node requests", ["reason"], registry=r
        )

        self.orders = Counter(
            "idlegrid_orders_total",
            "Market orders by kind and first outcome",
            ["kind", "outcome"],
            registry=r,
        )

        # Buckets per model; per provider only the latency's count and sum (a mean): a
        # bucket series per provider made a scrape at 1,000 providers take 0.8 s and 10 MB
        # (bench/bench_metrics_scrape.py).
        self.e2e = Histogram(
            "idlegrid_e2e_request_latency_seconds",
            "Gateway time from request to last token, per model",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "idlegrid_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per model",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.provider_e2e = Summary(
            "idlegrid_provider_e2e_request_latency_seconds",
            "End-to-end latency of the answers each provider served (count and sum)",
            ["model", "provider"],
            registry=r,
        )
        self.responses = Counter(
            "idlegrid_http_responses_total",
            "HTTP responses by route template, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.waiting = Gauge(
            "idlegrid_requests_waiting", "Requests queued for a provider", registry=r
        )
        self.running = Gauge(
            "idlegrid_requests_running", "Requests a provider is serving", registry=r
        )
        # The process and GC collectors the default registry would have (memory, CPU,
        # open fds, collections), on this app's own registry.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)

    def watch_queue(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        """Read queue depth when scraped rather than keeping it up to date."""
        self.waiting.set_function(waiting)
        self.running.set_function(running)

    def observe_answer(
        self, model: str, provider: str | None, seconds: float, tokens: int, first_s: float | None
    ) -> None:
        """One finished answer: its end-to-end latency, and its time per output token."""
        node = provider or "unknown"
        self.e2e.labels(model).observe(seconds)
        self.provider_e2e.labels(model, node).observe(seconds)
        if first_s is not None and tokens > 1:
            tpot = max(seconds - first_s, 0.0) / (tokens - 1)
            self.tpot.labels(model).observe(tpot)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
