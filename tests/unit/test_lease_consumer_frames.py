"""The consumer's frames on an exec WebSocket (core/lease/consumer_frames.py): what each
asks for, and every malformed one refused naming its field, as a non-fatal 400; the
client's reading of error frames (fatal ends, non-fatal is reported and goes on)."""

from __future__ import annotations

import json

import pytest

from idlegrid.client.lease_cmd import LeaseError, _control
from idlegrid.core.lease.consumer_frames import (
    Eof,
    Refused,
    Resize,
    Signal,
    Stdin,
    parse_control,
)


def _text(obj: object) -> str:
    return json.dumps(obj)


def test_valid_frames_ask_for_what_they_say() -> None:
    assert parse_control(b"\x00hi", stdin=True, shell=False) == Stdin(b"hi")
    assert parse_control(b"\x00", stdin=True, shell=False) == Stdin(b"")
    assert parse_control(_text({"type": "eof"}), stdin=True, shell=False) == Eof()
    assert parse_control(_text({"type": "signal", "signal": 15}), stdin=False, shell=False) == (
        Signal(15)
    )
    for sig in (1, 9, 31, 34, 64):
        assert parse_control(_text({"type": "signal", "signal": sig}), stdin=False, shell=False)
    resize = {"type": "resize", "rows": 33, "cols": 101}
    assert parse_control(_text(resize), stdin=True, shell=True) == Resize(33, 101)


@pytest.mark.parametrize(
    ("frame", "stdin", "shell", "param"),
    [
        ("not json", True, False, "frame"),
        ("", True, False, "frame"),
        ("[1, 2]", True, False, "frame"),
        ('"eof"', True, False, "frame"),
        (b"\x07abc", True, False, "frame"),
        (b"", True, False, "frame"),
        (b"\x01out", True, False, "frame"),
        (_text({"type": "bogus"}), True, False, "type"),
        (_text({"signal": 9}), True, False, "type"),
        (_text({"type": "resize", "rows": 10, "cols": 10}), True, False, "type"),
        (_text({"type": "signal", "signal": "KILL"}), True, False, "signal"),
        (_text({"type": "signal", "signal": 0}), True, False, "signal"),
        (_text({"type": "signal", "signal": -3}), True, False, "signal"),
        (_text({"type": "signal", "signal": 999}), True, False, "signal"),
        (_text({"type": "signal", "signal": 32}), True, False, "signal"),
        (_text({"type": "signal", "signal": True}), True, False, "signal"),
        (_text({"type": "signal", "signal": 9.0}), True, False, "signal"),
        (_text({"type": "signal"}), True, False, "signal"),
        (_text({"type": "resize", "rows": 0, "cols": 80}), True, True, "rows"),
        (_text({"type": "resize", "rows": True, "cols": 80}), True, True, "rows"),
        (_text({"type": "resize", "cols": 80}), True, True, "rows"),
        (_text({"type": "resize", "rows": 24, "cols": "wide"}), True, True, "cols"),
        (_text({"type": "resize", "rows": 24, "cols": 1001}), True, True, "cols"),
        (_text({"type": "eof"}), False, False, "stdin"),
        (b"\x00late", False, False, "stdin"),
    ],
)
def test_a_malformed_frame_is_refused_naming_its_field(
    frame: str | bytes, stdin: bool, shell: bool, param: str
) -> None:
    got = parse_control(frame, stdin=stdin, shell=shell)
    assert isinstance(got, Refused), got
    assert got.param == param
    assert got.message.startswith(f"{param}:") or param in got.message
    answer = got.frame()
    assert answer == {
        "type": "error",
        "status": 400,
        "message": got.message,
        "param": param,
        "fatal": False,
    }
    json.dumps(answer)  # it goes on the wire as it is


def test_stdin_refusals_say_whether_it_was_closed_or_never_opened() -> None:
    closed = parse_control(b"\x00x", stdin=False, shell=False, opened=True)
    never = parse_control(b"\x00x", stdin=False, shell=False, opened=False)
    assert isinstance(closed, Refused) and "eof" in closed.message
    assert isinstance(never, Refused) and "without stdin" in never.message


def test_the_client_reports_a_non_fatal_error_and_ends_on_a_fatal_one() -> None:
    seen: list[str] = []
    refused = Refused("signal: a signal number (1-31, 34-64), got 0", "signal").frame()
    assert _control(json.dumps(refused), seen.append) is None
    assert seen == ["signal: a signal number (1-31, 34-64), got 0 (signal)"]
    lost = {"type": "error", "status": 502, "message": "gone", "param": None, "fatal": True}
    with pytest.raises(LeaseError) as exc:
        _control(json.dumps(lost), seen.append)
    assert exc.value.status == 502
    legacy = {"type": "error", "status": 502, "message": "gone", "param": None}
    with pytest.raises(LeaseError):  # an older coordinator's error frame ends, as it did
        _control(json.dumps(legacy), seen.append)
    assert _control(json.dumps({"type": "exit", "code": 3}), seen.append) == 3
    assert len(seen) == 1
