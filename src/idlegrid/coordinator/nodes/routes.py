"""Node API v1: agents register and heartbeat (signed). Work itself: inference/work_routes.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from idlegrid.coordinator.deps import (
    parse,
    services,
    signed,
)
from idlegrid.coordinator.nodes import schemas as s
from idlegrid.coordinator.schemas import errors
from idlegrid.protocol import messages as m
from idlegrid.protocol.signing import HEADER_PUBKEY, decode_public_key

router = APIRouter(prefix="/api/v1", tags=["nodes"])


@router.post("/nodes/register", response_model=s.Registered, responses=errors(400, 401, 409))
async def register(request: Request) -> dict[str, Any]:
    """Register or re-register a node (hardware, engine, measured speed, offers)."""
    node_id, body = await signed(request, registering=True)
    msg = parse(m.RegisterMsg, body)
    key = decode_public_key(request.headers[HEADER_PUBKEY])
    address = request.client.host if request.client else ""  # who audits whom: trust.md
    return await services(request).nodes.register(node_id, key, msg.model_dump(), address)


@router.post("/nodes/heartbeat", response_model=s.HeartbeatAnswer, responses=errors(400, 401))
async def heartbeat(request: Request) -> dict[str, Any]:
    """A node is alive; `state: draining` stops new work reaching it."""
    node_id, body = await signed(request)
    msg = parse(m.HeartbeatMsg, body)
    power = msg.power.model_dump() if msg.power is not None else None
    svc = services(request)
    pending = await svc.nodes.heartbeat(node_id, msg.state, power)
    disputes = await svc.db(svc.disputes.pending, node_id) if svc.disputes.active else []
    if svc.market.stale:  # a slash since the last read: the agent tops up from this
        await svc.db(svc.market.current_book)
    stakes = svc.market.stakes.get(node_id, {})
    return {"ok": True, "hwproofs": pending, "disputes": disputes, "stakes": stakes}
