"""OpenTelemetry tracing (idlegrid/tracing.py): one completion through a real coordinator
and an in-process agent is one trace, the provider's serving span under the gateway's,
joined by the traceparent the task carries; with tracing off nothing is traced and no
OpenTelemetry SDK is imported."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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
SERVE = "idlegrid.provider.serve"
GATEWAY = "POST /v1/completions"


class _Ends(SpanProcessor):
    """Counts ended spans by name, so the test waits on the spans, not on a clock."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ended: dict[str, int] = {}

    def on_end(self, span: ReadableSpan) -> None:
        with self.cond:
            self.ended[span.name] = self.ended.get(span.name, 0) + 1
            self.cond.notify_all()

    def wait(self, name: str, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.ended.get(name, 0) >= count, 30), self.ended


@contextlib.contextmanager
def _grid(tmp_path: Path, database_url: str, engine: Any = None) -> Iterator[tuple[str, str]]:
    settings = CoordinatorSettings(
        data_dir=tmp_path, database_url=database_url, port=free_port(), heartbeat_interval_s=0.2
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agent = AgentThread(make_agent(coordinator.url, [engine or FakeEngine(MODEL)], "p0"))
    agent.start()
    try:
        wait_for_live(coordinator.url, 1)
        with coordinator.admin(timeout=30) as c:
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "t"},
            ).raise_for_status()
        yield coordinator.url, key["api_key"]
    finally:
        agent.stop()
        coordinator.stop()


@contextlib.contextmanager
def _traced(
    tmp_path: Path, database_url: str, engine: Any = None
) -> Iterator[tuple[str, str, InMemorySpanExporter, _Ends]]:
    exporter, ends = InMemorySpanExporter(), _Ends()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(ends)
    tracing.enable(provider)
    try:
        with _grid(tmp_path, database_url, engine) as (url, key):
            yield url, key, exporter, ends
    finally:
        tracing.disable()
        provider.shutdown()


@pytest.fixture
def traced(
    tmp_path: Path, database_url: str
) -> Iterator[tuple[str, str, InMemorySpanExporter, _Ends]]:
    with _traced(tmp_path, database_url) as grid:
        yield grid


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        chain.append(span)
    return chain


def test_a_completion_is_one_trace_from_gateway_to_provider(
    traced: tuple[str, str, InMemorySpanExporter, _Ends],
) -> None:
    url, api_key, exporter, ends = traced
    with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0) as client:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="a", max_tokens=3)
        answer = raw.parse()
    rid = raw.headers["x-request-id"]
    ends.wait(SERVE, 1)
    ends.wait(GATEWAY, 1)
    spans = exporter.get_finished_spans()
    gateway = [s for s in spans if s.name == GATEWAY]
    served = [s for s in spans if s.name == SERVE]
    assert len(gateway) == 1 and len(served) == 1, [s.name for s in spans]
    g, a = gateway[0], served[0]
    assert g.attributes is not None and a.attributes is not None
    assert g.attributes["idlegrid.request_id"] == rid
    assert g.attributes["http.route"] == "/v1/completions"
    assert g.attributes["http.response.status_code"] == 200
    assert g.attributes["idlegrid.model"] == MODEL
    assert g.parent is None  # the caller sent no traceparent: the gateway starts the trace
    # Joined across the task: same trace, the provider's span below the gateway's.
    assert g.context is not None and a.context is not None
    assert a.context.trace_id == g.context.trace_id
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    assert g in _ancestors(a, by_id)
    routing = [s for s in spans if s.name == "idlegrid.route_and_escrow"]
    assert len(routing) == 1 and routing[0].parent is not None
    assert routing[0].parent.span_id == g.context.span_id
    assert routing[0].attributes is not None
    assert routing[0].attributes["idlegrid.tasks"] == raw.headers["x-idlegrid-tasks"]
    # The provider's side of the same request: its id, and what it served and committed.
    assert a.attributes["idlegrid.request_id"] == rid
    assert a.attributes["idlegrid.task_id"] == raw.headers["x-idlegrid-tasks"]
    assert answer.usage is not None
    assert a.attributes["idlegrid.completion_tokens"] == answer.usage.completion_tokens == 3
    assert a.attributes["idlegrid.prompt_tokens"] == answer.usage.prompt_tokens
    assert a.attributes["idlegrid.finish_reason"] == answer.choices[0].finish_reason
    assert a.start_time is not None and g.start_time is not None and a.start_time >= g.start_time
    # Prefill's end: the first piece went up, inside the serving span.
    (first,) = [e for e in a.events if e.name == "idlegrid.first_token"]
    assert a.end_time is not None and a.start_time <= first.timestamp <= a.end_time


def test_a_callers_traceparent_is_the_gateway_spans_parent_streamed_too(
    traced: tuple[str, str, InMemorySpanExporter, _Ends],
) -> None:
    url, api_key, exporter, ends = traced
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0) as client:
        # Streamed, so the gateway's span must last until the last event is sent.
        stream = client.completions.create(
            model=MODEL,
            prompt="b",
            max_tokens=2,
            stream=True,
            extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )
        assert "".join(c.choices[0].text for c in stream if c.choices)
    ends.wait(SERVE, 1)
    ends.wait(GATEWAY, 1)
    spans = exporter.get_finished_spans()
    for name in (GATEWAY, SERVE):
        (span,) = [s for s in spans if s.name == name]
        assert span.context is not None and span.context.trace_id == int(trace_id, 16)
    (g,) = [s for s in spans if s.name == GATEWAY]
    assert g.parent is not None and g.parent.span_id == int(parent_id, 16)
    (a,) = [s for s in spans if s.name == SERVE]
    assert g.context is not None and g.end_time is not None and a.start_time is not None
    assert a.parent is not None and a.parent.span_id == g.context.span_id
    assert g.end_time >= a.start_time


# A whole grid and a completion in a fresh interpreter, tracing off: then nothing may
# bring in the SDK or an exporter (FastAPI itself imports opentelemetry-api, for its own
# built-in telemetry, so the API alone is no sign of our doing), and the provider's side
# (agent, serving, protocol, tracing) imports no opentelemetry at all.
_OFF = textwrap.dedent(
    """
    import sys
    from idlegrid import tracing
    from idlegrid.agent import agent, serving
    assert not [m for m in sys.modules if m.startswith("opentelemetry")], "agent side"
    assert not tracing.configure_from_env("idlegrid-provider")
    assert not [m for m in sys.modules if m.startswith("opentelemetry")], "configured off"
    import tempfile, openai
    from idlegrid.config import CoordinatorSettings
    from idlegrid.core.ledger import MICRO
    from idlegrid.engines.fake import FakeEngine
    from idlegrid.testbed import inprocess as ip
    with tempfile.TemporaryDirectory() as d:
        c = ip.CoordinatorThread(CoordinatorSettings(data_dir=d, port=ip.free_port()))
        c.start()
        a = ip.AgentThread(ip.make_agent(c.url, [FakeEngine("fake:1")], "p0"))
        a.start()
        ip.wait_for_live(c.url, 1)
        with c.admin(timeout=30) as h:
            key = h.post("/api/v1/admin/keys", json={"name": "t"}).json()
            h.post("/api/v1/admin/mint", json={"key_id": key["key_id"],
                   "amount": MICRO, "reference": "t"}).raise_for_status()
        with openai.OpenAI(base_url=c.url + "/v1", api_key=key["api_key"]) as o:
            o.completions.create(model="fake:1", prompt="a", max_tokens=2)
        a.stop()
        c.stop()
    assert not tracing.enabled()
    sdk = ("opentelemetry.sdk", "opentelemetry.exporter")
    heavy = [m for m in sys.modules if m.startswith(sdk)]
    assert not heavy, heavy
    print("OFF-OK")
    """
)


def test_with_tracing_off_no_opentelemetry_sdk_is_imported(tmp_path: Path) -> None:
    quiet = ("IDLEGRID_OTEL", "IDLEGRID_OTEL_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k not in quiet}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run(
        [sys.executable, "-c", _OFF], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "OFF-OK" in done.stdout, done.stderr[-3000:]


def test_the_environment_switches_tracing_on() -> None:
    assert not tracing.wanted({})
    assert not tracing.wanted({"IDLEGRID_OTEL": "0"})
    assert tracing.wanted({"IDLEGRID_OTEL": "1"})
    assert tracing.wanted({"IDLEGRID_OTEL_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that keeps what it is sent."""

    posts: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = self.rfile.read(int(self.headers["Content-Length"] or 0))
        self.posts.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("variable", ["IDLEGRID_OTEL_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
def test_spans_go_by_otlp_http_to_the_endpoint_set(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.posts = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(variable, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        assert tracing.configure_from_env("idlegrid-test")
        with tracing.span("idlegrid.check", {"idlegrid.request_id": "req_x"}):
            pass
        assert tracing.flush()
    finally:
        tracing.disable()
        server.shutdown()
        server.server_close()
    assert [(path, kind) for path, kind, _ in _Collector.posts] == [
        ("/v1/traces", "application/x-protobuf")
    ]
    body = _Collector.posts[0][2]
    assert b"idlegrid.check" in body and b"req_x" in body and b"idlegrid-test" in body


def test_a_request_the_provider_refuses_says_why_on_its_span(
    traced: tuple[str, str, InMemorySpanExporter, _Ends],
) -> None:
    url, api_key, exporter, ends = traced
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    with client, pytest.raises(openai.BadRequestError) as refused:
        # A token id outside the fake vocabulary: only the engine can tell.
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, logit_bias={"99999999": 5})
    ends.wait(SERVE, 1)
    ends.wait(GATEWAY, 1)
    spans = exporter.get_finished_spans()
    (g,) = [s for s in spans if s.name == GATEWAY]
    (a,) = [s for s in spans if s.name == SERVE]
    assert g.attributes is not None and a.attributes is not None
    assert g.attributes["http.response.status_code"] == refused.value.status_code == 400
    assert str(a.attributes["idlegrid.handed_back"]).startswith("invalid_request: ")
    assert "idlegrid.completion_tokens" not in a.attributes


def test_an_embedding_is_one_trace_too(tmp_path: Path, database_url: str) -> None:
    from idlegrid.engines.minilm import MODEL_ID, MiniLMEngine

    with _traced(tmp_path, database_url, MiniLMEngine(threads=1)) as (url, key, exporter, ends):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
            raw = client.embeddings.with_raw_response.create(model=MODEL_ID, input="a cat")
        ends.wait(SERVE, 1)
        ends.wait("POST /v1/embeddings", 1)
        spans = exporter.get_finished_spans()
    (g,) = [s for s in spans if s.name == "POST /v1/embeddings"]
    (a,) = [s for s in spans if s.name == SERVE]
    assert g.context is not None and a.parent is not None and a.attributes is not None
    assert a.parent.span_id == g.context.span_id
    assert a.attributes["idlegrid.request_id"] == raw.headers["x-request-id"]
