"""A small peer transport over TCP with per-link latency added in user space.

Each endpoint listens on one address and keeps one outgoing connection per peer. Frames
are (tag, length, payload). A receiver thread per incoming connection stamps each frame
when its last byte arrives and queues it; `recv` hands it out no earlier than that stamp
plus the link's latency. Bandwidth is left to the kernel (tbf/htb on the interface), so
a message costs latency + size/bandwidth, and back-to-back messages pipeline: latency
delays each one but never slows the stream (the DT-FM link model, and what netem's delay
would give on a kernel that has it).

Sends go through one background writer per peer, so compute overlaps communication the
way DT-FM's send stream does. Bytes are counted at the socket.

With a shared `secret` (a training job's), every frame carries an HMAC-SHA256 of its header
and payload; a frame that fails it ends that connection, so a stranger who reaches the
port cannot inject or alter messages, nor claim another rank.
"""

from __future__ import annotations

import hashlib
import hmac
import queue
import socket
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

_HEADER = struct.Struct("!iiQ")  # source rank, tag, payload length
_HELLO = struct.Struct("!i")
_MAC_SIZE = 32
MAX_FRAME = 1 << 30


class TransportClosed(Exception):
    """The endpoint was closed while a receive was waiting."""


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Endpoint:
    """One rank's view of the mesh: send(dst, tag, bytes) and recv(src, tag) -> bytes."""

    def __init__(
        self,
        rank: int,
        addresses: Sequence[tuple[str, int]],
        latency_s: Sequence[Sequence[float]],
        clock: Callable[[], float] = time.monotonic,
        *,
        secret: bytes | None = None,
    ) -> None:
        self.rank, self.addresses, self.latency = rank, list(addresses), latency_s
        self.secret = secret
        self.rejected = 0  # frames refused for a bad MAC
        self.clock = clock
        self.bytes_sent = 0
        self._inbox: dict[tuple[int, int], list[tuple[float, bytes]]] = defaultdict(list)
        self._ready = threading.Condition()
        self._closed = False
        self._out: dict[int, queue.Queue[bytes | None]] = {}
        self._writers: list[threading.Thread] = []
        self._server = socket.create_server(self.addresses[rank], reuse_port=False)
        self.addresses[rank] = self._server.getsockname()[:2]  # port 0 → the real one
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while True:
                head = _read_exact(conn, _HEADER.size)
                if head is None:
                    return
                src, tag, n = _HEADER.unpack(head)
                if not 0 <= src < len(self.addresses) or n > MAX_FRAME:
                    self.rejected += 1
                    return
                body = _read_exact(conn, n)
                if body is None:
                    return
                if self.secret is not None:
                    mac = _read_exact(conn, _MAC_SIZE)
                    if mac is None or not hmac.compare_digest(mac, self._mac(head, body)):
                        self.rejected += 1
                        return
                arrived = self.clock()
                with self._ready:
                    self._inbox[(src, tag)].append((arrived + self.latency[src][self.rank], body))
                    self._ready.notify_all()

    def connect(self, peers: Sequence[int]) -> None:
        """Open the outgoing connections (every peer must be listening already)."""
        for dst in peers:
            if dst == self.rank or dst in self._out:
                continue
            sock = socket.create_connection(self.addresses[dst])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            q: queue.Queue[bytes | None] = queue.Queue()
            self._out[dst] = q
            t = threading.Thread(target=self._write, args=(sock, q), daemon=True)
            t.start()
            self._writers.append(t)

    def _write(self, sock: socket.socket, q: queue.Queue[bytes | None]) -> None:
        with sock:
            while True:
                frame = q.get()
                if frame is None:
                    sock.shutdown(socket.SHUT_WR)
                    return
                sock.sendall(frame)

    def send(self, dst: int, tag: int, payload: bytes) -> None:
        """Queue a message for dst; returns at once."""
        if dst not in self._out:
            self.connect([dst])
        self.bytes_sent += len(payload)
        head = _HEADER.pack(self.rank, tag, len(payload))
        mac = self._mac(head, payload) if self.secret is not None else b""
        self._out[dst].put(head + payload + mac)

    def _mac(self, head: bytes, payload: bytes) -> bytes:
        assert self.secret is not None
        return hmac.new(self.secret, head + payload, hashlib.sha256).digest()

    def recv(self, src: int, tag: int, timeout: float = 600.0) -> bytes:
        """The oldest message from src with this tag, once its latency has elapsed."""
        deadline = self.clock() + timeout
        with self._ready:
            while True:
                box = self._inbox.get((src, tag))
                now = self.clock()
                if box and box[0][0] <= now:
                    return box.pop(0)[1]
                if self._closed:
                    raise TransportClosed(f"rank {self.rank} closed")
                if now >= deadline:
                    raise TimeoutError(f"rank {self.rank}: nothing from {src} tag {tag}")
                # Wake when the head message becomes due, or when something arrives.
                wait = deadline - now if not box else min(deadline, box[0][0]) - now
                self._ready.wait(max(wait, 0.0))

    def close(self) -> None:
        """Flush outgoing queues and stop."""
        for q in self._out.values():
            q.put(None)
        for t in self._writers:
            t.join(timeout=30)
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._server.close()
