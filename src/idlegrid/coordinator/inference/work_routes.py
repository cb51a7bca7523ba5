"""The work API: agents long-poll for tasks (or hold the channel), upload output, finish or
fail attempts. All signed; the inference service does the work."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket
from pydantic import BaseModel

from idlegrid.coordinator.deps import parse, services, signed
from idlegrid.coordinator.inference import channel as work_channel
from idlegrid.coordinator.schemas import NO_CONTENT, Ok, errors
from idlegrid.coordinator.views import TaskView
from idlegrid.protocol import messages as m


class Finished(BaseModel):
    """POST /tasks/{id}/attempts/{n}/finish."""

    ok: bool
    output_tokens: int


async def _poll_until_disconnect(request: Request, node_id: str, msg: m.PollMsg) -> TaskView | None:
    """Long poll that stops as soon as the agent hangs up (draining, or gone)."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    poll = asyncio.ensure_future(services(request).inference.poll(node_id, msg.models, msg.wait_s))
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


@router.post("/work/poll", response_model=m.TaskMsg, responses={**NO_CONTENT, **errors(400, 401)})
async def poll(request: Request) -> dict[str, Any] | Response:
    """Long poll for one task: 200 with the task, or 204 when none came in time."""
    node_id, body = await signed(request)
    msg = parse(m.PollMsg, body)
    task = await _poll_until_disconnect(request, node_id, msg)
    if task is None:
        return Response(status_code=204)
    return work_channel.task_message(task).model_dump()


@router.websocket("/nodes/channel")
async def channel(ws: WebSocket) -> None:
    """The agent channel: tasks and uploads as signed frames on one WebSocket (see
    coordinator/inference/channel.py); the handshake is signed like a GET of this path."""
    await work_channel.serve(ws, ws.app.state.services)


@router.post(
    "/tasks/{task_id}/attempts/{attempt}/upload",
    response_model=Ok,
    responses=errors(400, 401, 404, 409),
)
async def upload(task_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """Output pieces for the attempt the node holds (409 once it no longer holds it)."""
    node_id, body = await signed(request)
    msg = parse(m.UploadMsg, body)
    await services(request).inference.upload(
        node_id, task_id, attempt, msg.start, list(msg.pieces), msg.logprobs, msg.prompt
    )
    return {"ok": True}


@router.post(
    "/tasks/{task_id}/attempts/{attempt}/finish",
    response_model=Finished,
    responses=errors(400, 401, 404, 409),
)
async def finish(task_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """The node completed the attempt; the request is settled."""
    node_id, body = await signed(request)
    msg = parse(m.FinishMsg, body)
    task = await services(request).inference.finish(
        node_id,
        task_id,
        attempt,
        msg.prompt_tokens,
        msg.finish_reason,
        msg.commitment,
        msg.energy_j,
        msg.energy_estimated,
    )
    return {"ok": True, "output_tokens": task.output_tokens}


@router.post(
    "/tasks/{task_id}/attempts/{attempt}/fail",
    response_model=Ok,
    responses=errors(400, 401, 404, 409),
)
async def fail(task_id: str, attempt: int, request: Request) -> dict[str, Any]:
    """The node cannot finish the attempt: the task moves on (or fails if it is bad input)."""
    node_id, body = await signed(request)
    msg = parse(m.FailMsg, body)
    invalid = msg.reason if msg.kind == "invalid_request" else None
    # "handback" is the outcome reliability counts as blameless (market/store.py, _BLAMELESS).
    outcome = "handback" if msg.kind == "handback" else f"engine error: {msg.reason}"
    await services(request).inference.give_up(
        node_id,
        task_id,
        attempt,
        outcome,
        invalid=invalid,
        commitment=msg.commitment if invalid is None else None,
        invalid_param=msg.param or "prompt",
    )
    return {"ok": True}
