"""core/trust/schedule: a batched answer's per-token batch shapes, run-length encoded, and
carried in the commitment header (versions 3 and 4)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import peek
from idlegrid.core.trust.adjust import Adjust
from idlegrid.core.trust.extras import Extras
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


ENTRIES = [(list(range(10)), [float(i) - 4.5 for i in range(10)])]  # k_for(5 tokens) = 10


@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("constrained", [False, True])
def test_a_commitment_carries_its_schedule_beside_extras_and_constraint(
    extras: bool, constrained: bool
) -> None:
    tokens = [5, 6, 7, 8, 9]
    sched = Schedule(64, ((1, 0), (2, 1), (4, 3), (4, 3), (3, 2)))
    more = Extras(Adjust(0.5, 0.0, ()), 0, -1) if extras else None
    con = cm.Constraint(b"g" * 32, "llguidance/1.0") if constrained else None
    c = cm.build(
        "m", "llama.cpp/x/Q4_K_M/cpu-x/t2", [1, 2, 3], 7, 0.8, 1.0, tokens,
        ENTRIES, "length", False, 4, extras=more, constraint=con,
        schedule=sched,
    )  # fmt: skip
    blob = c.encode()
    back = cm.decode(blob)
    assert back.encode() == blob  # (temperature comes back as float32)
    assert back.header.schedule == sched and back.header.constraint == con
    assert back.header.version == (4 if extras else 3)
    assert peek.peek_constrained(blob) is constrained
    # the schedule is bound by the digest: another shape is another commitment
    other = cm.build(
        "m", "llama.cpp/x/Q4_K_M/cpu-x/t2", [1, 2, 3], 7, 0.8, 1.0, tokens,
        ENTRIES, "length", False, 4, extras=more, constraint=con,
        schedule=Schedule(64, ((1, 0),) * 5),
    )  # fmt: skip
    assert other.header.digest() != c.header.digest()
    with pytest.raises(ValueError, match="5 batch shapes for 4 tokens"):
        cm.build("m", "c/v/d/x/t1", [1], 7, 0.8, 1.0, tokens[:4], [([0], [1.0])], "length",
                 False, 4, schedule=sched)  # fmt: skip
