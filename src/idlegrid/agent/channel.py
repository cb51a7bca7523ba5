"""The agent's end of the work channel (coordinator/inference/channel.py): one WebSocket for tasks
and uploads, with the HTTP node API as the fallback whenever the channel is down.

Uploads are sent without waiting for an answer (the coordinator only speaks up to refuse
one). Before an attempt's finish or hand-back goes out on HTTP, a `sync` frame asks how
far its uploads were accepted, so that no report overtakes the output it covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from idlegrid.agent.node_client import NodeClient
from idlegrid.errors import Conflict
from idlegrid.protocol.lease import is_data

log = logging.getLogger("idlegrid.agent.channel")

CHANNEL_PATH = "/api/v1/nodes/channel"
POLL_GRACE_S = 10.0  # beyond the poll's own wait, before the agent stops waiting on it


class ChannelClosed(ConnectionError):
    """The channel went down; use HTTP (the agent reconnects in the background)."""


@dataclass
class Uploads:
    """One attempt's uploads in flight on the channel."""

    task_id: str
    attempt: int
    on_refused: Callable[[], None]
    unacked: list[tuple[int, list[Any]]] = field(default_factory=list)
    acked_tokens: int = 0
    refused: Conflict | None = None
    lost: bool = False  # the channel closed with uploads unacknowledged
    synced: bool = True  # no sync is waiting for its answer
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def ack(self, next_index: int) -> None:
        while self.unacked and self.unacked[0][0] + len(self.unacked[0][1]) <= next_index:
            _, pieces = self.unacked.pop(0)
            self.acked_tokens += sum(1 for tid, _ in pieces if tid >= 0)
        self.synced = True
        self.changed.set()

    def refuse(self, exc: Conflict) -> None:
        self.refused = exc
        self.changed.set()
        self.on_refused()


class Channel:
    """A connected channel; `closed` is set once it is down for good (make a new one)."""

    def __init__(self, client: NodeClient) -> None:
        self.client = client
        self.ws: Any = None
        self.closed = asyncio.Event()
        self._polls: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._uploads: dict[tuple[str, int], Uploads] = {}
        self._reader: asyncio.Task[None] | None = None
        # A task that arrives for a slot no longer waiting (it was draining): handed back.
        self.on_orphan: Callable[[dict[str, Any]], object] = lambda task: None
        # Lease frames (provision, end, exec streams: protocol/lease.py) go to the lease host.
        self.on_lease: Callable[[dict[str, Any]], object] = lambda msg: None
        # Their stdin, as binary data frames (protocol/lease.py), goes there too.
        self.on_lease_data: Callable[[bytes], object] = lambda raw: None
        # A batch attempt asked to make room for interactive work: (task id, attempt).
        self.on_yield: Callable[[str, int], object] = lambda task_id, attempt: None
        self.tasks_received = 0
        self.frames_sent = 0
        self.polls_unanswered = 0

    @property
    def open(self) -> bool:
        """Up and usable."""
        return self.ws is not None and not self.closed.is_set()

    async def connect(self, url: str) -> None:
        """Open the WebSocket with a signed handshake (raises on refusal or no route)."""
        import websockets

        headers = self.client.key.sign_headers("GET", CHANNEL_PATH, b"", now=self.client.clock())
        tls: dict[str, Any] = {}
        if url.startswith("wss:") and self.client.ssl_context is not None:
            tls["ssl"] = self.client.ssl_context
        self.ws = await websockets.connect(
            url,
            additional_headers=headers,
            **tls,
            compression=None,
            open_timeout=5,
            max_size=1 << 24,
            ping_interval=20,
        )
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        """Close the connection (outstanding polls and uploads see ChannelClosed)."""
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._down()

    async def _send(self, obj: dict[str, Any]) -> None:
        if not self.open:
            raise ChannelClosed("channel closed")
        body = json.dumps(obj, separators=(",", ":")).encode()
        try:
            await self.ws.send(
                self.client.key.sign_frame(CHANNEL_PATH, body, now=self.client.clock())
            )
        except Exception as exc:  # websockets raises ConnectionClosed subclasses
            self._down()
            raise ChannelClosed(str(exc)) from exc
        self.frames_sent += 1

    async def send_lease(self, msg: dict[str, Any]) -> None:
        """Send a lease frame (signed like every frame); ChannelClosed if the channel is down."""
        await self._send(msg)

    async def send_data(self, raw: bytes) -> None:
        """Send a lease data frame as it is: unsigned, vouched for by this channel's signed
        handshake and the exec's signed exit (protocol/lease.py); ChannelClosed if down."""
        if not self.open:
            raise ChannelClosed("channel closed")
        try:
            await self.ws.send(raw)
        except Exception as exc:  # websockets raises ConnectionClosed subclasses
            self._down()
            raise ChannelClosed(str(exc)) from exc
        self.frames_sent += 1

    async def poll(self, slot: int, models: list[str], wait_s: float) -> dict[str, Any] | None:
        """A task for engine `slot`, or None after `wait_s` with no work.

        The coordinator answers every poll within `wait_s` (a task or `idle`); one that does
        not answer within `wait_s` + POLL_GRACE_S is given up on, so that no lost or
        unwritable frame can stall the slot. A task that still arrives is an orphan and is
        handed back.
        """
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._polls[slot] = fut
        try:
            await self._send({"op": "poll", "slot": slot, "models": models, "wait_s": wait_s})
            try:
                return await asyncio.wait_for(asyncio.shield(fut), wait_s + POLL_GRACE_S)
            except TimeoutError:
                self.polls_unanswered += 1
                log.warning(
                    "poll on slot %d unanswered after %.0f s; polling again",
                    slot,
                    wait_s + POLL_GRACE_S,
                )
                return None
        finally:
            if self._polls.get(slot) is fut:
                del self._polls[slot]

    async def cancel_poll(self, slot: int) -> None:
        """Stop waiting for work on `slot` (a task already on its way becomes an orphan)."""
        self._polls.pop(slot, None)
        with contextlib.suppress(ChannelClosed):
            await self._send({"op": "cancel", "slot": slot})

    def track(self, task_id: str, attempt: int, on_refused: Callable[[], None]) -> Uploads:
        """Start following one attempt's uploads."""
        up = Uploads(task_id, attempt, on_refused)
        self._uploads[(task_id, attempt)] = up
        return up

    def forget(self, up: Uploads) -> None:
        """The attempt is over."""
        self._uploads.pop((up.task_id, up.attempt), None)

    async def sync(self, up: Uploads) -> None:
        """Ask how far the attempt's uploads were accepted (the answer updates `up`)."""
        up.synced = False
        await self._send({"op": "sync", "task_id": up.task_id, "attempt": up.attempt})

    async def upload(
        self, up: Uploads, start: int, pieces: list[Any], logprobs: list[Any] | None = None
    ) -> None:
        """Send pieces (and their logprobs, when asked for) without waiting for an answer."""
        up.unacked.append((start, pieces))
        frame = {
            "op": "upload",
            "task_id": up.task_id,
            "attempt": up.attempt,
            "start": start,
            "pieces": pieces,
        }
        if logprobs is not None:
            frame["logprobs"] = logprobs
        await self._send(frame)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes) and is_data(raw):
                    self.on_lease_data(raw)
                    continue
                self._dispatch(json.loads(raw))
        except Exception as exc:  # closed, or the coordinator sent something unreadable
            if not self.closed.is_set():
                log.info("channel closed: %s", exc)
        finally:
            self._down()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op in ("task", "idle"):
            fut = self._polls.pop(msg["slot"], None)
            if op == "task":
                self.tasks_received += 1
            if fut is not None and not fut.done():
                fut.set_result(msg.get("task"))
            elif op == "task":
                self.on_orphan(msg["task"])
        elif op in ("ack", "refused"):
            up = self._uploads.get((msg["task_id"], msg["attempt"]))
            if up is None:
                return
            if op == "ack":
                up.ack(msg["next"])
            else:
                up.refuse(
                    Conflict(
                        msg.get("message") or "upload refused",
                        code=msg.get("code"),
                        expected=msg.get("expected"),
                    )
                )
        elif op == "lease":
            self.on_lease(msg)
        elif op == "yield":
            self.on_yield(str(msg.get("task_id")), int(msg.get("attempt") or 0))
        elif op == "error":
            log.warning("coordinator closes the channel: %s", msg.get("message"))

    def _down(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        # Whatever ended the reader (a close, an error, the agent's own cancellation), the
        # socket goes with it: a half-open channel would hold the coordinator's end too.
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()
        for fut in self._polls.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("channel closed"))
        self._polls.clear()
        for up in self._uploads.values():
            up.lost = True
            up.changed.set()
