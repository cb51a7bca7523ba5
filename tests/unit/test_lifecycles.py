"""Every lifecycle table: legal moves pass, illegal ones raise with their data, terminal
states have no exits, and `move` never leaves the table."""

from __future__ import annotations

from enum import StrEnum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core.lease.lifecycle import LEASE
from idlegrid.core.lifecycle import Lifecycle
from idlegrid.core.nodes import NODE
from idlegrid.core.training.lifecycle import JOB, PROBE, SEGMENT, TRAIN_AUDIT
from idlegrid.core.trust.lifecycle import AUDIT, DISPUTE, HW_PROOF, TRAIN_DISPUTE
from idlegrid.errors import Conflict, IllegalTransition

TABLES = [JOB, SEGMENT, TRAIN_AUDIT, PROBE, AUDIT, HW_PROOF, DISPUTE, TRAIN_DISPUTE, NODE, LEASE]
IDS = [t.name for t in TABLES]

# The moves each table must allow, written out once more by hand: a table that loses or
# gains a move fails here, not in an integration test.
EXPECTED = {
    "train-job": {
        ("queued", "running"),
        ("queued", "canceled"),
        ("queued", "expired"),
        ("running", "queued"),
        ("running", "trained"),
        ("running", "canceled"),
        ("running", "failed"),
        ("trained", "queued"),
        ("trained", "done"),
        ("trained", "canceled"),
    },
    "train-segment": {
        ("committed", "accepted"),
        ("committed", "failed"),
        ("committed", "discarded"),
    },
    "train-audit": {
        ("pending", "assigned"),
        ("pending", "dropped"),
        ("assigned", "pending"),
        ("assigned", "passed"),
        ("assigned", "failed"),
        ("assigned", "dropped"),
        ("failed", "overturned"),
    },
    "train-probe": {("pending", "answered"), ("pending", "failed")},
    "audit": {
        ("pending", "assigned"),
        ("assigned", "pending"),
        ("assigned", "passed"),
        ("assigned", "failed"),
        ("failed", "overturned"),
    },
    "hw-proof": {
        ("issued", "started"),
        ("issued", "expired"),
        ("started", "committed"),
        ("started", "failed"),
        ("committed", "passed"),
        ("committed", "failed"),
        ("committed", "late"),
    },
    "dispute": {
        (a, b)
        for a in ("bisecting", "awaiting-referee", "refereeing")
        for b in ("awaiting-referee", "refereeing", "won", "lost")
    }
    | {("awaiting-referee", "expired"), ("refereeing", "expired")},
    "train-dispute": {
        ("open", "awaiting-referee"),
        ("open", "won"),
        ("open", "lost"),
        ("awaiting-referee", "awaiting-referee"),
        ("awaiting-referee", "refereeing"),
        ("awaiting-referee", "won"),
        ("awaiting-referee", "lost"),
        ("awaiting-referee", "expired"),
        ("refereeing", "awaiting-referee"),
        ("refereeing", "refereeing"),
        ("refereeing", "won"),
        ("refereeing", "lost"),
        ("refereeing", "expired"),
    },
    "node": {
        ("live", "draining"),
        ("live", "gone"),
        ("draining", "live"),
        ("draining", "gone"),
        ("gone", "live"),
    },
    "lease": {
        ("pending", "provisioning"),
        ("pending", "ended"),
        ("pending", "failed"),
        ("provisioning", "running"),
        ("provisioning", "ending"),
        ("provisioning", "failed"),
        ("running", "ending"),
        ("running", "failed"),
        ("ending", "ended"),
        ("ending", "failed"),
    },
}
TERMINAL = {
    "train-job": {"done", "canceled", "failed", "expired"},
    "train-segment": {"accepted", "failed", "discarded"},
    "train-audit": {"passed", "dropped", "overturned"},
    "train-probe": {"answered", "failed"},
    "audit": {"passed", "overturned"},
    "hw-proof": {"passed", "failed", "expired", "late"},
    "dispute": {"won", "lost", "expired"},
    "train-dispute": {"won", "lost", "expired"},
    "node": set(),
    "lease": {"ended", "failed"},
}


def pairs(table: Lifecycle) -> set[tuple[str, str]]:
    return {(a, b) for a in table.moves for b in table.moves}


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_every_legal_move_passes_and_every_other_one_raises_with_its_data(table: Lifecycle) -> None:
    legal = EXPECTED[table.name]
    for start, finish in sorted(pairs(table)):
        if (start, finish) in legal:
            assert table.move(start, finish, key="k") == finish
            assert type(table.move(start, finish)) is str  # what the database stores
            continue
        with pytest.raises(IllegalTransition) as err:
            table.move(start, finish, key="row-1", story=("cause-a", "cause-b"))
        e = err.value
        assert (e.lifecycle, e.kind, e.key, e.src, e.dst, e.story) == (
            table.name,
            table.name,
            "row-1",
            start,
            finish,
            ("cause-a", "cause-b"),
        )
        assert e.data["key"] == "row-1" and e.data["src"] == start and e.data["dst"] == finish
        assert f"{table.name} row-1: {start} -> {finish}" in e.message
        assert isinstance(e, Conflict)


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_terminal_states_have_no_exits(table: Lifecycle) -> None:
    assert table.terminal == TERMINAL[table.name]
    for state in table.terminal:
        assert table.targets(state) == ()
        for finish in table.moves:
            assert not table.allowed(state, finish)
    assert set(table.live()) == set(table.moves) - table.terminal


@pytest.mark.parametrize("table", TABLES, ids=IDS)
def test_sources_are_the_in_sets_of_bulk_updates(table: Lifecycle) -> None:
    for finish in table.moves:
        assert set(table.sources(finish)) == {a for a, b in EXPECTED[table.name] if b == finish}


def test_tables_hold_exactly_the_stored_strings() -> None:
    assert JOB.live() == ("queued", "running", "trained")
    assert TRAIN_DISPUTE.live() == ("awaiting-referee", "open", "refereeing")
    assert set(DISPUTE.live()) == {"bisecting", "refereeing", "awaiting-referee"}
    assert JOB.sources("expired") == ("queued",)
    assert SEGMENT.sources("discarded") == ("committed",)
    assert HW_PROOF.sources("expired") == ("issued",)
    for table in TABLES:
        assert set(table.moves) == {s.value for s in table.states}


def test_unknown_states_are_refused_not_written() -> None:
    with pytest.raises(IllegalTransition):
        JOB.move("queued", "paused", key="j")
    with pytest.raises(IllegalTransition):
        JOB.move("paused", "queued", key="j")


def test_a_row_may_only_begin_in_an_initial_state() -> None:
    assert JOB.begin("queued", key="j") == "queued"
    assert DISPUTE.begin("bisecting") == "bisecting"
    assert TRAIN_DISPUTE.begin("open") == "open"
    with pytest.raises(IllegalTransition) as err:
        JOB.begin("running", key="j")
    assert (err.value.src, err.value.dst, err.value.key) == ("(new)", "running", "j")


def test_a_table_with_a_move_outside_its_states_is_refused() -> None:
    class S(StrEnum):
        A = "a"
        B = "b"

    class T(StrEnum):
        C = "c"

    with pytest.raises(ValueError):
        Lifecycle.of("bad", S, {S.A: {T.C}}, initial={S.A})
    with pytest.raises(ValueError):
        Lifecycle.of("bad", S, {T.C: {S.A}}, initial={S.A})
    with pytest.raises(ValueError):
        Lifecycle.of("bad", S, {S.A: {S.B}}, initial={T.C})


def test_the_http_edge_maps_an_illegal_move_to_409() -> None:
    from idlegrid.coordinator.http_errors import status_for

    with pytest.raises(IllegalTransition) as err:
        HW_PROOF.move("passed", "started", key="hw-1")
    assert status_for(err.value) == (409, "conflict_error")
    assert err.value.code == "illegal_transition"


def test_core_tasks_keeps_its_rule_api() -> None:
    from idlegrid.core.tasks import TaskState, transition

    with pytest.raises(IllegalTransition) as err:
        transition(TaskState.DONE, "claim")
    assert (err.value.kind, err.value.src, err.value.dst, err.value.key) == (
        "task",
        "done",
        "running",
        None,
    )


_ANY = st.sampled_from(sorted({s for t in TABLES for s in t.moves} | {"", "paused"}))


@given(table=st.sampled_from(TABLES), start=_ANY, finish=_ANY)
def test_move_never_returns_a_state_outside_its_table(
    table: Lifecycle, start: str, finish: str
) -> None:
    try:
        got = table.move(start, finish, key="x")
    except IllegalTransition as e:
        assert (e.src, e.dst) == (start, finish)
        assert not table.allowed(start, finish)
        return
    assert got == finish and got in table.moves and start in table.moves
    assert got in table.targets(start)


@given(table=st.sampled_from(TABLES), walk=st.lists(st.integers(0, 10), max_size=30))
def test_a_walk_of_legal_moves_stays_in_the_table(table: Lifecycle, walk: list[int]) -> None:
    state = sorted(table.initial)[0]
    for i in walk:
        ends = table.targets(state)
        if not ends:
            assert state in table.terminal
            break
        state = table.move(state, ends[i % len(ends)], key="w")
        assert state in table.moves
