"""OpenTelemetry tracing of batch lines: each line is a trace of its own, its span names the
batch and the line's custom_id, and the provider's serving span sits under it, joined by
the traceparent the line's task carries (as for an interactive request, test_tracing.py).
A try that found no provider leaves no span."""

from __future__ import annotations

import io
import json
from pathlib import Path

import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from test_tracing import MODEL, SERVE, _traced

from idlegrid import tracing
from idlegrid.errors import NoCapacity
from idlegrid.testbed.inprocess import wait_until

LINE = "idlegrid.batch.line"
ENDED = ("completed", "failed", "expired", "cancelled")


def _jsonl(custom_ids: list[str]) -> bytes:
    return "".join(
        json.dumps(
            {
                "custom_id": cid,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": cid}],
                    "max_tokens": 3,
                },
            }
        )
        + "\n"
        for cid in custom_ids
    ).encode()


def test_each_batch_line_is_a_trace_with_the_providers_span_under_it(
    tmp_path: Path, database_url: str
) -> None:
    ids = ["line-a", "line-b", "line-c"]
    with _traced(tmp_path, database_url) as (url, key, exporter, ends):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as client:
            upload = client.files.create(
                file=("in.jsonl", io.BytesIO(_jsonl(ids))), purpose="batch"
            )
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            wait_until(lambda: client.batches.retrieve(batch.id).status in ENDED, 60, 0.1)
            assert client.batches.retrieve(batch.id).status == "completed"
        ends.wait(LINE, len(ids))
        ends.wait(SERVE, len(ids))
        spans = exporter.get_finished_spans()
    lines = [s for s in spans if s.name == LINE]
    served = [s for s in spans if s.name == SERVE]
    assert len(lines) == len(served) == len(ids), [s.name for s in spans]
    by_custom_id = {}
    for line in lines:
        assert line.attributes is not None and line.context is not None
        assert line.attributes["idlegrid.batch_id"] == batch.id
        assert line.attributes["idlegrid.endpoint"] == "/v1/chat/completions"
        assert line.attributes["idlegrid.model"] == MODEL
        assert line.attributes["idlegrid.status"] == 200
        assert line.parent is None  # a trace of its own, not the POST /v1/batches request's
        by_custom_id[line.attributes["idlegrid.custom_id"]] = line
    assert sorted(by_custom_id) == ids
    assert len({s.context.trace_id for s in lines if s.context is not None}) == len(ids)
    for line in lines:
        assert line.context is not None and line.attributes is not None
        # The provider's span for the line's task: its child, in its trace.
        (mine,) = [s for s in served if s.parent and s.parent.span_id == line.context.span_id]
        assert mine.context is not None and mine.context.trace_id == line.context.trace_id
        assert mine.attributes is not None
        assert mine.attributes["idlegrid.task_id"] == line.attributes["idlegrid.tasks"]
        assert mine.attributes["idlegrid.completion_tokens"] == 3
        # The line's tasks were submitted before any provider served them. (The provider's
        # span may end a little after the line's: it ends once its finish call returns.)
        assert line.start_time is not None and mine.start_time is not None
        assert line.start_time <= mine.start_time


def test_a_dropped_try_leaves_no_span_and_a_failure_is_marked() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        with tracing.span("outer"):
            with (
                pytest.raises(NoCapacity),
                tracing.span(LINE, root=True, drop_on=(NoCapacity,)),
            ):
                raise NoCapacity(MODEL, "no live provider serves it")
            with (
                pytest.raises(ValueError),
                tracing.span("failed", root=True, drop_on=(NoCapacity,)),
            ):
                raise ValueError("a bug")
            with tracing.span("kept", root=True, drop_on=(NoCapacity,)):
                pass
            with tracing.span("child"):
                pass
    finally:
        tracing.disable()
        provider.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["child", "failed", "kept", "outer"]  # the dropped try: not sent
    assert spans["failed"].status.status_code == StatusCode.ERROR
    assert spans["failed"].parent is None and spans["kept"].parent is None
    outer = spans["outer"].context
    assert outer is not None and spans["child"].parent is not None
    assert spans["child"].parent.span_id == outer.span_id  # not root: under the current span
