"""Every HTTP response: a request id (`x-request-id`, as OpenAI returns), one access-log
line, and a count by route and status.

A caller's own `x-request-id` is kept when it is a short plain token, so a request can be
followed from a proxy or a client through the coordinator to the provider that served it
(the inference gateway hands the id to the task: agent log lines for it carry it). The
route label is the route's template (`/v1/jobs/{job_id}`), never the raw path, so the
metric's cardinality is bounded by the routes, not by the ids in them.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idlegrid import tracing
from idlegrid.coordinator.metrics import Metrics

# The request being served, for log lines and for the task the gateway creates.
from idlegrid.logs import REQUEST_ID

log = logging.getLogger("idlegrid.access")
HEADER = "x-request-id"
_ROUTINE = frozenset({"/api/v1/nodes/heartbeat", "/api/v1/work/poll", "/healthz", "/readyz"})
_ACCEPTED = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def new_request_id(offered: str | None) -> str:
    """The caller's id when it is a short plain token, else a fresh one."""
    if offered and _ACCEPTED.fullmatch(offered):
        return offered
    return "req_" + secrets.token_hex(12)


class RequestIds:
    """ASGI middleware: request id header, access log, responses by route and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request, stamped and counted."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None
        )
        rid = new_request_id(offered)
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)
        began = time.perf_counter()
        status = 500

        async def stamped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (HEADER.encode(), rid.encode()),
                ]
            await send(message)

        try:
            if tracing.enabled() and scope["path"] not in _ROUTINE:
                await self._traced(scope, receive, stamped, rid, lambda: status)
            else:
                await self.app(scope, receive, stamped)
        finally:
            REQUEST_ID.reset(token)
            elapsed = time.perf_counter() - began
            metrics = _metrics(scope)
            if metrics is not None:
                metrics.responses.labels(_route(scope), scope["method"], str(status)).inc()
            # A provider's heartbeats and polls come every few seconds: debug, unless they fail.
            quiet = scope["path"] in _ROUTINE and status < 400
            client, ms = _client(scope), round(elapsed * 1000, 1)
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %s %d %.1fms %s",
                client,
                scope["method"],
                scope["path"],
                status,
                ms,
                rid,
                # Fields of their own in a JSON log line (idlegrid/logs.py).
                extra={
                    "request_id": rid,
                    "client": client,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": ms,
                },
            )

    async def _traced(
        self, scope: Scope, receive: Receive, send: Send, rid: str, status: Callable[[], int]
    ) -> None:
        """Serve inside the request's span: a child of the caller's traceparent, if sent."""
        parent = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"), None
        )
        attributes = {"http.request.method": scope["method"], "idlegrid.request_id": rid}
        with tracing.span(f"{scope['method']} {scope['path']}", attributes, parent) as span:
            try:
                await self.app(scope, receive, send)
            finally:
                route = _route(scope)
                # The template, not the raw path: span names stay few (ids live in attributes).
                span.update_name(f"{scope['method']} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status())
                tracing.mark_failed(span, status() >= 500)


def _metrics(scope: Scope) -> Metrics | None:
    # The services (and their registry) exist once the app's lifespan has started.
    services = getattr(getattr(scope.get("app"), "state", None), "services", None)
    metrics: Metrics | None = getattr(services, "metrics", None)
    return metrics


def _route(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"
