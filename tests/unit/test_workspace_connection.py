"""The agent's own connection for a port-forward (workspace/connection.py) with an
`Execution`'s face, against real sockets on this host's loopback (no namespace: the
namespace part runs in tests/integration/test_workspace_bwrap.py)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from idlegrid.agent.workspace.connection import Connection, NamespaceUnavailable


def test_its_bytes_are_stdout_its_stdin_goes_to_the_server_and_eof_is_passed_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:

        def upper() -> None:
            c, _ = server.accept()
            with c:
                while data := c.recv(65536):
                    c.sendall(data.upper())

        t = threading.Thread(target=upper, daemon=True)
        t.start()
        conn = Connection.open(server.getsockname()[1], None)
        assert conn.sock is not None
        assert conn.write(b"abc" * 100_000)
        conn.close_stdin()  # the server reads end of file, answers, closes
        got = b"".join(data for stream, data in conn.chunks() if stream == "stdout")
        assert got == b"ABC" * 100_000
        assert conn.wait() == 0
        assert not conn.write(b"late")  # closed: refused, not an exception
        t.join(5)


def test_a_signal_ends_a_connection_whose_server_says_nothing() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn = Connection.open(server.getsockname()[1], None)
        peer, _ = server.accept()
        got: list[tuple[str, bytes]] = []
        reader = threading.Thread(target=lambda: got.extend(conn.chunks()), daemon=True)
        reader.start()
        conn.signal(9)  # the relay's kill: wakes the blocked read
        reader.join(5)
        assert not reader.is_alive() and got == []
        assert conn.wait() == 0
        peer.close()


def test_nothing_listening_is_said_on_stderr_with_exit_2() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed below: nothing listens there then
    conn = Connection.open(port, None)
    assert conn.sock is None
    out = list(conn.chunks())
    assert [s for s, _ in out] == ["stderr"]
    assert f"nothing listens on port {port}" in out[0][1].decode()
    assert conn.wait() == 2


def test_a_namespace_it_cannot_enter_is_not_taken_for_a_refused_port(tmp_path: Path) -> None:
    # The runtime then forwards by an exec instead (BwrapWorkspace.connect returns None).
    with pytest.raises(NamespaceUnavailable):
        Connection.open(80, tmp_path / "no-such-netns")
