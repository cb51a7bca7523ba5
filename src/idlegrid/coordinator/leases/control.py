"""The consumer's side of an exec WebSocket once the command started: one writer for the
socket, and the reader of the consumer's frames (core/lease/consumer_frames.py says what
they may be). A frame it cannot take is answered with a non-fatal error frame naming the
field at fault, and the command and the stream go on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import WebSocket

from idlegrid.coordinator.leases import shell
from idlegrid.coordinator.leases.relay import ExecRelay
from idlegrid.core.lease.consumer_frames import Eof, Refused, Resize, Signal, Stdin, parse_control


class Writer:
    """The socket's only writer: output from the sending loop and refusals from the reader
    share one lock, so their frames never interleave. No buffer: a reader whose refusal
    waits for the socket stops reading the consumer, as a stdin write waiting for room does."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._lock = asyncio.Lock()

    async def data(self, framed: Any) -> None:
        """A binary frame (the consumer's stream byte, then the bytes)."""
        async with self._lock:
            await self._ws.send({"type": "websocket.send", "bytes": framed})

    async def json(self, msg: dict[str, Any]) -> None:
        """A text control frame."""
        async with self._lock:
            await self._ws.send_text(json.dumps(msg))


async def read_consumer(ws: WebSocket, relay: ExecRelay, stdin: bool, out: Writer) -> bool:
    """Client frames until it closes; True when it disconnected (not a clean end)."""
    open_ = stdin
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return True
        raw = message.get("bytes")
        frame = raw if raw is not None else message.get("text") or ""
        ctl = parse_control(frame, stdin=open_, shell=relay.shell, opened=stdin)
        if isinstance(ctl, Stdin):
            # Waits for room: the client's socket backs up.
            await relay.write(shell.data(ctl.data) if relay.shell else ctl.data)
        elif isinstance(ctl, Eof):
            open_ = False
            await relay.close_stdin()
        elif isinstance(ctl, Signal):
            await relay.signal(ctl.signal)
        elif isinstance(ctl, Resize):
            await relay.write(shell.resize(ctl.rows, ctl.cols))
        elif isinstance(ctl, Refused):
            await out.json(ctl.frame())
