"""What every route shares: the services, signed node bodies, strict parsing, operator checks.

Routes reach services only through `services(request)`; the composition root (`app.py`)
put them on the app. Nothing here touches the database.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from idlegrid.config import LOOPBACK_NAMES
from idlegrid.coordinator.batches.service import Batches
from idlegrid.coordinator.context import Context
from idlegrid.coordinator.dashboard.data import Dashboard
from idlegrid.coordinator.files.service import Files
from idlegrid.coordinator.inference.service import Inference
from idlegrid.coordinator.leases.service import Leases
from idlegrid.coordinator.market.service import Market
from idlegrid.coordinator.nodes.service import Nodes
from idlegrid.coordinator.supervisor import Supervisor
from idlegrid.coordinator.training.jobs import Jobs
from idlegrid.coordinator.trust.audits import Trust
from idlegrid.coordinator.trust.dispute_shell import DisputeShell
from idlegrid.coordinator.trust.hwproofs import HwProofs
from idlegrid.errors import AuthError, InvalidRequest
from idlegrid.protocol.signing import HEADER_PUBKEY, decode_public_key

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


@dataclass(eq=False)
class Services:
    """The coordinator's services, as the composition root built them."""

    ctx: Context
    nodes: Nodes
    inference: Inference
    market: Market
    trust: Trust
    hwproofs: HwProofs
    jobs: Jobs
    dashboard: Dashboard
    supervisor: Supervisor
    disputes: DisputeShell  # both kinds: trust.disputes (inference), jobs.disputes (training)
    files: Files
    leases: Leases
    batches: Batches

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call in a worker thread."""
        return await self.ctx.db(fn, *args, **kwargs)

    @property
    def settings(self) -> Any:
        """The coordinator's settings."""
        return self.ctx.settings

    @property
    def store(self) -> Any:
        """The coordinator's store (the ledger, nodes, tasks)."""
        return self.ctx.store

    @property
    def metrics(self) -> Any:
        """Prometheus metrics."""
        return self.ctx.metrics

    @property
    def changes(self) -> Any:
        """The change feed the dashboard watches."""
        return self.ctx.changes

    def clock(self) -> float:
        """The grid's clock."""
        return self.ctx.clock()


def services(request: Request) -> Services:
    """The services the composition root put on the app."""
    svc: Services = request.app.state.services
    return svc


def parse(model: type[M], body: bytes) -> M:
    """Validate a JSON body; the first error becomes a 400 naming its field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param=param) from exc


async def signed(request: Request, *, registering: bool = False) -> tuple[str, bytes]:
    """The node that signed this request, and the raw body it signed."""
    body = await request.body()
    key = None
    if registering:
        header = request.headers.get(HEADER_PUBKEY)
        if not header:
            raise AuthError("registration must carry the node's public key")
        key = decode_public_key(header)
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    node_id = await services(request).nodes.authenticate_node(
        request.method, path, body, request.headers, key
    )
    return node_id, body


def from_loopback(request: Request) -> bool:
    """Whether the caller connects from this machine, directly: by a loopback address and
    a loopback Host, and through no proxy that says it forwarded the request."""
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
    name = (request.url.hostname or "").strip("[]")
    forwarded = any(h in request.headers for h in ("forwarded", "x-forwarded-for", "x-real-ip"))
    return loopback and name in LOOPBACK_NAMES and not forwarded


def is_operator(request: Request) -> bool:
    """Whether the request carries the operator key."""
    configured = services(request).settings.ensure_operator_key()
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {configured}".encode())


def require_operator(request: Request) -> None:
    """Operator routes need the operator key; the coordinator always has one."""
    if not is_operator(request):
        raise AuthError(
            "operator key required (the coordinator's data dir holds it in operator-key)"
        )
