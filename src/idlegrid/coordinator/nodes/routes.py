"""Node API v1: agents register, heartbeat, long-poll for work and report output. All signed."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response, WebSocket
from pydantic import BaseModel, ValidationError

from idlegrid.coordinator.db.store import TaskView
from idlegrid.coordinator.inference import channel as work_channel
from idlegrid.coordinator.inference.service import Grid
from idlegrid.coordinator.nodes import schemas as s
from idlegrid.coordinator.schemas import NO_CONTENT, Ok, errors
from idlegrid.errors import AuthError, InvalidRequest
from idlegrid.protocol import messages as m
from idlegrid.protocol.signing import HEADER_PUBKEY, decode_public_key

M = TypeVar("M", bound=BaseModel)


def _grid(request: Request) -> Grid:
    grid: Grid = request.app.state.grid
    return grid


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{param or 'body'}: {first['msg']}", param=param) from exc


async def _signed(request: Request, *, registering: bool = False) -> tuple[str, bytes]:
    body = await request.body()
    key = None
    if registering:
        header = request.headers.get(HEADER_PUBKEY)
        if not header:
            raise AuthError("registration must carry the node's public key")
        key = decode_public_key(header)
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    node_id = await _grid(request).authenticate_node(request.method, path, body, request.headers,
                                                     key)
    return node_id, body


async def _poll_until_disconnect(request: Request, node_id: str, msg: m.PollMsg) -> TaskView | None:
    """Long poll that stops as soon as the agent hangs up (draining, or gone)."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    poll = asyncio.ensure_future(_grid(request).poll(node_id, msg.models, msg.wait_s))
    watch = asyncio.ensure_future(hung_up())
    await asyncio.wait({poll, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not poll.done():
        # A claim already under way finishes in its thread; the supervisor's stall timeout
        # then returns that task to the queue.
        poll.cancel()
        return None
    return poll.result()


router = APIRouter(prefix="/api/v1", tags=["nodes"])


@router.post("/nodes/register", response_model=s.Registered, responses=errors(400, 401, 409))
async def register(request: Request) -> dict[str, Any]:
    """Register or re-register a node (hardware, engine, measured speed, offers)."""
    node_id, body = await _signed(request, registering=True)
    msg = _parse(m.RegisterMsg, body)
    key = decode_public_key(request.headers[HEADER_PUBKEY])
    return await _grid(request).register(node_id, key, msg.model_dump())


@router.post("/nodes/heartbeat", response_model=s.HeartbeatAnswer, responses=errors(400, 401))
async def heartbeat(request: Request) -> dict[str, Any]:
    """A node is alive; `state: draining` stops new work reaching it."""
    node_id, body = await _signed(request)
    msg = _parse(m.HeartbeatMsg, body)
    power = msg.power.model_dump() if msg.power is not None else None
    grid = _grid(request)
    pending = await grid.heartbeat(node_id, msg.state, power)
    disputes = await grid.db(grid.trust.disputes.pending, node_id) \
        if grid.trust.disputes.active else []
    train = await grid.db(grid.jobs.disputes.pending, node_id) \
        if grid.jobs.disputes.active else []
    return {"ok": True, "hwproofs": pending, "disputes": disputes, "train_disputes": train}


@router.post("/work/poll", response_model=m.TaskMsg,
             responses={**NO_CONTENT, **errors(400, 401)})
async def poll(request: Request) -> dict[str, Any] | Response:
    """Long poll for one task: 200 with the task, or 204 when none came in time."""
    node_id, body = await _signed(request)
    msg = _parse(m.PollMsg, body)
    task = await _poll_until_disconnect(request, node_id, msg)
    if task is None:
        return Response(status_code=204)
    return work_channel.task_message(task).model_dump()


@router.websocket("/nodes/channel")
async def channel(ws: WebSocket) -> None:
    """The agent channel: tasks and uploads as signed frames on one WebSocket (see
    coordinator/inference/channel.py); the handshake is signed like a GET of this path."""
    await work_channel.serve(ws, ws.app.state.grid)


@router.post("/tasks/{task_id}/attempts/{attempt}/upload", response_model=Ok,
             responses=errors(400, 401, 404, 409))
async def upload(task_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """Output pieces for the attempt the node holds (409 once it no longer holds it)."""
    node_id, body = await _signed(request)
    msg = _parse(m.UploadMsg, body)
    await _grid(request).upload(node_id, task_id, attempt, msg.start, list(msg.pieces))
    return {"ok": True}


@router.post("/tasks/{task_id}/attempts/{attempt}/finish", response_model=s.Finished,
             responses=errors(400, 401, 404, 409))
async def finish(task_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """The node completed the attempt; the request is settled."""
    node_id, body = await _signed(request)
    msg = _parse(m.FinishMsg, body)
    task = await _grid(request).finish(node_id, task_id, attempt, msg.prompt_tokens,
                                       msg.finish_reason, msg.commitment, msg.energy_j,
                                       msg.energy_estimated)
    return {"ok": True, "output_tokens": task.output_tokens}


@router.post("/tasks/{task_id}/attempts/{attempt}/fail", response_model=Ok,
             responses=errors(400, 401, 404, 409))
async def fail(task_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """The node cannot finish the attempt: the task moves on (or fails if it is bad input)."""
    node_id, body = await _signed(request)
    msg = _parse(m.FailMsg, body)
    invalid = msg.reason if msg.kind == "invalid_request" else None
    # "handback" is the outcome reliability counts as blameless (market_store._BLAMELESS).
    outcome = "handback" if msg.kind == "handback" else f"engine error: {msg.reason}"
    await _grid(request).give_up(node_id, task_id, attempt, outcome, invalid=invalid,
                                 commitment=msg.commitment if invalid is None else None)
    return {"ok": True}
