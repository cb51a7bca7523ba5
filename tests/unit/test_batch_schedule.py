"""core/trust/schedule: a batched answer's per-token batch shapes, run-length encoded."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core.trust.schedule import Schedule, decode

shape = st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1)))


@given(st.integers(1, 512), st.lists(shape, max_size=300))
def test_a_schedule_round_trips(chunk: int, shapes: list[tuple[int, int]]) -> None:
    s = Schedule(chunk, tuple(shapes))
    blob = b"xx" + s.encode() + b"yy"
    back, end = decode(blob, 2, len(shapes))
    assert back == s and blob[end:] == b"yy"


def test_steady_batches_cost_a_few_bytes() -> None:
    s = Schedule(64, ((1, 0),) * 3 + ((4, 2),) * 60 + ((3, 1),) * 1)
    assert s.runs() == [(1, 0, 3), (4, 2, 60), (3, 1, 1)]
    assert len(s.encode()) == 4 + 3 * 4
    assert s.widest == 4


def test_malformed_schedules_are_refused() -> None:
    good = Schedule(8, ((2, 1), (2, 1))).encode()
    with pytest.raises(ValueError, match="covers 2 of 3"):
        decode(good, 0, 3)
    with pytest.raises(ValueError, match="longer"):
        decode(good, 0, 1)
    row_outside = struct.pack("<HHBBH", 8, 1, 2, 2, 1)
    with pytest.raises(ValueError, match=r"\(2, 2\) out of range"):
        decode(row_outside, 0, 1)
    with pytest.raises(ValueError, match="empty run"):
        decode(struct.pack("<HHBBH", 8, 1, 2, 0, 0), 0, 0)
    with pytest.raises(ValueError, match="chunk 0"):
        Schedule(0, ()).encode()
