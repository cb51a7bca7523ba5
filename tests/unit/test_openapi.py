"""/openapi.json documents every response: each operation names its success body."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.app import create_app


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data: Path = tmp_path_factory.mktemp("openapi")
    app = create_app(CoordinatorSettings(data_dir=data, database_url=f"sqlite:///{data / 'c.db'}"))
    spec: dict[str, Any] = app.openapi()  # no lifespan: the schema needs no database
    return spec


def _operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": op
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    }


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _body(
    schema: dict[str, Any], op: dict[str, Any], status: str = "200", media: str = "application/json"
) -> dict[str, Any]:
    return _resolve(schema, op["responses"][status]["content"][media]["schema"])


def test_every_operation_documents_a_success_body(schema: dict[str, Any]) -> None:
    ops = _operations(schema)
    assert len(ops) >= 60
    offenders = []
    for name, op in ops.items():
        ok = {s: r for s, r in op["responses"].items() if s.startswith("2")}
        # 204 (a long poll that timed out) has no body; the 200 beside it must.
        bodies = {s: r.get("content") or {} for s, r in ok.items() if s != "204"}
        if not bodies:
            offenders.append(f"{name}: no 2xx response with a body")
            continue
        for status, content in bodies.items():
            if not content:
                offenders.append(f"{name} {status}: no content type")
            for media, c in content.items():
                s = c.get("schema")
                if media == "application/json" and (
                    not s or (not s.get("$ref") and not s.get("properties"))
                ):
                    offenders.append(f"{name} {status}: untyped JSON body {s}")
    assert offenders == []


def test_error_statuses_use_the_error_envelope(schema: dict[str, Any]) -> None:
    op = _operations(schema)["POST /v1/chat/completions"]
    for status in ("400", "401", "402", "404", "503"):
        body = _body(schema, op, status)
        assert body["required"] == ["error"]
        detail = _resolve(schema, body["properties"]["error"])
        assert {"message", "type"} <= set(detail["required"])


def test_chat_completion_documents_json_and_the_event_stream(schema: dict[str, Any]) -> None:
    op = _operations(schema)["POST /v1/chat/completions"]
    body = _body(schema, op)
    assert set(body["required"]) >= {"id", "object", "created", "model", "choices", "usage"}
    choice = _resolve(schema, body["properties"]["choices"]["items"])
    assert set(choice["required"]) >= {"index", "message", "finish_reason"}
    usage = _resolve(schema, body["properties"]["usage"])
    assert set(usage["required"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert "text/event-stream" in op["responses"]["200"]["content"]
    text = _body(schema, _operations(schema)["POST /v1/completions"])
    assert text["properties"]["object"]["const"] == "text_completion"


def test_order_view_and_long_polls(schema: dict[str, Any]) -> None:
    ops = _operations(schema)
    order = _body(schema, ops["GET /api/v1/orders/{order_id}"])
    assert set(order["required"]) >= {
        "id",
        "kind",
        "state",
        "budget",
        "spent",
        "refunded",
        "placement",
        "reasons",
        "created_at",
        "tokens_done",
    }
    # Submitting answers 201 with the same view.
    assert _body(schema, ops["POST /api/v1/orders"], "201") == order
    for name in (
        "POST /api/v1/work/poll",
        "POST /api/v1/audits/poll",
        "POST /api/v1/train/poll",
        "POST /api/v1/train/audits/poll",
    ):
        assert {"200", "204"} <= set(ops[name]["responses"]), name
    task = _body(schema, ops["POST /api/v1/work/poll"])
    assert {"task_id", "attempt", "model", "max_tokens"} <= set(task["required"])
    assert "text/event-stream" in ops["GET /dashboard/events"]["responses"]["200"]["content"]
    assert "text/plain" in ops["GET /metrics"]["responses"]["200"]["content"]
