"""Bad input on a lease's exec WebSocket gets a clear error and loses nothing: each
malformed frame a consumer may send to a running command (not JSON, an unknown type, a
signal that is no signal, a bad terminal size, stdin that is not open, a binary frame that
is not stdin) is answered with a non-fatal 400 naming its field, and the command goes on:
stdin still echoes, a valid signal still lands, the exit code still arrives. Real agent,
real sandbox, on a loopback grid of its own (the fixture of test_leases_grid)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from test_leases_grid import Grid, _order, _wait_state, grid  # noqa: F401

from idlegrid.client.lease_cmd import exec_stream

pytestmark = pytest.mark.slow

LEASE = "E1"


@pytest.fixture(scope="module")
def lease(grid: Grid) -> Iterator[str]:  # noqa: F811
    _order(grid, LEASE, "RTX-4090")
    _wait_state(grid, LEASE, "running")
    yield LEASE
    with grid.http() as c:
        c.post(f"/api/v1/leases/{LEASE}/end").raise_for_status()
    _wait_state(grid, LEASE, "ended")


class Session:
    """One exec over the raw WebSocket, its output kept as it comes."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.out = bytearray()

    def send(self, frame: str | bytes | dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    def control(self) -> dict[str, Any]:
        """The next control frame (output before it is kept)."""
        while True:
            msg = self.ws.recv(timeout=15)
            if isinstance(msg, bytes):
                assert msg[:1] == b"\x01", msg
                self.out.extend(msg[1:])
                continue
            return json.loads(msg)  # type: ignore[no-any-return]

    def refused(self, frame: str | bytes | dict[str, Any], param: str) -> dict[str, Any]:
        self.send(frame)
        err = self.control()
        assert err["type"] == "error", err
        assert (err["status"], err["param"], err["fatal"]) == (400, param, False), err
        return err

    def output(self, want: bytes) -> None:
        """Wait until the output holds `want`."""
        while want not in self.out:
            msg = self.ws.recv(timeout=15)
            assert isinstance(msg, bytes), msg  # no error, no exit before it
            assert msg[:1] == b"\x01", msg
            self.out.extend(msg[1:])


@contextlib.contextmanager
def _open(grid: Grid, lease: str, first: dict[str, Any]) -> Iterator[Session]:  # noqa: F811
    from websockets.sync.client import connect

    ws_url = "ws" + grid.url[4:] + f"/api/v1/leases/{lease}/exec"
    auth = {"authorization": f"Bearer {grid.keys[0][1]}"}
    with connect(ws_url, additional_headers=auth, proxy=None, max_size=1 << 22) as ws:
        ws.send(json.dumps(first))
        assert json.loads(ws.recv(timeout=15))["type"] == "started"
        yield Session(ws)


BAD_FOR_CAT: list[tuple[str | bytes | dict[str, Any], str]] = [
    ("not json", "frame"),
    ("[1, 2]", "frame"),
    (b"\x07abc", "frame"),
    (b"", "frame"),
    ({"type": "bogus"}, "type"),
    ({"type": "resize", "rows": 10, "cols": 10}, "type"),  # cat has no terminal
    ({"type": "signal", "signal": "KILL"}, "signal"),
    ({"type": "signal", "signal": 0}, "signal"),
    ({"type": "signal", "signal": -3}, "signal"),
    ({"type": "signal", "signal": 999}, "signal"),
    ({"type": "signal", "signal": True}, "signal"),
]


def test_each_bad_frame_is_refused_by_name_and_cat_still_echoes(
    grid: Grid,  # noqa: F811
    lease: str,
) -> None:
    with _open(grid, lease, {"argv": ["cat"], "stdin": True}) as s:
        for i, (frame, param) in enumerate(BAD_FOR_CAT):
            s.refused(frame, param)
            line = f"line {i}\n".encode()
            s.send(b"\x00" + line)
            s.output(line)  # the stream works on after each refusal
        s.send({"type": "eof"})
        assert s.control() == {"type": "exit", "code": 0}
        assert bytes(s.out) == b"".join(f"line {i}\n".encode() for i in range(len(BAD_FOR_CAT)))


def test_stdin_after_eof_is_refused_and_a_valid_signal_still_lands(
    grid: Grid,  # noqa: F811
    lease: str,
) -> None:
    with _open(grid, lease, {"argv": ["sh", "-c", "cat; echo drained; exec sleep 100"],
                                  "stdin": True}) as s:  # fmt: skip
        s.send(b"\x00hello\n")
        s.send({"type": "eof"})
        s.output(b"hello\ndrained\n")  # cat saw the eof: `sleep` runs now
        err = s.refused(b"\x00late", "stdin")
        assert "eof" in err["message"]
        s.refused({"type": "eof"}, "stdin")
        s.refused({"type": "signal", "signal": 999}, "signal")
        s.send({"type": "signal", "signal": 15})
        assert s.control() == {"type": "exit", "code": 143}  # SIGTERM ended the sleep


def test_a_command_without_stdin_refuses_stdin_and_eof_and_is_still_killed(
    grid: Grid,  # noqa: F811
    lease: str,
) -> None:
    with _open(grid, lease, {"argv": ["sh", "-c", "echo up; exec sleep 100"]}) as s:
        s.output(b"up\n")
        err = s.refused(b"\x00x", "stdin")
        assert "without stdin" in err["message"]
        s.refused({"type": "eof"}, "stdin")
        s.refused({"type": "signal", "signal": "KILL"}, "signal")
        s.send({"type": "signal", "signal": 9})
        assert s.control() == {"type": "exit", "code": 137}


def test_a_shell_refuses_a_bad_size_by_its_field_and_takes_a_good_one(
    grid: Grid,  # noqa: F811
    lease: str,
) -> None:
    with _open(grid, lease, {"shell": True, "rows": 24, "cols": 80}) as s:
        s.refused({"type": "resize", "rows": 0, "cols": 80}, "rows")
        s.refused({"type": "resize", "rows": 24, "cols": "wide"}, "cols")
        s.refused({"type": "resize", "rows": 24, "cols": 1001}, "cols")
        s.send({"type": "resize", "rows": 33, "cols": 101})
        s.send(b"\x00stty size\n")
        s.output(b"33 101")
        s.send(b"\x00exit 7\n")
        assert s.control() == {"type": "exit", "code": 7}


def test_exec_stream_reports_refusals_on_stderr_and_carries_every_byte(
    grid: Grid,  # noqa: F811
    lease: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A bad frame after every chunk of megabytes echoed through `cat`: the refusals and
    # the output share the socket, and neither loses or garbles a byte of the other.
    sent = os.urandom(2 << 20)
    chunk = 64 << 10
    parts: list[bytes | dict[str, Any]] = []
    for i in range(0, len(sent), chunk):
        parts += [sent[i : i + chunk], {"type": "signal", "signal": 0}]
    got = bytearray()
    code = exec_stream(
        grid.url, grid.keys[0][1], lease, {"argv": ["cat"]},
        stdin=iter(parts), on_output=lambda fd, d: got.extend(d),
    )  # fmt: skip
    assert code == 0
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(sent) // chunk
    assert set(lines) == {"idlegrid: signal: a signal number (1-31, 34-64), got 0 (signal)"}
