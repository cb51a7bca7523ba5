"""Port-forwarding into a workspace: an exec of the workspace's own Python that connects to
127.0.0.1:PORT inside the lease's network namespace and copies bytes between that socket
and its stdin/stdout. The agent cannot reach the sandbox's loopback itself (it has its own
netns), and this way a forwarded connection is an exec like any other: relayed over the
agent's channel, bounded by the same credit windows, killed with the lease."""

from __future__ import annotations

from idlegrid.errors import InvalidRequest

RELAY = r"""
import os, socket, sys, threading
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
except OSError as exc:
    print(f"nothing listens on port {sys.argv[1]} in the workspace: {exc}", file=sys.stderr)
    sys.exit(2)
s.settimeout(None)
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=up, daemon=True).start()
out = sys.stdout.buffer
while True:
    data = s.recv(65536)
    if not data:
        break
    out.write(data)
    out.flush()
"""


def argv_forward(port: object) -> list[str]:
    """The exec that relays one connection to `port` inside the workspace."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequest("forward: a TCP port, 1 to 65535", param="forward")
    return ["python", "-c", RELAY, str(port)]
