"""Signed HTTP calls from an agent to the coordinator's node API (outbound only)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from idlegrid.errors import AuthError, Conflict, IdlegridError, InvalidRequest
from idlegrid.protocol.signing import NodeKey
from idlegrid.tls import client_ssl_context


class CoordinatorError(IdlegridError):
    """The coordinator answered with an unexpected status."""

    code = "coordinator_error"


class NodeClient:
    """Signs every request with the node key; takes any httpx transport (tests: ASGI)."""

    def __init__(
        self,
        base_url: str,
        key: NodeKey,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.clock = clock
        self._base_url = base_url.rstrip("/")
        self._custom_transport = transport is not None
        # IDLEGRID_CA_BUNDLE: a coordinator behind a private CA (idlegrid/tls.py); the
        # channel's wss:// trusts the same bundle.
        self.ssl_context = client_ssl_context()
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            transport=transport,
            verify=self.ssl_context or True,
            timeout=httpx.Timeout(30.0, connect=5.0),
            # Loopback and LAN coordinators must not be routed through a proxy.
            trust_env=False,
        )

    def ws_url(self, path: str) -> str | None:
        """The WebSocket URL of `path`, or None when calls go through a custom transport."""
        if self._custom_transport:
            return None
        return "ws" + self._base_url.removeprefix("http") + path

    async def close(self) -> None:
        """Close connections."""
        await self.http.aclose()

    async def call(
        self, path: str, body: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any] | None:
        """POST a signed JSON body; the decoded answer, or None for 204."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        headers = self.key.sign_headers("POST", path, raw, now=self.clock())
        headers["content-type"] = "application/json"
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=5.0)
        resp = await self.http.post(path, content=raw, headers=headers, **kwargs)
        if resp.status_code == 204:
            return None
        if resp.status_code == 200:
            data: dict[str, Any] = resp.json()
            return data
        try:
            err = resp.json().get("error", {})
        except ValueError:
            err = {}
        message = err.get("message") or resp.text[:200]
        if resp.status_code == 401:
            raise AuthError(message)
        if resp.status_code == 409:
            raise Conflict(message, code=err.get("code"))
        if resp.status_code in (400, 422):
            raise InvalidRequest(message, param=err.get("param"))
        raise CoordinatorError(
            f"{path}: HTTP {resp.status_code}: {message}", status=resp.status_code
        )
