"""Training jobs: consumers submit and follow them; providers run, commit and hand back
segments; verifiers re-execute audited segments. Node routes are signed like every other."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Body, Request, Response
from fastapi.responses import JSONResponse

from idlegrid.coordinator.deps import (
    parse,
    require_operator,
    services,
    signed,
)
from idlegrid.coordinator.schemas import NO_CONTENT, Ok, errors
from idlegrid.coordinator.training import schemas as s
from idlegrid.core import b64
from idlegrid.errors import InvalidRequest
from idlegrid.protocol import training as tm

router = APIRouter(prefix="/api/v1", tags=["training"])
T = TypeVar("T")


async def _unless_gone(request: Request, work: Awaitable[T]) -> T | None:
    """A long poll that ends as soon as the agent hangs up (drained or gone), so that no
    handler outlives its caller (or the server's shutdown)."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    poll = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(hung_up())
    await asyncio.wait({poll, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not poll.done():
        poll.cancel()  # a claim under way finishes in its thread; the lease then lapses
        return None
    return poll.result()


SPEC_EXAMPLE = {
    "spec": {
        "model": {"arch": "gpt", "vocab": 256, "seq": 32, "layers": 2, "dim": 64, "heads": 4},
        "init_seed": 1,
        "dataset": {"ref": "stdlib:v1", "sha256": "…", "windows": 512},
        "optimizer": {"name": "adamw", "lr": 0.003, "betas": [0.9, 0.95], "weight_decay": 0.0},
        "batch_size": 8,
        "steps": 64,
        "checkpoint_interval": 8,
        "job_seed": 7,
        "determinism_class": None,
        "price_per_step": 1000,
        "stake_required": 1000000,
    }
}
SPEC_BODY = Body(..., examples=[SPEC_EXAMPLE])


async def _key(request: Request) -> str:
    return await services(request).nodes.authenticate_key(request.headers.get("authorization"))


# ---- consumers -----------------------------------------------------------------------------


@router.post(
    "/jobs",
    status_code=201,
    response_class=JSONResponse,
    response_model=s.Job,
    responses=errors(400, 401, 402, 409),
)
async def submit_job(request: Request, body: Any = SPEC_BODY) -> JSONResponse:
    """Submit a training job: its full price is escrowed (400 names a bad field, 402 when
    the balance is short, 409 for a reused `ref`). Nothing is posted on any error."""
    key_id = await _key(request)
    svc = services(request)
    view = await svc.db(svc.jobs.submit, key_id, body)
    svc.jobs.new_work.set()
    return JSONResponse(view, status_code=201)


@router.get("/jobs", response_model=s.JobList, responses=errors(401))
async def list_jobs(request: Request) -> dict[str, Any]:
    """The caller's jobs, newest first."""
    key_id = await _key(request)
    svc = services(request)
    return {"jobs": await svc.db(svc.jobs.jobs, key_id)}


@router.get("/jobs/{job_id}", response_model=s.Job, responses=errors(401, 404))
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    """One job: progress, loss curve, segments, audits, events and payments with causes."""
    key_id = await _key(request)
    svc = services(request)
    return await svc.db(svc.jobs.view, key_id, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=s.Job, responses=errors(401, 404, 409))
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    """Cancel: verified steps stay paid, the rest of the escrow comes back (409 if over)."""
    key_id = await _key(request)
    svc = services(request)
    return await svc.db(svc.jobs.cancel, key_id, job_id)


@router.get("/train/audits", response_model=s.TrainAuditList, responses=errors(401))
async def list_train_audits(request: Request) -> dict[str, Any]:
    """Every training audit and its verdict (operator only)."""
    require_operator(request)
    svc = services(request)
    return {"audits": await svc.db(svc.jobs.audits)}


# ---- providers -----------------------------------------------------------------------------


def check_gang_addr(addr: str, peer: str) -> None:
    """A gang's rendezvous is an IP literal and a port on the node's own address.

    Other ranks connect to whatever rank 0 reports; a name (DNS rebinding) or another
    host's address would point them, and their gloo traffic, at anything.
    """
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
        same = ip == ipaddress.ip_address(peer)
    except ValueError:
        raise InvalidRequest(
            "gang_addr must be IP:port (a literal address)", param="gang_addr"
        ) from None
    if not sep or not port.isdigit() or not 1024 <= int(port) <= 65535:
        raise InvalidRequest("gang_addr needs a port from 1024 to 65535", param="gang_addr")
    if not same:
        raise InvalidRequest(
            f"gang_addr {host} is not the address this node connects from ({peer})",
            param="gang_addr",
        )


@router.post(
    "/train/poll", response_model=tm.TrainWorkMsg, responses={**NO_CONTENT, **errors(400, 401)}
)
async def poll_job(request: Request) -> dict[str, Any] | Response:
    """A job to run from its last committed step (200), or 204 when none came in time."""
    node_id, body = await signed(request)
    msg = parse(tm.TrainPollMsg, body)
    if msg.gang_addr:
        check_gang_addr(msg.gang_addr, request.client.host if request.client else "")
    got = await _unless_gone(
        request, services(request).jobs.poll(node_id, msg.det_class, msg.wait_s, msg.gang_addr)
    )
    if got is None:
        return Response(status_code=204)
    return tm.TrainWorkMsg.model_validate(got).model_dump()


@router.post(
    "/train/jobs/{job_id}/attempts/{attempt}/progress",
    response_model=Ok,
    responses=errors(400, 401, 404, 409),
)
async def job_progress(job_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """Step, loss and tokens/s from the holder (409 once it no longer holds the job)."""
    node_id, body = await signed(request)
    msg = parse(tm.TrainProgressMsg, body)
    svc = services(request)
    await svc.db(svc.jobs.progress, node_id, job_id, attempt, msg.step, msg.loss, msg.tokens_per_s)
    return {"ok": True}


@router.post(
    "/train/jobs/{job_id}/attempts/{attempt}/segments/{index}/commit",
    response_model=s.SegmentCommitted,
    responses=errors(400, 401, 404, 409),
)
async def commit_segment(job_id: str, attempt: int, index: int, request: Request) -> dict[str, Any]:
    """A finished segment's commitment and end checkpoint; the audit draw follows it."""
    node_id, body = await signed(request)
    msg = parse(tm.TrainCommitMsg, body)
    svc = services(request)
    return await svc.db(
        svc.jobs.commit,
        node_id,
        job_id,
        attempt,
        index,
        b64.decode(msg.commitment, "commitment"),
        b64.decode(msg.checkpoint, "checkpoint"),
        msg.det_class,
    )


@router.post(
    "/train/jobs/{job_id}/attempts/{attempt}/release",
    response_model=Ok,
    responses=errors(400, 401, 404, 409),
)
async def release_job(job_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """The holder hands the job back (it resumes elsewhere) or refuses a bad spec."""
    node_id, body = await signed(request)
    msg = parse(tm.TrainReleaseMsg, body)
    svc = services(request)
    return await svc.db(svc.jobs.release, node_id, job_id, attempt, msg.reason, msg.kind)


# ---- verifiers -----------------------------------------------------------------------------


@router.post(
    "/train/audits/poll", response_model=tm.TrainAuditMsg, responses={**NO_CONTENT, **errors(401)}
)
async def poll_train_audit(request: Request) -> dict[str, Any] | Response:
    """A segment to re-execute (200), or 204 when none came within a few seconds."""
    node_id, _ = await signed(request)
    got = await _unless_gone(request, services(request).jobs.poll_audit(node_id, wait_s=5.0))
    if got is None:
        return Response(status_code=204)
    return tm.TrainAuditMsg.model_validate(got).model_dump()


@router.post(
    "/train/audits/{audit_id}/report",
    response_model=s.TrainVerdict,
    responses=errors(400, 401, 404, 409),
)
async def report_train_audit(audit_id: str, request: Request) -> dict[str, Any]:
    """The verifier's recomputed leaves; the coordinator judges and settles."""
    node_id, body = await signed(request)
    msg = parse(tm.TrainAuditReportMsg, body)
    svc = services(request)
    return await svc.db(
        svc.jobs.report,
        node_id,
        audit_id,
        b64.decode(msg.leaves, "leaves"),
        msg.weight_distance,
        msg.det_class,
        msg.checkpoints_match,
    )


@router.post("/train/probes/poll", response_model=s.ProbeList, responses=errors(401))
async def poll_probes(request: Request) -> dict[str, Any]:
    """Checkpoints this provider must produce now (availability probes); may be empty."""
    node_id, _ = await signed(request)
    got = await _unless_gone(request, services(request).jobs.poll_probes(node_id, wait_s=5.0))
    return {"probes": got or []}


@router.post(
    "/train/probes/{probe_id}/answer",
    response_model=s.ProbeAnswered,
    responses=errors(400, 401, 404, 409),
)
async def answer_probe(probe_id: str, request: Request) -> dict[str, Any]:
    """The probed checkpoint; it must hash to the committed state (else: a fault)."""
    node_id, body = await signed(request)
    msg = parse(tm.TrainProbeAnswerMsg, body)
    svc = services(request)
    return await svc.db(
        svc.jobs.answer_probe, node_id, probe_id, b64.decode(msg.checkpoint, "checkpoint")
    )
