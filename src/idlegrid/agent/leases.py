"""The agent's lease host: workspaces made, run and wiped on the coordinator's word.

Lease frames (protocol/lease.py) arrive on the agent channel: `provision` makes a
workspace with the configured runtime (bwrap by default) and the leased limits, then runs
one command in it before answering `provisioned` (a lease is running once its workspace
answered); `end` kills every process and wipes it (`wiped`). `exec` starts a command
whose output is sent, in binary data frames, only as far as the coordinator's credit
allows (core/lease/flow.py): a reader thread per command blocks when the window is full,
so the workload's pipe fills and it waits. The reader hands frames to the event loop
without waiting for each to be sent (one sender task per command keeps their order); the
window bounds what waits there. Repeats are answered again (the coordinator resends after
a reconnect).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from idlegrid.agent.channel import Channel, ChannelClosed
from idlegrid.agent.context import AgentConfig
from idlegrid.agent.workspace import open_runtime
from idlegrid.agent.workspace.base import Execution, Limits, Runtime, Workspace, WorkspaceSpec
from idlegrid.agent.workspace.connection import Connection
from idlegrid.core.lease.controls import LeaseAsk, refusal
from idlegrid.core.lease.flow import WINDOW, Owed, Window, credit_batch
from idlegrid.protocol.lease import (
    LEASE_PROTOCOL,
    STDERR,
    STDIN,
    STDOUT,
    BadDataFrame,
    LeaseFrame,
    LeaseSpecMsg,
    data_frame,
    frame,
    read_data,
)

log = logging.getLogger("idlegrid.agent.leases")
OUT_CHUNK = 256 * 1024  # the most one data frame carries
GIB = float(1 << 30)  # an order's ram_gb and disk_gb are GiB in the workspace (core/lease/spec)


class LeaseHost:
    """This agent's workspaces and the commands running in them."""

    def __init__(self, config: AgentConfig, node_id: str = "") -> None:
        self.config = config
        self.node_id = node_id
        self.runtimes: dict[str, Runtime] = {}  # opened on a lease's first use
        self.workspaces: dict[str, Workspace] = {}
        self.execs: dict[str, _Exec] = {}
        self._provisioning: set[str] = set()
        self._ended: set[str] = set()  # ended while still provisioning
        self._making: set[asyncio.Future[None]] = set()  # provisioning tasks under way
        self.channel: Channel | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self, channel: Channel) -> None:
        """Lease frames of this (new) channel come here; answers go back through it."""
        self.channel = channel
        channel.on_lease = self.on_frame
        channel.on_lease_data = self.on_data

    def on_data(self, raw: bytes) -> None:
        """A data frame from the coordinator: stdin for one of the running commands."""
        try:
            exec_id, stream, data = read_data(raw)
        except BadDataFrame as exc:
            log.warning("unreadable data frame dropped: %s", exc)
            return
        ex = self.execs.get(exec_id)
        if ex is not None and stream == STDIN:
            ex.stdin.put(bytes(data))

    def on_frame(self, raw: dict[str, Any]) -> None:
        """A lease frame from the coordinator (called on the agent's event loop)."""
        self.loop = asyncio.get_running_loop()
        try:
            msg = LeaseFrame.model_validate(raw)
        except ValidationError as exc:
            log.warning("unreadable lease frame dropped: %s", exc.errors()[0])
            return
        if msg.v != LEASE_PROTOCOL:
            log.warning(
                "lease frame of version %s dropped (this agent speaks %s)", msg.v, LEASE_PROTOCOL
            )
            return
        if msg.type == "provision":
            self._making.add(self._spawn(self._provision(msg)))
        elif msg.type == "end":
            self._spawn(self._end(msg.lease))
        elif msg.type == "exec" and msg.exec and msg.exec not in self.execs:
            # Registered now: its stdin and credit frames may arrive before it starts.
            self.execs[msg.exec] = _Exec(self, msg.lease, msg.exec, msg.window or WINDOW)
            self._spawn(self._exec(msg))
        elif (ex := self.execs.get(msg.exec or "")) is not None and ex.lease == msg.lease:
            ex.on_frame(msg)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_failure)
        task.add_done_callback(self._making.discard)
        return task

    async def send(self, msg: dict[str, Any]) -> bool:
        """Send a frame on the channel now up; False if there is none."""
        channel = self.channel
        if channel is None or not channel.open:
            return False
        try:
            await channel.send_lease(msg)
        except ChannelClosed:
            return False
        return True

    def _runtime(self, name: str | None) -> Runtime:
        """The runtime a lease asked for (None: the provider's own), opened once."""
        name = name or self.config.workspace_runtime
        if name not in self.runtimes:
            options = (
                self.config.workspace_options
                if name == self.config.workspace_runtime
                else self.config.runtime_options.get(name, {})
            )
            self.runtimes[name] = open_runtime(name, self.root, **options)
        return self.runtimes[name]

    @property
    def root(self) -> Path:
        """Where this agent's workspaces live: the configured root, else one of this node's
        own under the data dir (agents sharing a data dir then never sweep each other's)."""
        from idlegrid.config import default_data_dir

        if self.config.workspace_root is not None:
            return self.config.workspace_root
        return default_data_dir() / "workspaces" / (self.node_id[:16] or "node")

    def sweep(self) -> list[str]:
        """Wipe what an earlier run of this agent left (it died before ending its leases):
        containers, sandboxes' processes, mounts, cgroups; run before any lease starts. The
        lease ids swept."""
        if not self.root.is_dir():
            return []
        offered = {self.config.workspace_runtime, *self.config.lease_controls.runtimes}
        swept: list[str] = []
        for name in ("podman", "bwrap"):  # containers first: their disks are bwrap-shaped
            if name not in offered:
                continue
            try:
                swept += getattr(self._runtime(name), "sweep", list)()
            except Exception as exc:  # a runtime this host cannot open left nothing to sweep
                log.info("no %s workspaces to sweep: %s", name, exc)
        if swept:
            log.warning("wiped %d workspace(s) left by an earlier run: %s", len(swept), swept)
        return swept

    async def _provision(self, msg: LeaseFrame) -> None:
        lease = msg.lease
        if lease in self.workspaces:
            await self.send(frame("provisioned", lease))
            return
        if lease in self._provisioning or msg.spec is None:
            return
        self._provisioning.add(lease)
        try:
            sp = msg.spec
            self._check_controls(sp)
            spec = WorkspaceSpec(
                lease,
                Limits(sp.cpus, sp.memory_bytes, sp.pids, sp.disk_bytes),
                gpus=tuple(sp.gpus),
                pip=tuple(sp.pip),
                egress=sp.egress,
                image=sp.image,
            )
            runtime = self._runtime(sp.runtime)
            ws = await asyncio.to_thread(lambda: runtime.create(spec))
            # Running means a command was answered: the lease is billed from here on.
            code, _out, err = await asyncio.to_thread(lambda: ws.exec(["true"]).run(60))
            if code != 0:
                await asyncio.to_thread(ws.wipe)
                raise RuntimeError(f"the first command failed ({code}): {err[-500:]!r}")
        except Exception as exc:  # any failure to make it is the lease's, not the agent's
            log.warning("lease %s: provisioning failed: %s", lease, exc)
            self._provisioning.discard(lease)
            if lease in self._ended:
                self._ended.discard(lease)
                await self.send(frame("wiped", lease))
            else:
                await self.send(frame("provisioning-failed", lease, reason=str(exc)[:4000]))
            return
        self._provisioning.discard(lease)
        if lease in self._ended:  # cancelled while it was being made
            self._ended.discard(lease)
            await asyncio.to_thread(ws.wipe)
            await self.send(frame("wiped", lease))
            return
        self.workspaces[lease] = ws
        await self.send(frame("provisioned", lease))

    def _check_controls(self, sp: LeaseSpecMsg) -> None:
        """Refuse a lease past this provider's controls, whatever the coordinator sent."""
        used = [0.0, 0.0, 0.0]
        for ws in self.workspaces.values():
            limits = ws.spec.limits
            for i, v in enumerate(
                (limits.cpus, limits.memory_bytes / GIB, limits.disk_bytes / GIB)
            ):
                used[i] += v
        ask = LeaseAsk(
            sp.cpus, sp.memory_bytes / GIB, sp.disk_bytes / GIB, sp.egress, bool(sp.pip),
            sp.runtime or "bwrap",
        )  # fmt: skip
        stop = refusal(self.config.lease_controls, ask, (used[0], used[1], used[2]))
        if stop is not None:
            raise RuntimeError(f"refused by the provider's lease controls ({stop[0]}): {stop[1]}")

    async def _end(self, lease: str) -> None:
        if lease in self._provisioning:
            self._ended.add(lease)  # the provisioning task wipes it and answers
            return
        ws = self.workspaces.pop(lease, None)
        for ex in list(self.execs.values()):
            if ex.lease == lease and isinstance(ex.execution, Connection):
                ex.execution.signal()  # not a process of the workspace: kill_all misses it
        if ws is not None:
            await asyncio.to_thread(ws.wipe)
        await self.send(frame("wiped", lease))

    async def _exec(self, msg: LeaseFrame) -> None:
        ws = self.workspaces.get(msg.lease)
        ex = self.execs[msg.exec or ""]
        if ws is None or not msg.argv:
            self.execs.pop(ex.id, None)
            await self.send(
                frame("exec-failed", msg.lease, exec=msg.exec, reason="no such workspace here")
            )
            return
        try:
            execution: Execution | Connection | None = None
            if msg.forward is not None:
                # The agent's own connection into the workspace's network where the runtime
                # offers one: no relay process in the sandbox, two fewer copies a byte.
                execution = await asyncio.to_thread(ws.connect, msg.forward)
            if execution is None:
                execution = await asyncio.to_thread(
                    ws.exec,
                    msg.argv,
                    msg.env or {},
                    msg.cwd or "/work",
                    "stream" if msg.stdin else None,
                )
        except Exception as exc:  # e.g. a cwd outside the workspace
            self.execs.pop(ex.id, None)
            await self.send(frame("exec-failed", msg.lease, exec=msg.exec, reason=str(exc)))
            return
        ex.start(execution)

    async def close(self) -> None:
        """Kill and wipe every workspace (the agent is stopping: its leases end with it),
        those still being made too: a workspace finished after the agent stopped would be
        left mounted with nobody to wipe it."""
        self._ended |= self._provisioning
        if self._making:
            await asyncio.gather(*self._making, return_exceptions=True)
        for lease in list(self.workspaces):
            ws = self.workspaces.pop(lease)
            await asyncio.to_thread(ws.wipe)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("lease frame handling failed", exc_info=task.exception())


class _Exec:
    """One running command: a thread sends its output within the credit, another writes
    its streamed stdin; a task on the loop sends what they hand it, in order."""

    def __init__(self, host: LeaseHost, lease: str, exec_id: str, window: int) -> None:
        self.host, self.lease, self.id = host, lease, exec_id
        self.execution: Execution | Connection | None = None
        self._signals: list[int] = []  # signals that came before the command started
        self.channel = host.channel  # the channel it started on: if that goes, nobody reads
        self.window = Window(window)
        self.cond = threading.Condition()
        self.stdin: queue.Queue[bytes | None] = queue.Queue()  # bounded by the stdin window
        self._owed = Owed(credit_batch(window))  # stdin written, not credited back yet
        # Frames for the sender task: output only within the window, so this is bounded too.
        self.out: asyncio.Queue[dict[str, Any] | bytes | None] = asyncio.Queue()
        self.sent = 0  # output bytes handed to the channel (the exit frame states it)
        assert host.loop is not None
        self.loop = host.loop

    def start(self, execution: Execution | Connection) -> None:
        self.execution = execution
        for sig in self._signals:
            execution.signal(sig)
        self.host._spawn(self._send_out())
        threading.Thread(target=self._pump, daemon=True, name=f"exec-{self.id}").start()
        threading.Thread(target=self._write, daemon=True, name=f"stdin-{self.id}").start()

    def on_frame(self, msg: LeaseFrame) -> None:
        if msg.type == "credit":
            with self.cond:
                self.window = self.window.credited(msg.size or 0)
                self.cond.notify_all()
        elif msg.type == "stdin-eof":
            self.stdin.put(None)
        elif msg.type == "signal" and msg.signal:
            if self.execution is None:
                self._signals.append(msg.signal)
            else:
                self.execution.signal(msg.signal)

    def _unread(self) -> bool:
        """Nobody reads this command's output any more (its channel went down)."""
        return self.channel is None or not self.channel.open

    def _post(self, item: dict[str, Any] | bytes | None) -> None:
        """Hand a frame to the sender task (from a thread; never waits)."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    async def _send_out(self) -> None:
        while (item := await self.out.get()) is not None:
            channel = self.channel
            if channel is None or not channel.open:
                continue  # dropped: the coordinator failed this exec when the channel went
            try:
                if isinstance(item, bytes):
                    await channel.send_data(item)
                else:
                    await channel.send_lease(item)
            except ChannelClosed:
                continue

    def _pump(self) -> None:
        assert self.execution is not None
        try:
            for stream, data in self.execution.chunks():
                tag = STDOUT if stream == "stdout" else STDERR
                while data:
                    with self.cond:
                        while self.window.room == 0 and not self._unread():
                            self.cond.wait(0.5)
                        if self._unread():
                            break  # dropped: the workload runs on, nobody is listening
                        take = min(self.window.room, OUT_CHUNK)
                        part, data = data[:take], data[take:]
                        self.window = self.window.sent(len(part))
                    self.sent += len(part)
                    self._post(data_frame(self.id, tag, part))
            code = self.execution.wait()
        except Exception as exc:  # the pipes or the process went away under us
            code = -1
            log.warning("exec %s of lease %s: %s", self.id, self.lease, exc)
        self.stdin.put(None)
        self._post(frame("exit", self.lease, exec=self.id, code=code, bytes=self.sent))
        self._post(None)
        self.host.execs.pop(self.id, None)

    def _write(self) -> None:
        assert self.execution is not None
        while True:
            data = self.stdin.get()
            if data is None:
                self.execution.close_stdin()
                return
            if not self.execution.write(data):
                self.execution.close_stdin()
                # Keep crediting what arrives, so the coordinator's writer never waits.
            self._owed, due = self._owed.passed(len(data))
            if due:
                self._post(frame("stdin-credit", self.lease, exec=self.id, bytes=due))
