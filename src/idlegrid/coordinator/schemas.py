"""Response models shared by every domain: the error envelope, `{"ok": true}`, numbers.

Handlers return plain dicts; FastAPI validates them against the route's `response_model`
and serializes what the model lists, so every model names every field its handler returns.
A key a handler sometimes leaves out is a field defaulting to None, and its route sets
`response_model_exclude_unset=True` so that the key stays out rather than appearing as null.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, WithJsonSchema

# A JSON number that keeps its int or float form on the way out (a plain `float` field
# would turn 3 into 3.0).
Number = Annotated[int | float, WithJsonSchema({"type": "number"})]


class ErrorDetail(BaseModel):
    """The OpenAI error object, with idlegrid's typed data."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    data: dict[str, Any] = {}


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer: `{"error": {...}}` (see http_errors.py)."""

    error: ErrorDetail


class Ok(BaseModel):
    """An acknowledgement."""

    ok: bool


_WHY = {
    400: "Malformed request; `error.param` names the field",
    401: "Missing or wrong credentials (API key, node signature or operator key)",
    402: "The balance does not cover the request",
    404: "No such object (or not the caller's)",
    409: "Conflicts with the object's state (or a replayed id)",
    410: "No longer served; `error.data.use` names what replaced it",
    429: "Over the key's rate limit (see Retry-After) or past its spend cap",
    502: "The provider's engine failed",
    503: "No provider can serve it now",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route documents."""
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in statuses}


def event_stream(data: str) -> dict[str, Any]:
    """The `content` of a Server-Sent Events response: each event as a parsed object (the
    OpenAPI convention that schemathesis also checks), its `data` described in words."""
    return {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "event": {"type": "string"},
                    "data": {"type": "string", "description": data},
                },
            }
        }
    }


NO_CONTENT: dict[int | str, dict[str, Any]] = {
    204: {"description": "Nothing arrived within the long poll; ask again"}
}


class Health(BaseModel):
    """GET /healthz."""

    ok: bool
    version: str
    protocol_version: int


class Ready(BaseModel):
    """GET /readyz: 200 when the database answers, 503 with the reason when not."""

    ok: bool
    reason: str | None = None


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": Ready, "description": "The database does not answer"}
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition (`text/plain; version=0.0.4`)"}
}
