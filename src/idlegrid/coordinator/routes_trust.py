"""Trust API: verifiers long-poll for audits and report recomputations; operators read audits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from idlegrid.coordinator.routes_admin import require_operator
from idlegrid.coordinator.routes_nodes import _grid, _parse, _signed
from idlegrid.protocol import messages as m

router = APIRouter(prefix="/api/v1", tags=["trust"])


@router.post("/audits/poll", response_model=None)
async def poll_audit(request: Request) -> dict[str, Any] | Response:
    """An audit for this verifier (200), or 204 when none came within a few seconds."""
    node_id, body = await _signed(request)
    msg = _parse(m.AuditPollMsg, body)
    got = await _grid(request).trust.poll(node_id, msg.models, wait_s=5.0)
    if got is None:
        return Response(status_code=204)
    return m.AuditTaskMsg.model_validate(got).model_dump()


@router.post("/audits/{audit_id}/report")
async def report_audit(audit_id: str, request: Request) -> dict[str, Any]:
    """The verifier's recomputation; the coordinator judges it and applies the consequences."""
    node_id, body = await _signed(request)
    msg = _parse(m.AuditReportMsg, body)
    return await _grid(request).trust.report(node_id, audit_id, msg.report)


@router.get("/audits")
async def list_audits(request: Request) -> dict[str, Any]:
    """Every audit and its verdict (operator only)."""
    require_operator(request)
    grid = _grid(request)
    return {"audits": await grid.db(grid.trust.audits)}
