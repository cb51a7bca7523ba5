"""One exec's streams between a provider's agent and a consumer, bounded both ways.

Output: the agent may have `window` bytes un-credited (core/lease/flow.py); the relay
credits bytes back only once the consumer's socket took them (or, with no consumer
attached, once they are in the lease's log ring), a quarter window at a time, so the queue
here never holds more than one window and a slow consumer slows the workload. Stdin: the
relay sends at most `window` bytes the agent has not yet written to the workload; `write`
waits for room. Stream bytes go both ways as binary data frames (protocol/lease.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from idlegrid.core.lease.flow import WINDOW, CreditExceeded, Owed, Window, credit_batch
from idlegrid.protocol.lease import STDIN, STREAMS, LeaseFrame, data_frame, frame

LOG_BYTES = 64 * 1024  # the last output of a lease's execs, for `idlegrid lease logs`
STDIN_CHUNK = 256 * 1024

# ("stdout" | "stderr", bytes or a memoryview of the frame) · ("exit", code) · ("error", reason)
Item = tuple[str, Any]
_NAMES = {1: "stdout", 2: "stderr"}


class ExecRelay:
    """The coordinator's end of one exec: queue from the agent, credit back, stdin out."""

    def __init__(
        self,
        lease_id: str,
        node_id: str,
        send: Callable[[dict[str, Any] | bytes], Awaitable[bool]],
        log: bytearray | None,
        window: int = WINDOW,
    ) -> None:
        self.id = "ex_" + secrets.token_hex(8)
        self.lease_id, self.node_id = lease_id, node_id
        self._send = send
        self._log = log  # None: not kept (a forwarded connection's bytes are no log)
        self.window = window
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._queued = 0  # output bytes queued here: at most one window (the agent's credit)
        self.peak_queued = 0  # the most it ever held (tests check the bound holds)
        self.received = 0  # output bytes that arrived (the agent's exit states its count)
        self._owed = Owed(credit_batch(window))
        self._stdin = Window(window)
        self._stdin_room = asyncio.Event()
        self.exit_code: int | None = None
        self.error: str | None = None
        self.done = False
        self.attached = True  # a consumer reads it (detach() drains it into the log)
        self.shell = False  # its stdin is framed for the shell helper (leases/shell.py)
        self._drain: asyncio.Task[None] | None = None

    # ---- from the agent -----------------------------------------------------------------

    def on_data(self, stream: int, framed: memoryview) -> None:
        """Output of this exec from the agent: a data frame from its stream byte on (the
        consumer's frame as it is, protocol/lease.py `read_frame`)."""
        if self.done:
            return
        name = STREAMS.get(stream)
        if name is None:
            self.fail("the agent sent stdin")
            return
        size = len(framed) - 1
        if self._queued + size > self.window:
            self.fail(f"the agent sent past its credit ({self._queued + size} bytes)")
            return
        self._queued += size
        self.received += size
        self.peak_queued = max(self.peak_queued, self._queued)
        self._queue.put_nowait((name, framed))

    def on_agent(self, msg: LeaseFrame) -> None:
        """A control frame of this exec from the agent."""
        if self.done:
            return
        if msg.type == "stdin-credit":
            with contextlib.suppress(CreditExceeded):
                self._stdin = self._stdin.credited(msg.size or 0)
            self._stdin_room.set()
        elif msg.type == "exit":
            if msg.size is not None and msg.size != self.received:
                # Data frames are not signed one by one: the signed exit vouches for them.
                self.fail(f"the agent sent {msg.size} output bytes, {self.received} arrived")
                return
            self.exit_code = msg.code if msg.code is not None else -1
            self.done = True
            self._queue.put_nowait(("exit", self.exit_code))
        elif msg.type == "exec-failed":
            self.fail(msg.reason or "the exec failed on the provider")

    def fail(self, reason: str) -> None:
        """The exec is lost (provider gone, lease ended, protocol broken)."""
        if self.done:
            return
        self.error, self.done = reason, True
        self._queue.put_nowait(("error", reason))
        self._stdin_room.set()

    # ---- to the consumer ----------------------------------------------------------------

    async def next(self) -> Item:
        """The next piece of output (its bytes), or the exit (or error) that ends the stream."""
        kind, data = await self.next_frame()
        if kind in ("stdout", "stderr"):
            return kind, data[1:]
        return kind, data

    def pending(self) -> bool:
        """Whether output (or the end) is already waiting: `next_frame` will not wait."""
        return self._queue.qsize() > 0

    async def next_frame(self) -> Item:
        """As `next`, but output as the consumer's frame (its stream byte, then its bytes),
        passed on from the agent's frame without a copy."""
        item = self._queue.get_nowait() if self._queue.qsize() else await self._queue.get()
        if item[0] in ("stdout", "stderr"):
            self._took(item[1])
        return item

    def _took(self, framed: memoryview) -> None:
        self._queued -= len(framed) - 1
        log = self._log
        if log is None:
            return
        if len(framed) > LOG_BYTES:
            log[:] = framed[-LOG_BYTES:]  # one copy, no shifting
        else:
            log.extend(framed[1:])
            del log[: max(0, len(log) - LOG_BYTES)]

    async def credit(self, n: int) -> None:
        """The consumer took `n` output bytes: the agent may send that many more (credited
        a quarter window at a time)."""
        self._owed, due = self._owed.passed(n)
        if due > 0 and not self.done:
            await self._send(frame("credit", self.lease_id, exec=self.id, bytes=due))

    async def write(self, data: bytes) -> None:
        """Send stdin to the workload, waiting while a window of it is unwritten."""
        while data and not self.done:
            if self._stdin.room == 0:
                self._stdin_room.clear()
                await self._stdin_room.wait()
                continue
            take = min(self._stdin.room, STDIN_CHUNK)
            part, data = data[:take], data[take:]
            self._stdin = self._stdin.sent(len(part))
            await self._send(data_frame(self.id, STDIN, part))

    async def close_stdin(self) -> None:
        """End of input for the workload."""
        if not self.done:
            await self._send(frame("stdin-eof", self.lease_id, exec=self.id))

    async def signal(self, sig: int) -> None:
        """Signal the workload (9 kills it)."""
        if not self.done:
            await self._send(frame("signal", self.lease_id, exec=self.id, signal=sig))

    def detach(self) -> None:
        """The consumer left without killing the exec: it runs on, its output to the log."""
        self.attached = False
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_to_log())

    async def _drain_to_log(self) -> None:
        while True:
            kind, data = await self.next()
            if kind not in ("stdout", "stderr"):
                return
            await self.credit(len(data))
