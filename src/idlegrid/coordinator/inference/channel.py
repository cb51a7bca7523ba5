"""The agent channel: one WebSocket per agent carrying work hand-overs and output uploads.

The HTTP node API does the same with a long poll per task and a request per upload. On
loopback each of those requests costs about 2 ms of both processes' time, and two of them
lie on every request's path to its first token (the poll's answer, the first upload); a
streamed answer makes one more per token. On the channel each is one frame. Every frame an
agent sends is signed like an HTTP request (protocol/signing.py, method "WS"), so a forged,
altered or replayed frame is refused as a request would be, and the connection is closed.
Finish, fail, heartbeats and everything else stay on HTTP; an agent without the channel
(or that loses it) uses the HTTP routes, which behave the same.

Frames from the coordinator (JSON, unsigned like HTTP answers):
`{"op": "task", "slot", "task"}` · `{"op": "idle", "slot"}` (the poll timed out) ·
`{"op": "ack", "task_id", "attempt", "next"}` (the answer to a `sync`: uploads accepted up
to `next`; uploads are not answered one by one) ·
`{"op": "refused", "task_id", "attempt", "code", "message", "expected"}` (an upload or sync
for an attempt that is no longer this agent's, or an upload out of order) ·
`{"op": "yield", "task_id", "attempt"}` (a batch attempt makes room for interactive work:
the agent hands it back with a part commitment) · `{"op": "error", "message"}` before a
close; and lease frames both ways (`{"op": "lease", "v": 3, ...}`, and unsigned binary
data frames of exec streams, whose first byte is `DATA_MARK`: protocol/lease.py), for the
leases domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import Field, TypeAdapter, ValidationError

from idlegrid.coordinator.views import TaskView
from idlegrid.errors import AuthError, Conflict
from idlegrid.protocol import messages as m
from idlegrid.protocol.lease import LEASE_PROTOCOL, BadDataFrame, LeaseFrame, is_data
from idlegrid.protocol.signing import frame_headers

if TYPE_CHECKING:  # the HTTP layer's view of the services; routes build it
    from idlegrid.coordinator.deps import Services

log = logging.getLogger("idlegrid.coordinator.inference.channel")

CHANNEL_PATH = "/api/v1/nodes/channel"
# WebSocket close codes: 1008 policy violation (authentication), 1003 unacceptable data.
CLOSE_AUTH, CLOSE_BAD_FRAME = 1008, 1003

_Frame = TypeAdapter(
    Annotated[
        m.ChannelPollMsg | m.ChannelCancelMsg | m.ChannelUploadMsg | m.ChannelSyncMsg | LeaseFrame,
        Field(discriminator="op"),
    ]
)


def task_message(task: TaskView) -> m.TaskMsg:
    """What a node receives for a claimed task (the same on HTTP and on the channel)."""
    p = task.payload
    return m.TaskMsg(
        task_id=task.id,
        attempt=task.attempt,
        model=task.model_id,
        kind=task.kind,
        prompt=p.get("prompt"),
        messages=p.get("messages"),
        input=p.get("input"),
        max_tokens=p["max_tokens"],
        temperature=p["temperature"],
        top_p=p["top_p"],
        seed=p["seed"],
        stop=p.get("stop") or [],
        prior_ids=task.delivered_ids,
        stream=p.get("stream", True),
        presence_penalty=p.get("presence_penalty", 0.0),
        frequency_penalty=p.get("frequency_penalty", 0.0),
        logit_bias=p.get("logit_bias") or {},
        logprobs=p.get("logprobs"),
        prompt_logprobs=p.get("prompt_logprobs"),
        grammar=p.get("grammar"),
        request_id=p.get("request_id"),
        traceparent=p.get("traceparent"),
    )


class BadFrame(Exception):
    """A frame that is not a channel message; the connection is closed."""


async def serve(ws: WebSocket, svc: Services) -> None:
    """Authenticate the handshake (signed like a GET), then serve frames until it closes."""
    try:
        node_id = await svc.nodes.authenticate_node("GET", CHANNEL_PATH, b"", ws.headers)
    except AuthError:
        # Closing before accepting refuses the handshake (HTTP 403 to the client).
        await ws.close(code=CLOSE_AUTH)
        return
    await ws.accept()
    await _Channel(ws, svc, node_id).run()


class _Channel:
    def __init__(self, ws: WebSocket, svc: Services, node_id: str) -> None:
        self.ws, self.svc, self.node_id = ws, svc, node_id
        self.polls: dict[int, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, obj: dict[str, Any] | bytes) -> None:
        raw = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
        async with self._send_lock:
            await self.ws.send_bytes(raw)

    async def run(self) -> None:
        # One bound method for attach and detach: each `self.send` is a new object, and a
        # detach that compared them by identity never matched (it never detached).
        send = self.send
        # Lease frames (provision, exec streams) reach this agent through this channel.
        self.svc.leases.attach(self.node_id, send)
        self.svc.inference.hub.attach(self.node_id, send)  # batch attempts asked to yield
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("bytes")
                if raw is None:
                    raw = (message.get("text") or "").encode()
                try:
                    if is_data(raw):
                        # Exec stream bytes: not signed one by one (protocol/lease.py says
                        # why); this channel's signed handshake names the agent.
                        self.svc.leases.on_agent_data(self.node_id, raw)
                        continue
                    await self.handle(self.open(raw))
                except AuthError as exc:
                    await self.close(CLOSE_AUTH, exc.message)
                    return
                except (BadFrame, BadDataFrame) as exc:
                    await self.close(CLOSE_BAD_FRAME, str(exc))
                    return
        except WebSocketDisconnect:
            return
        finally:
            self.svc.leases.detach(self.node_id, send)
            self.svc.inference.hub.detach(self.node_id, send, self.svc.inference.clock())
            for poll in self.polls.values():
                poll.cancel()

    def open(self, raw: bytes) -> Any:
        """Verify a frame's signature (as for a request) and parse it."""
        headers, body = frame_headers(self.node_id, raw)
        key = self.svc.nodes.node_key(self.node_id)
        if key is None:
            raise AuthError("unknown node: register first")
        try:
            self.svc.nodes.verifier.verify("WS", CHANNEL_PATH, body, headers, key)
        except AuthError as exc:
            self.svc.metrics.auth_failures.labels(exc.reason.split(" (")[0]).inc()
            raise
        try:
            return _Frame.validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "frame"
            raise BadFrame(f"{where}: {first['msg']}") from exc

    async def handle(self, msg: Any) -> None:
        if isinstance(msg, LeaseFrame):
            if msg.v != LEASE_PROTOCOL:
                raise BadFrame(f"lease frames of version {msg.v} are not understood")
            await self.svc.leases.on_agent_frame(self.node_id, msg)
        elif isinstance(msg, m.ChannelUploadMsg):
            await self.upload(msg)
        elif isinstance(msg, m.ChannelSyncMsg):
            await self.sync(msg)
        elif isinstance(msg, m.ChannelPollMsg):
            old = self.polls.pop(msg.slot, None)
            if old is not None:
                old.cancel()
            self.polls[msg.slot] = asyncio.create_task(self.poll(msg))
        else:
            poll = self.polls.pop(msg.slot, None)
            if poll is not None:
                poll.cancel()

    async def upload(self, msg: m.ChannelUploadMsg) -> None:
        try:
            await self.svc.inference.upload(
                self.node_id, msg.task_id, msg.attempt, msg.start, list(msg.pieces), msg.logprobs
            )
        except Conflict as exc:
            await self.refuse(msg.task_id, msg.attempt, exc)

    async def sync(self, msg: m.ChannelSyncMsg) -> None:
        # Frames are handled in order, so every upload sent before this one is counted.
        try:
            accepted = self.svc.inference.accepted(self.node_id, msg.task_id, msg.attempt)
        except Conflict as exc:
            await self.refuse(msg.task_id, msg.attempt, exc)
            return
        await self.send(
            {"op": "ack", "task_id": msg.task_id, "attempt": msg.attempt, "next": accepted}
        )

    async def refuse(self, task_id: str, attempt: int, exc: Conflict) -> None:
        await self.send(
            {
                "op": "refused",
                "task_id": task_id,
                "attempt": attempt,
                "code": exc.code,
                "message": exc.message,
                "expected": exc.data.get("expected"),
            }
        )

    async def poll(self, msg: m.ChannelPollMsg) -> None:
        try:
            task = await self.svc.inference.poll(self.node_id, msg.models, msg.wait_s)
        except AuthError as exc:  # ejected while connected
            await self.close(CLOSE_AUTH, exc.message)
            return
        if self.polls.get(msg.slot) is asyncio.current_task():
            del self.polls[msg.slot]
        if task is None:
            with contextlib.suppress(Exception):
                await self.send({"op": "idle", "slot": msg.slot})
            return
        try:
            body = task_message(task).model_dump_json()
        except Exception as exc:  # a task frame that cannot be written fails that task only
            log.error("task %s cannot be sent to %s: %s", task.id, self.node_id, exc)
            with contextlib.suppress(Conflict):
                await self.svc.inference.give_up(
                    self.node_id,
                    task.id,
                    task.attempt,
                    "unsendable",
                    invalid=f"the request cannot be encoded: {exc}",
                )
            with contextlib.suppress(Exception):
                await self.send({"op": "idle", "slot": msg.slot})
            return
        try:
            async with self._send_lock:
                await self.ws.send_bytes(
                    f'{{"op":"task","slot":{msg.slot},"task":{body}}}'.encode()
                )
        except Exception:
            # The agent is gone: hand the task on now rather than after the stall timeout.
            log.warning("channel to %s lost while handing over %s", self.node_id, task.id)
            with contextlib.suppress(Conflict):
                await self.svc.inference.give_up(
                    self.node_id, task.id, task.attempt, "hand-over missed"
                )

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.send({"op": "error", "message": reason})
            await self.ws.close(code=code, reason=reason[:120])
