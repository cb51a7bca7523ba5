"""What every request body must be before any route sees it: bounded, and text that is text.

JSON may spell a lone UTF-16 surrogate (`"\\ud800"`); Python decodes it into a `str` that no
UTF-8 encoder, pydantic's JSON serializer included, will write again. Let in, such a string
fails later, far from its sender: a stop sequence once failed the task frame's serialization
and stalled the provider that claimed it. So it is refused here, at the edge, with a 400
naming the field, as is a body over the size limit (413) before it is read to the end.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from idlegrid.coordinator.http_errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def first_bad_text(obj: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) that is not valid Unicode text."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return where or "body"
        elif isinstance(value, dict):
            items = list(value.items())
            for key, item in reversed(items):
                sub = f"{where}.{key}" if where else str(key)
                if not _is_text(key):
                    return where or "body"
                stack.append((item, sub))
        elif isinstance(value, list):
            stack.extend(
                (item, f"{where}.{i}" if where else str(i))
                for i, item in reversed(list(enumerate(value)))
            )
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Routes whose bodies may carry a checkpoint (a training dispute's hand-over included).
LARGE = ("/api/v1/train/", "/api/v1/disputes/")


class BodyGuard:
    """ASGI middleware: 413 past the size bound, 400 for a JSON string that is not text."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        large_bytes: int,
        large_prefix: tuple[str, ...] = LARGE,
        streamed: tuple[str, ...] = (),
    ) -> None:
        self.app, self.small, self.large, self.large_prefix = (
            app,
            max_bytes,
            large_bytes,
            large_prefix,
        )
        # Paths whose routes read their (multipart, not JSON) body as it streams and bound
        # it themselves: buffering a 200 MB upload here would hold it in memory.
        self.streamed = frozenset(streamed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "OPTIONS")
            or scope["path"] in self.streamed
        ):
            await self.app(scope, receive, send)
            return
        limit = self.large if scope["path"].startswith(self.large_prefix) else self.small
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(
                send, 413, f"request body over {limit} bytes", "body_too_large", None
            )
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(
                    send, 413, f"request body over {limit} bytes", "body_too_large", None
                )
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        # A lone surrogate can only enter JSON as a \uD800-\uDFFF escape: bodies without one
        # (nearly all) are not parsed here a second time.
        if _SURROGATE_ESCAPE.search(body) and (
            body[:1] in (b"{", b"[") or b"json" in headers.get(b"content-type", b"")
        ):
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError):
                parsed = None  # the route answers malformed JSON with its own 400
            bad = first_bad_text(parsed) if parsed is not None else None
            if bad is not None:
                await self._refuse(
                    send,
                    400,
                    f"{bad}: not valid Unicode text (a lone UTF-16 surrogate)",
                    "invalid_text",
                    bad,
                )
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, status: int, message: str, code: str, param: str | None) -> None:
        body = json.dumps(error_body(message, "invalid_request_error", code, param)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def guarded_http(header_timeout_s: float) -> type:
    """uvicorn's httptools protocol with a deadline for each request's headers.

    uvicorn times out idle keep-alive connections only after a response: a connection
    that sends nothing, or its headers a byte at a time, is held for ever (200 sockets were
    held 111 s+ in the reliability review). Here each connection must complete its request
    headers within `header_timeout_s` of opening, or of its previous response.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedHttpToolsProtocol
