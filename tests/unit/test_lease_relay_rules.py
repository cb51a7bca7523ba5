"""The pure rules of lease relays: credit windows, paths confined to /work, workspace
limits read from an order, and lease frames on the wire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core.lease.flow import CreditExceeded, Window, chunks_within
from idlegrid.core.lease.paths import confine
from idlegrid.core.lease.spec import workspace_spec
from idlegrid.errors import InvalidRequest
from idlegrid.protocol.lease import LeaseFrame, frame


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


def test_lease_frames_carry_bytes_and_drop_unused_fields() -> None:
    wire = frame("out", "L1", exec="ex_1", stream="stdout", data=b"\x00\xff")
    assert set(wire) == {"op", "v", "type", "lease", "exec", "stream", "data"}
    back = LeaseFrame.model_validate(wire)
    assert back.payload() == b"\x00\xff"
    credit = LeaseFrame.model_validate(frame("credit", "L1", exec="ex_1", bytes=7))
    assert credit.size == 7
    with pytest.raises(ValueError):
        LeaseFrame.model_validate({**wire, "surprise": 1})
