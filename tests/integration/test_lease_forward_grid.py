"""Port-forwarding as the agent's own connection into the workspace (no relay process in
the sandbox, workspace/connection.py), on a loopback grid of its own (the fixture of
test_leases_grid): a consumer that stops reading a fast server stops it within one window,
then gets every byte; a port nothing listens on says so, exit 2, even where the provider's
own loopback has it open."""

from __future__ import annotations

import hashlib
import json
import random
import socket

import pytest
from test_leases_grid import Grid, _leave_at_once, _order, _wait_state, grid  # noqa: F401

from idlegrid.agent.workspace.connection import Connection
from idlegrid.client.lease_cmd import exec_stream
from idlegrid.testbed.inprocess import wait_until

pytestmark = pytest.mark.slow

SIZE = 24 << 20  # far more than the window and the sockets' buffers hold
BULK = (
    "import random, socket\n"
    "s = socket.create_server(('127.0.0.1', 8802))\n"
    "c, _ = s.accept()\n"
    f"c.sendall(random.Random(7).randbytes({SIZE}))\n"
    "c.close()\n"
)


def test_a_forward_stops_a_fast_server_within_one_window_then_resumes(
    grid: Grid,  # noqa: F811
) -> None:
    from websockets.sync.client import connect

    _order(grid, "F1", "RTX-4090")
    _wait_state(grid, "F1", "running")
    _leave_at_once(grid, "F1", f'exec python -c "{BULK}"')
    relays = grid.coordinator.app.state.services.leases.relays
    host = grid.agents["p1"].agent.leases
    ws_url = "ws" + grid.url[4:] + "/api/v1/leases/F1/exec"
    auth = {"authorization": f"Bearer {grid.keys[0][1]}"}

    def listening() -> bool:
        code = exec_stream(grid.url, grid.keys[0][1], "F1", {"argv": ["python", "-c", PROBE]})
        return code == 0

    wait_until(listening, timeout_s=30, interval_s=0.2)
    before = set(relays)
    with connect(ws_url, additional_headers=auth, proxy=None, max_size=1 << 22) as ws:
        ws.send(json.dumps({"forward": 8802}))
        assert json.loads(ws.recv())["type"] == "started"
        (rid,) = set(relays) - before
        relay = relays[rid]
        wait_until(lambda: rid in host.execs and host.execs[rid].execution is not None, 10)
        assert isinstance(host.execs[rid].execution, Connection)  # no process in the sandbox
        # Nobody reads: the sockets fill, then the relay's queue, then the agent's window.
        wait_until(lambda: relay._queued >= relay.window // 2, timeout_s=30)
        wait_until(lambda: host.execs[rid].window.room == 0, timeout_s=30)
        assert relay.peak_queued <= relay.window
        assert relay.received < SIZE  # the server waits: its bytes are not all out
        got = bytearray()
        while True:
            msg = ws.recv(timeout=30)
            if isinstance(msg, bytes):
                assert msg[:1] == b"\x01"
                got.extend(msg[1:])
            elif json.loads(msg)["type"] == "exit":
                break
    assert json.loads(msg)["code"] == 0
    assert relay.peak_queued <= relay.window
    expected = random.Random(7).randbytes(SIZE)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert (
        bytes(grid.coordinator.app.state.services.leases.logs.get("F1", b"")).find(expected[-4096:])
        == -1
    )  # a forwarded connection's bytes are not kept as the lease's logs


# Whether the bulk server listens yet, asked from inside (connecting would be its one client).
PROBE = "import os, sys; sys.exit(0 if ':2262 ' in open('/proc/net/tcp').read() else 1)"


def test_a_forward_to_a_port_nothing_listens_on_says_so_even_if_the_host_has_it(
    grid: Grid,  # noqa: F811
) -> None:
    _wait_state(grid, "F1", "running")
    host = socket.create_server(("127.0.0.1", 0))  # the provider's loopback has this port
    err = bytearray()
    try:
        port = host.getsockname()[1]
        code = exec_stream(
            grid.url, grid.keys[0][1], "F1", {"forward": port}, stdin=iter([b""]),
            on_output=lambda fd, data: err.extend(data) if fd == 2 else None,
        )  # fmt: skip
    finally:
        host.close()
    assert code == 2
    assert f"nothing listens on port {port} in the workspace" in err.decode()
    with grid.http() as c:
        c.post("/api/v1/leases/F1/end").raise_for_status()
    _wait_state(grid, "F1", "ended")
