"""Optional OpenTelemetry tracing across the coordinator and its providers (the `otel`
extra): one trace per consumer request, joined across the process boundary.

Off by default, and then nothing here imports opentelemetry and every call is a check of
one global. `IDLEGRID_OTEL=1`, `IDLEGRID_OTEL_ENDPOINT=http://host:4318` or the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` switch it on for `idlegrid coordinator` and `idlegrid
provide`: spans go by OTLP/HTTP in batches. Tests and embedders hand in their own
`TracerProvider` with `enable()`.

The gateway's span (`observe.RequestIds`) is the request's root, or a child of the
caller's own `traceparent`; the coordinator puts the W3C `traceparent` of that span into
each task (`TaskMsg.traceparent`, as `request_id` travels) and the agent starts its
serving span as its child. Our own provider is kept here, not made global: a global one
would also switch on FastAPI's built-in telemetry (a second span per request, and one
for every heartbeat and poll).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

ON_ENV = "IDLEGRID_OTEL"
ENDPOINT_ENV = "IDLEGRID_OTEL_ENDPOINT"
STANDARD_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
_TRUE = frozenset({"1", "true", "yes", "on"})

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None  # its TracerProvider
_owned = False  # built here from the environment: shut down here


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for tracing (the switch or an endpoint)."""
    env = os.environ if environ is None else environ
    if env.get(ON_ENV, "").strip().lower() in _TRUE:
        return True
    return bool(env.get(ENDPOINT_ENV) or env.get(STANDARD_ENDPOINT_ENV))


def configure_from_env(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Switch tracing on with an OTLP/HTTP exporter when the environment asks; True if on."""
    env = os.environ if environ is None else environ
    if not wanted(env):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            f"tracing was asked for ({ON_ENV}/{ENDPOINT_ENV}) but OpenTelemetry is not "
            "installed: pip install 'idlegrid[otel]'"
        ) from exc
    endpoint = env.get(ENDPOINT_ENV)
    # Without our own endpoint the exporter reads the standard OTEL_* variables itself
    # (OTEL_EXPORTER_OTLP_ENDPOINT, headers, ...), else its default, localhost:4318.
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces" if endpoint else None)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    enable(provider, owned=True)
    return True


def enable(provider: Any, owned: bool = False) -> None:
    """Trace with this TracerProvider (a test's in-memory one; `owned`: shut it down here)."""
    global _tracer, _provider, _owned
    _tracer, _provider, _owned = provider.get_tracer("idlegrid"), provider, owned


def disable() -> None:
    """Stop tracing; a provider built from the environment is shut down (its spans sent)."""
    global _tracer, _provider, _owned
    if _owned and _provider is not None:
        _provider.shutdown()
    _tracer, _provider, _owned = None, None, False


def flush(timeout_s: float = 10.0) -> bool:
    """Export the spans still batched (the SDK also does at exit); True when all went."""
    return _provider is None or bool(_provider.force_flush(int(timeout_s * 1000)))


def enabled() -> bool:
    """Whether spans are being made."""
    return _tracer is not None


@contextlib.contextmanager
def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    parent: str | None = None,
    *,
    root: bool = False,
    drop_on: tuple[type[BaseException], ...] = (),
) -> Iterator[Any]:
    """A span, current inside the block, under `parent` (a traceparent) when given, a new
    trace when `root`, else under the current span; an exception of a `drop_on` type leaving
    the block drops the span unsent. Yields None when tracing is off."""
    tracer = _tracer
    if tracer is None:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.context import Context

    context = Context() if root else None  # an empty context: no parent, a trace of its own
    if parent:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = TraceContextTextMapPropagator().extract({"traceparent": parent})
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    current = tracer.start_span(name, context=context, attributes=clean)
    dropped = False
    try:
        with trace.use_span(current, end_on_exit=False):
            yield current
    except drop_on:
        # The SDK exports a span when it ends: one never ended is dropped, unsent.
        dropped = True
        raise
    finally:
        if not dropped:
            current.end()


def traceparent() -> str | None:
    """The W3C traceparent of the current span, for a task; None when off or outside one."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


def annotate(**attributes: Any) -> None:
    """Set attributes (`idlegrid.` + name; None skipped) on the current span, if tracing."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(f"idlegrid.{key}", value)


def event(name: str, **attributes: Any) -> None:
    """Mark a moment (the first token) on the current span, if tracing."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, attributes)


def mark_failed(current: Any, failed: bool) -> None:
    """Give a span the error status when what it covered failed (a 5xx, a failed task)."""
    if current is None or not failed:
        return
    from opentelemetry.trace import Status, StatusCode

    current.set_status(Status(StatusCode.ERROR))
