"""Tracing across real processes: `idlegrid coordinator` and `idlegrid provide` (fake
engine), both told only `IDLEGRID_OTEL_ENDPOINT`, send their spans by OTLP/HTTP to a
collector in this test; one completion is one trace, the provider's span the child of the
coordinator's gateway span, in spans from two services."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from idlegrid.client.localgrid import LocalGrid
from idlegrid.testbed.inprocess import free_port


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace endpoint: decodes each export, keeps (service, span) pairs."""

    cond = threading.Condition()
    spans: list[tuple[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = self.rfile.read(int(self.headers["Content-Length"] or 0))
        got = ExportTraceServiceRequest.FromString(body)
        with self.cond:
            for rs in got.resource_spans:
                service = next(
                    a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
                )
                self.spans += [(service, s) for ss in rs.scope_spans for s in ss.spans]
            self.cond.notify_all()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.spans = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _attrs(span: Any) -> dict[str, Any]:
    return {a.key: a.value.string_value or a.value.int_value for a in span.attributes}


def test_one_completion_is_one_trace_across_coordinator_and_provider_processes(
    tmp_path: Path, collector: str
) -> None:
    grid = LocalGrid(
        data_dir=tmp_path,
        port=free_port(),
        providers=1,
        engine="fake",
        model="fake:1",
        provider_args=["--skip-benchmark"],
        # The SDK's own variable: export every 100 ms rather than every 5 s.
        extra_env={"IDLEGRID_OTEL_ENDPOINT": collector, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    grid.start()
    try:
        with openai.OpenAI(base_url=f"{grid.url}/v1", api_key=grid.api_key) as client:
            raw = client.completions.with_raw_response.create(
                model="fake:1", prompt="hi", max_tokens=3
            )
        rid = raw.headers["x-request-id"]

        def both() -> bool:
            names = {(svc, s.name) for svc, s in _Collector.spans}
            return {
                ("idlegrid-coordinator", "POST /v1/completions"),
                ("idlegrid-provider", "idlegrid.provider.serve"),
            } <= names

        with _Collector.cond:
            assert _Collector.cond.wait_for(both, 60), {s.name for _, s in _Collector.spans}
    finally:
        grid.stop()
    (gateway,) = [
        s
        for svc, s in _Collector.spans
        if s.name == "POST /v1/completions" and _attrs(s).get("idlegrid.request_id") == rid
    ]
    served = [s for svc, s in _Collector.spans if s.name == "idlegrid.provider.serve"]
    assert [s.trace_id for s in served] == [gateway.trace_id]
    assert served[0].parent_span_id == gateway.span_id
    assert _attrs(served[0])["idlegrid.request_id"] == rid
    assert _attrs(served[0])["idlegrid.completion_tokens"] == 3
