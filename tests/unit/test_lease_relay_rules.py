"""The pure rules of lease relays: credit windows, paths confined to /work, workspace
limits read from an order, and lease frames on the wire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core.lease.flow import CreditExceeded, Owed, Window, chunks_within, credit_batch
from idlegrid.core.lease.paths import confine
from idlegrid.core.lease.spec import workspace_spec
from idlegrid.errors import InvalidRequest
from idlegrid.protocol.lease import (
    STDERR,
    STDIN,
    STDOUT,
    BadDataFrame,
    LeaseFrame,
    data_frame,
    frame,
    is_data,
    read_data,
    read_frame,
)


def test_a_window_refuses_bytes_past_its_credit_and_reopens_as_credit_returns() -> None:
    w = Window(100).sent(60)
    assert w.room == 40
    with pytest.raises(CreditExceeded):
        w.sent(41)
    assert w.credited(50).room == 90
    assert w.credited(500).in_flight == 0  # a late, generous credit never goes negative
    with pytest.raises(CreditExceeded):
        w.credited(-1)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5000)), max_size=200))
def test_in_flight_never_exceeds_the_limit_whatever_the_order(
    steps: list[tuple[bool, int]],
) -> None:
    w = Window(4096)
    for send, n in steps:
        if send:
            part, _rest = chunks_within(b"x" * n, w.room, 1024)
            w = w.sent(len(part))
        else:
            w = w.credited(n)
        assert 0 <= w.in_flight <= w.limit


@pytest.mark.parametrize(
    "path,expected",
    [("/work", "/work"), ("/work/a/b", "/work/a/b"), ("data", "/work/data"), ("./x", "/work/x")],
)
def test_paths_inside_work_are_kept(path: str, expected: str) -> None:
    assert confine(path) == expected


@pytest.mark.parametrize("path", ["/work/../etc", "../x", "/etc/passwd", "/workx", "a/../../b", ""])
def test_paths_leaving_work_are_refused_naming_the_field(path: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        confine(path)
    assert exc.value.param == "path"


def test_workspace_limits_follow_the_order_or_modest_defaults() -> None:
    spec = workspace_spec({"cpus": ">=2.0", "ram_gb": "4+"})
    assert (spec["cpus"], spec["memory_bytes"]) == (2.0, 4 << 30)
    assert workspace_spec({})["disk_bytes"] == 4 << 30
    with pytest.raises(InvalidRequest):
        workspace_spec({"cpus": "lots"})


def test_lease_control_frames_drop_unused_fields_and_refuse_unknown_ones() -> None:
    wire = frame("exit", "L1", exec="ex_00ff00ff00ff00ff", code=3, bytes=10)
    assert set(wire) == {"op", "v", "type", "lease", "exec", "code", "bytes"}
    back = LeaseFrame.model_validate(wire)
    assert (back.code, back.size) == (3, 10)
    with pytest.raises(ValueError):
        LeaseFrame.model_validate({**wire, "surprise": 1})
    with pytest.raises(ValueError):  # an exec id a data frame could not carry
        LeaseFrame.model_validate({**wire, "exec": "ex_1"})


@given(st.binary(max_size=3000), st.sampled_from([STDIN, STDOUT, STDERR]))
def test_data_frames_carry_raw_bytes_and_their_exec(payload: bytes, stream: int) -> None:
    raw = data_frame("ex_0123456789abcdef", stream, payload)
    assert is_data(raw) and len(raw) == 10 + len(payload)  # no base64, no JSON
    assert not is_data(b"1700000000.000 nonce sig\n{}") and not is_data(b'{"op":"lease"}')
    exec_id, got_stream, got = read_data(raw)
    assert (exec_id, got_stream, bytes(got)) == ("ex_0123456789abcdef", stream, payload)


@given(st.binary(max_size=3000), st.sampled_from([STDOUT, STDERR]))
def test_a_data_frame_from_byte_9_is_the_consumers_frame_as_is(payload: bytes, stream: int) -> None:
    # Version 3: the coordinator passes a view of the agent's frame on (no re-framing copy);
    # the consumer's WebSocket frame is 0x01 (stdout) or 0x02 (stderr), then the bytes.
    raw = data_frame("ex_0123456789abcdef", stream, payload)
    exec_id, got_stream, framed = read_frame(raw)
    assert (exec_id, got_stream) == ("ex_0123456789abcdef", stream)
    assert bytes(framed) == bytes([stream]) + payload
    assert framed.obj is raw  # a view of the frame that arrived, not a copy


def test_a_version_2_data_frame_is_refused() -> None:
    # v2 put the stream second under mark 0xB2: read as v3 it would name another exec.
    v2 = bytes([0xB2, STDOUT]) + bytes.fromhex("0123456789abcdef") + b"payload"
    assert not is_data(v2)
    with pytest.raises(BadDataFrame):
        read_frame(v2)


@pytest.mark.parametrize(
    "raw", [b"", b"\xb3\x01", b"\xb3" + bytes(8) + b"\x07", b"\xb2" + bytes(12), b"{" + bytes(12)]
)
def test_what_is_not_a_data_frame_is_refused(raw: bytes) -> None:
    with pytest.raises(BadDataFrame):
        read_data(raw)


@given(st.integers(4, 1 << 20), st.lists(st.integers(0, 1 << 18), max_size=100))
def test_batched_credit_never_holds_back_a_batch_or_invents_bytes(
    window: int, passed: list[int]
) -> None:
    owed, credited = Owed(credit_batch(window)), 0
    for n in passed:
        owed, due = owed.passed(n)
        assert due == 0 or due >= owed.batch
        credited += due
        assert owed.owed < owed.batch <= window // 2  # the no-stall condition
    assert credited + owed.owed == sum(passed)
