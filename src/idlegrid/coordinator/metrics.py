"""Prometheus metrics, one registry per app so that several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
