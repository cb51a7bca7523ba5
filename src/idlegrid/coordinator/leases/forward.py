"""Port-forwarding into a workspace: an exec of the workspace's own Python that connects to
127.0.0.1:PORT inside the lease's network namespace and copies bytes between that socket
and its stdin/stdout. The agent cannot reach the sandbox's loopback itself (it has its own
netns), and this way a forwarded connection is an exec like any other: relayed over the
agent's channel, bounded by the same credit windows, killed with the lease."""

from __future__ import annotations

from idlegrid.errors import InvalidRequest

# Plain reads and writes of up to 1 MiB. Not splice(2): splicing a pipe into a TCP socket
# asks for more (MSG_MORE) and holds a lone byte back, and splicing the socket into the
# stdout pipe stalled with data waiting when both directions were busy (an echo, on this
# VM's kernel 6.18); the copy through Python costs little next to the relay's hops.
RELAY = r"""
import contextlib, os, socket, sys, threading
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
except OSError as exc:
    print(f"nothing listens on port {sys.argv[1]} in the workspace: {exc}", file=sys.stderr)
    sys.exit(2)
s.settimeout(None)
N = 1 << 20
def up():
    with contextlib.suppress(OSError):
        while data := os.read(0, N):
            s.sendall(data)
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
with contextlib.suppress(OSError):  # the reader or the server went away
    while data := s.recv(N):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
"""


def argv_forward(port: object) -> list[str]:
    """The exec that relays one connection to `port` inside the workspace."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequest("forward: a TCP port, 1 to 65535", param="forward")
    return ["python", "-c", RELAY, str(port)]
