"""Trust API: verifiers long-poll for audits and report recomputations; providers dispute a
failed audit of either kind (one route family); operators read audits and disputes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from idlegrid.coordinator.deps import (
    parse,
    require_operator,
    services,
    signed,
)
from idlegrid.coordinator.schemas import NO_CONTENT, errors
from idlegrid.coordinator.trust import dispute_schemas as ds
from idlegrid.coordinator.trust import schemas as s
from idlegrid.protocol import messages as m
from idlegrid.protocol.disputes import DisputeAnswerMsg, DisputeOpenMsg, DisputeQueryMsg

router = APIRouter(prefix="/api/v1", tags=["trust"])


@router.post(
    "/audits/poll", response_model=m.AuditTaskMsg, responses={**NO_CONTENT, **errors(400, 401)}
)
async def poll_audit(request: Request) -> dict[str, Any] | Response:
    """An audit for this verifier (200), or 204 when none came within a few seconds."""
    node_id, body = await signed(request)
    msg = parse(m.AuditPollMsg, body)
    got = await services(request).trust.poll(node_id, msg.models, wait_s=5.0)
    if got is None:
        return Response(status_code=204)
    return m.AuditTaskMsg.model_validate(got).model_dump()


@router.post(
    "/audits/{audit_id}/report",
    response_model=s.AuditVerdict,
    response_model_exclude_unset=True,
    responses=errors(400, 401, 404, 409),
)
async def report_audit(audit_id: str, request: Request) -> dict[str, Any]:
    """The verifier's recomputation; the coordinator judges it and applies the consequences."""
    node_id, body = await signed(request)
    msg = parse(m.AuditReportMsg, body)
    return await services(request).trust.report(node_id, audit_id, msg.report)


# ---- disputes (both kinds: the one shell, dispute_shell.py) -------------------------------


@router.post("/disputes", response_model=ds.Dispute, responses=errors(400, 401, 404, 409))
async def open_dispute(request: Request) -> dict[str, Any]:
    """A provider contests a failed audit of its own work: `kind` inference (an answer) or
    training (a segment). 400 names a bad `kind`; 404 for an audit that is not the
    caller's; 409 if the audit did not fail, is disputed already, or (training) was judged
    across determinism classes."""
    node_id, body = await signed(request)
    msg = parse(DisputeOpenMsg, body)
    svc = services(request)
    return await svc.db(svc.disputes.open, msg.kind, node_id, msg.audit_id, msg.reason)


@router.post(
    "/disputes/{dispute_id}/query",
    response_model=ds.DisputeQuery,
    response_model_exclude_unset=True,
    responses=errors(400, 401, 404, 409),
)
async def dispute_query(dispute_id: str, request: Request) -> dict[str, Any]:
    """What the current round asks of the calling seat (inference: the position and the
    audited request; training: the phase, step or op index, and the segment)."""
    node_id, body = await signed(request)
    msg = parse(DisputeQueryMsg, body)
    svc = services(request)
    return await svc.db(svc.disputes.query, node_id, dispute_id, msg.round)


@router.post(
    "/disputes/{dispute_id}/answer", response_model=ds.Dispute, responses=errors(400, 401, 404, 409)
)
async def dispute_answer(dispute_id: str, request: Request) -> dict[str, Any]:
    """A seat's answer for the current round (before its deadline)."""
    node_id, body = await signed(request)
    msg = parse(DisputeAnswerMsg, body)
    svc = services(request)
    return await svc.db(svc.disputes.answer, node_id, dispute_id, msg.round, msg.model_dump())


@router.get("/disputes", response_model=ds.DisputeList, responses=errors(400, 401))
async def list_disputes(
    request: Request, node: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """Disputes of both kinds, newest first, with their rounds and rulings (operator only);
    `node` keeps one node's (in any seat), `kind` one kind (400 for another)."""
    require_operator(request)
    svc = services(request)
    return {"disputes": await svc.db(svc.disputes.listing, node, kind)}


# ---- audits and hardware proofs -------------------------------------------------------------


@router.get("/audits", response_model=s.AuditList, responses=errors(401))
async def list_audits(request: Request) -> dict[str, Any]:
    """Every audit and its verdict (operator only)."""
    require_operator(request)
    svc = services(request)
    return {"audits": await svc.db(svc.trust.audits)}


@router.post(
    "/hwproofs/{proof_id}/start", response_model=s.HwStart, responses=errors(401, 404, 409)
)
async def hw_start(proof_id: str, request: Request) -> dict[str, Any]:
    """Reveal a hardware challenge's seed to its node; the coordinator's clock starts."""
    node_id, _ = await signed(request)
    svc = services(request)
    return await svc.db(svc.hwproofs.start, node_id, proof_id)


@router.post(
    "/hwproofs/{proof_id}/commit",
    response_model=s.HwCommit,
    response_model_exclude_unset=True,
    responses=errors(400, 401, 404, 409),
)
async def hw_commit(proof_id: str, request: Request) -> dict[str, Any]:
    """The root of C (clock read; rows to open come back) or the end of a memory fill."""
    node_id, body = await signed(request)
    svc = services(request)
    # The clock reads on arrival: time queued for a database thread is the coordinator's
    # load, not the prover's (under load it failed honest memory proofs).
    at = svc.clock()
    msg = parse(m.HwCommitMsg, body)
    return await svc.db(svc.hwproofs.commit, node_id, proof_id, msg.root, at)


@router.post(
    "/hwproofs/{proof_id}/open",
    response_model=s.HwVerdict,
    response_model_exclude_unset=True,
    responses=errors(400, 401, 404, 409),
)
async def hw_open(proof_id: str, request: Request) -> dict[str, Any]:
    """Opened rows or the chase trace: judged at once, with demotion and slash on failure."""
    node_id, body = await signed(request)
    svc = services(request)
    at = svc.clock()  # on arrival, as in hw_commit
    msg = parse(m.HwOpenMsg, body)
    return await svc.db(svc.hwproofs.open, node_id, proof_id, msg.model_dump(), at)


@router.get("/hwproofs", response_model=s.HwProofList, responses=errors(401))
async def list_hwproofs(request: Request, node: str | None = None) -> dict[str, Any]:
    """Every hardware proof and its verdict (operator only)."""
    require_operator(request)
    svc = services(request)
    return {"proofs": await svc.db(svc.hwproofs.proofs, node)}
