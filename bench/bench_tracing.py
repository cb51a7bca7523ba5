"""What OpenTelemetry tracing costs a request: completion latency with tracing off and on,
same grid, same run, blocks interleaved so drift in the machine's load falls on both.

    PYTHONPATH=src python bench/bench_tracing.py [--requests 200] [--block 20]

An in-process coordinator and agent (FakeEngine, so every millisecond is grid, HTTP and
client) serve streamed completions of 4 tokens to the official `openai` client. On: the spans
(gateway, routing/escrow, provider's serving) go by the production path, a batch span
processor and the OTLP/HTTP exporter, to a loopback collector that answers 200.
"""

from __future__ import annotations

import argparse
import http.server
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from idlegrid import tracing
from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_for_live,
)

MODEL = "fake:1"


class _Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that counts what it is sent and keeps nothing."""

    posts = 0

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        self.rfile.read(int(self.headers["Content-Length"] or 0))
        type(self).posts += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _timed(client: openai.OpenAI, n: int, cpu: list[float]) -> list[float]:
    """Milliseconds per request, to the last event of a streamed answer; the process's CPU
    milliseconds per request (coordinator, agent and client: all of them are here) go to
    `cpu`."""
    out = []
    cpu_began = time.process_time()
    for _ in range(n):
        began = time.perf_counter()
        # Streamed: a non-streamed answer's uploads may wait (agent/serving.py), which
        # splits latencies into two modes ~250 ms apart and hides anything smaller.
        stream = client.completions.create(
            model=MODEL, prompt="hello", max_tokens=4, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices)
        out.append((time.perf_counter() - began) * 1000)
    cpu.append((time.process_time() - cpu_began) * 1000 / n)
    return out


def span_cost_us(provider: TracerProvider, n: int = 500) -> float:
    """Microseconds of tracing work per request, alone: what the gateway, routing and
    serving code add with tracing on (three spans, a traceparent made and read,
    attributes), exported by the same batch processor: the flush is timed too. n × 3 spans
    stay under the processor's queue (2,048), which drops spans beyond it."""
    tracing.enable(provider)
    began = time.perf_counter()
    for _ in range(n):
        with tracing.span("POST /v1/completions", {"idlegrid.request_id": "req_x"}) as g:
            tracing.annotate(model=MODEL, kind="completion", choices=1)
            parent = tracing.traceparent()
            with tracing.span("idlegrid.route_and_escrow", {"idlegrid.model": MODEL}):
                tracing.annotate(tasks="t", route="r")
            g.set_attribute("http.route", "/v1/completions")
        with tracing.span("idlegrid.provider.serve", {"idlegrid.task_id": "t"}, parent):
            tracing.annotate(prompt_tokens=1, completion_tokens=4, finish_reason="length")
    provider.force_flush()
    elapsed = time.perf_counter() - began
    tracing.disable()
    return elapsed / n * 1e6


def main() -> None:
    """Print latency (median, p10, p90) and CPU per request with tracing off and on."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200, help="per mode")
    ap.add_argument("--block", type=int, default=20)
    a = ap.parse_args()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    provider = TracerProvider()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    data = Path(tempfile.mkdtemp(prefix="idlegrid-bench-"))
    # No stake rule and no probation budget (as the integration tests): one unstaked,
    # unaudited provider serves paid requests.
    os.environ.setdefault("IDLEGRID_TRUST_PROBATION_BUDGET_UCR", "-1")
    settings = CoordinatorSettings(data_dir=data, port=free_port(), inference_stake=0)
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agent = AgentThread(make_agent(coordinator.url, [FakeEngine(MODEL)], "p0"))
    agent.start()
    try:
        wait_for_live(coordinator.url, 1)
        with coordinator.admin(timeout=30) as c:
            key = c.post("/api/v1/admin/keys", json={"name": "bench"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 1000 * MICRO, "reference": "b"},
            ).raise_for_status()
        client = openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=key["api_key"])
        _timed(client, a.block, [])  # warm-up, not counted
        off: list[float] = []
        on: list[float] = []
        cpu_off: list[float] = []
        cpu_on: list[float] = []
        while len(off) < a.requests:
            off += _timed(client, a.block, cpu_off)
            tracing.enable(provider)
            on += _timed(client, a.block, cpu_on)
            tracing.disable()
        provider.force_flush()
        alone = span_cost_us(provider)
    finally:
        tracing.disable()
        agent.stop()
        coordinator.stop()
        provider.shutdown()
        sink.shutdown()
    for name, xs, cpu in (("tracing off", off, cpu_off), ("tracing on ", on, cpu_on)):
        p10, *_, p90 = statistics.quantiles(xs, n=10)
        print(
            f"{name}: median {statistics.median(xs):6.2f} ms  p10 {p10:6.2f}  p90 {p90:6.2f}"
            f"  CPU {statistics.median(cpu):5.2f} ms/request  n={len(xs)}"
        )
    delta = statistics.median(on) - statistics.median(off)
    print(f"on - off: {delta:+.2f} ms median; {_Sink.posts} OTLP posts received")
    print(f"tracing's own work: {alone:.0f} µs per request (3 spans, exported)")


if __name__ == "__main__":
    main()
