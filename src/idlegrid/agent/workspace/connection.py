"""A TCP connection into a workspace's own network namespace, opened by the agent itself:
port-forwarding without a relay process in the sandbox.

The agent (root) enters the lease's network namespace in a thread of its own just long
enough to make the socket (a socket stays in the namespace it was made in), so the
connection reaches 127.0.0.1:PORT of the workspace and nothing else: that namespace has
only `lo`. It costs the workspace nothing: no process, no pipe, two fewer copies of each
byte than the relay script (socket → pipe → agent). The workspace cannot reach the agent
through it any more than through a pipe: it only ever sends bytes the relay's window
bounds.

A `Connection` has an `Execution`'s face (`chunks`, `write`, `close_stdin`, `wait`,
`signal`), so the lease host relays it like any exec: its bytes are stdout, stdin goes to
it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal as signals
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from idlegrid.agent.workspace.base import CHUNK, Stream

CLONE_NEWNET = 0x40000000
REFUSED = 2  # the exit code of a forward nothing listens for (as the relay script's)
T = TypeVar("T")


class NamespaceUnavailable(OSError):
    """The agent cannot enter the namespace (not root, no such file): forward by an exec."""


def in_netns(netns: Path, make: Callable[[], T]) -> T:
    """`make()` run in the network namespace `netns` (an nsfs file), in a thread that ends
    right after: the agent's other threads never leave their own namespace."""
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            err.append(NamespaceUnavailable(exc.errno, f"{netns}: {exc.strerror}"))
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise NamespaceUnavailable(errno, f"setns({netns}): {os.strerror(errno)}")
            out.append(make())
        except BaseException as exc:  # handed to the caller's thread
            err.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


class Connection:
    """One forwarded TCP connection, relayed as an exec: its bytes are `stdout`."""

    def __init__(self, sock: socket.socket | None, refusal: str = "") -> None:
        self.sock = sock
        self.refusal = refusal  # why there is no socket (said on stderr, exit 2)
        self._closed = threading.Event()

    @classmethod
    def open(cls, port: int, netns: Path | None, timeout: float = 10.0) -> Connection:
        """Connect to 127.0.0.1:`port` in `netns` (None: this process's own network);
        NamespaceUnavailable if the namespace cannot be entered."""

        def make() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)

        try:
            sock = make() if netns is None else in_netns(netns, make)
        except NamespaceUnavailable:
            raise
        except OSError as exc:
            return cls(None, f"nothing listens on port {port} in the workspace: {exc}\n")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def chunks(self) -> Iterator[tuple[Stream, bytes]]:
        """What the workspace's server sends, as it comes, until it (or we) close."""
        if self.sock is None:
            yield "stderr", self.refusal.encode()
            return
        with contextlib.suppress(OSError):  # reset by the server, or closed by `signal`
            while data := self.sock.recv(CHUNK):
                yield "stdout", data

    def write(self, data: bytes) -> bool:
        """Send to the server (blocks while its socket is full); False once it is gone."""
        if self.sock is None or self._closed.is_set():
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def close_stdin(self) -> None:
        """The consumer sent everything: the server reads end of file."""
        if self.sock is not None and not self._closed.is_set():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def signal(self, sig: int = signals.SIGKILL) -> None:
        """Any signal ends a connection (there is no process to deliver it to)."""
        if self.sock is not None and not self._closed.is_set():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader: `chunks` ends

    def wait(self, timeout: float | None = None) -> int:
        """Close the socket; 0, or 2 when nothing listened."""
        self._closed.set()
        if self.sock is not None:
            self.sock.close()
        return REFUSED if self.sock is None else 0
