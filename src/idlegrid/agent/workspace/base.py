"""What every workspace runtime offers (`Runtime`, `Workspace`), what a lease asks for
(`WorkspaceSpec`), and a running command (`Execution`): its stdout and stderr streamed as
they come, its exit code kept.

An `Execution` reads its pipes only as fast as its caller iterates: a slow consumer fills
the pipe and the workload blocks on write, so nothing is buffered without bound here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Stream = Literal["stdout", "stderr"]
# Input for a command: all of it at once, "stream" (the caller writes it: `Execution.write`,
# then `close_stdin`), or None (no input).
Stdin = bytes | Literal["stream"] | None
CHUNK = 256 * 1024  # the most one read of a workload's output takes
PIPE_BYTES = 1 << 20  # pipes to and from a workload: fewer, larger reads than the 64 KiB default


@dataclass(frozen=True)
class Limits:
    """What a lease may use: CPU cores (a quota, fractions allowed), memory (no swap),
    processes, and the size of its `/work`."""

    cpus: float = 1.0
    memory_bytes: int = 2 << 30
    pids: int = 512
    disk_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if self.cpus <= 0 or self.memory_bytes < 16 << 20 or self.pids < 8:
            raise ValueError(f"limits too small to run anything: {self}")
        if self.disk_bytes < 16 << 20:
            raise ValueError(f"a /work under 16 MiB cannot hold a venv: {self.disk_bytes}")


@dataclass(frozen=True)
class WorkspaceSpec:
    """One lease's workspace: its id, limits, leased GPU indices and pip requirements.
    Outbound network is off unless `egress` (bwrap: egress only, workspace/egress.py).
    `image`: an OCI image reference for the `podman` runtime (None: the provider's default)."""

    lease: str
    limits: Limits = field(default_factory=Limits)
    gpus: tuple[int, ...] = ()
    pip: tuple[str, ...] = ()
    egress: bool = False
    image: str | None = None

    def __post_init__(self) -> None:
        if not self.lease or not all(c.isalnum() or c in "-_" for c in self.lease):
            # The id names directories and cgroups: nothing that could climb out of them.
            raise ValueError(f"a lease id is letters, digits, '-' and '_': {self.lease!r}")
        if any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"GPU indices must be distinct and >= 0: {self.gpus}")
        if self.image is not None and (
            not self.image
            or self.image[0] == "-"
            or not self.image.isprintable()
            or " " in self.image
        ):
            raise ValueError(f"not an image reference: {self.image!r}")  # nor a podman option


@dataclass(frozen=True)
class Usage:
    """What a workspace uses now: CPU seconds so far, memory now and at its peak, live
    processes, OOM kills, and bytes used in `/work`. None: this runtime cannot tell."""

    cpu_s: float | None
    memory_bytes: int | None
    memory_peak_bytes: int | None
    pids: int | None
    oom_kills: int | None
    disk_bytes: int


class Execution:
    """A command running in a workspace: iterate `chunks()` for its output, then `wait()`."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: Stdin) -> None:
        self.proc = proc
        self._writer: threading.Thread | None = None
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                # Past /proc/sys/fs/pipe-max-size an unprivileged agent is refused: keep 64 KiB.
                with contextlib.suppress(OSError):
                    fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        if isinstance(stdin, bytes) and proc.stdin is not None:
            pipe = proc.stdin

            def feed() -> None:
                # A thread, so a workload that writes before it reads cannot deadlock us.
                try:
                    pipe.write(stdin)
                except BrokenPipeError:
                    pass  # the workload stopped reading: what it did not take is dropped
                finally:
                    pipe.close()

            self._writer = threading.Thread(target=feed, daemon=True)
            self._writer.start()

    def write(self, data: bytes) -> bool:
        """Write streamed stdin (blocks while the workload's pipe is full); False once the
        workload stopped reading."""
        if self.proc.stdin is None or self.proc.stdin.closed:
            return False
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def close_stdin(self) -> None:
        """End of streamed stdin."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            # The workload may have stopped reading: nothing was left to say then.
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()

    @property
    def pid(self) -> int:
        """The pid of the runtime's outermost process for this command."""
        return self.proc.pid

    def chunks(self) -> Iterator[tuple[Stream, bytes]]:
        """(stream, bytes) as the workload writes them, until both pipes close."""
        sel = selectors.DefaultSelector()
        names: dict[int, Stream] = {}
        for name, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            if pipe is not None:
                sel.register(pipe.fileno(), selectors.EVENT_READ)
                names[pipe.fileno()] = name  # type: ignore[assignment]
        try:
            while names:
                for key, _ in sel.select():
                    fd = int(key.fd)
                    data = os.read(fd, CHUNK)
                    if not data:
                        sel.unregister(fd)
                        del names[fd]
                        continue
                    yield names[fd], data
        finally:
            sel.close()

    def wait(self, timeout: float | None = None) -> int:
        """The exit code (128 + N when killed by signal N, as a shell reports it)."""
        code = self.proc.wait(timeout)
        if self._writer is not None:
            self._writer.join(timeout=1.0)
        for pipe in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        return 128 - code if code < 0 else code

    def run(self, timeout: float | None = None) -> tuple[int, bytes, bytes]:
        """Read everything, then the exit code: (code, stdout, stderr). For short commands."""
        out: dict[Stream, list[bytes]] = {"stdout": [], "stderr": []}
        for name, data in self.chunks():
            out[name].append(data)
        return self.wait(timeout), b"".join(out["stdout"]), b"".join(out["stderr"])

    def signal(self, sig: int = signal.SIGKILL) -> None:
        """Signal the runtime's outermost process (kill_all reaches everything)."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)


def killed_by(code: int) -> signal.Signals | None:
    """The signal an exit code (shell convention, 129..192) reports, if any."""
    try:
        return signal.Signals(code - 128) if 128 < code <= 192 else None
    except ValueError:
        return None


class Workspace(Protocol):
    """One lease's workspace: run commands in it, see what it uses, kill it, wipe it."""

    spec: WorkspaceSpec

    def exec(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str = "/work",
        stdin: Stdin = None,
    ) -> Execution:
        """Start `argv` in the workspace (cwd a path as the workspace sees it)."""
        ...

    def connect(self, port: int) -> Any:
        """A `Connection` (workspace/connection.py) to 127.0.0.1:`port` as the workspace
        sees it, made by the agent; None where the runtime cannot (forward by an exec)."""
        ...

    def kill_all(self, timeout: float = 5.0) -> None:
        """Kill every process of the workspace and wait until none is left."""
        ...

    def wipe(self) -> None:
        """Kill everything, then remove `/work` and every trace of the workspace."""
        ...

    def usage(self) -> Usage:
        """What the workspace uses now."""
        ...


class Runtime(Protocol):
    """Makes workspaces: `bwrap` (the sandbox) or `local` (isolates nothing, for dev)."""

    name: str

    def create(self, spec: WorkspaceSpec) -> Workspace:
        """A ready workspace: its disk, limits and venv made, its pip requirements installed."""
        ...


def disk_used(path: Path) -> int:
    """Bytes the files under `path` occupy (a walk: for runtimes without a filesystem of
    their own to ask)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total
