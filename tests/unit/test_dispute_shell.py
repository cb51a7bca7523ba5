"""The one dispute shell over two scripted games: kinds, routing by id, one listing, the
heartbeat's pending rounds; and the seats and turns both games share (core/disputes.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from idlegrid.coordinator.trust.dispute_shell import DisputeShell
from idlegrid.core import disputes as seats
from idlegrid.errors import Conflict, InvalidRequest, NotFound


@dataclass
class ScriptedGame:
    """A game that records what the shell hands it and answers from a script."""

    kind: str
    prefix: str
    active: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def open(self, provider_id: str, audit_id: str, reason: str) -> dict[str, Any]:
        self.calls.append(("open", provider_id, audit_id, reason))
        return {"id": f"{self.prefix}{audit_id}", "kind": self.kind}

    def pending(self, node_id: str) -> list[dict[str, Any]]:
        return [
            {"id": r["id"], "round": 1, "role": seats.CHALLENGER}
            for r in self.rows
            if r["node"] == node_id
        ]

    def query(self, node_id: str, dispute_id: str, round_: int) -> dict[str, Any]:
        self.calls.append(("query", node_id, dispute_id, round_))
        return {"dispute_id": dispute_id}

    def answer(
        self, node_id: str, dispute_id: str, round_: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append(("answer", node_id, dispute_id, round_, body))
        return {"id": dispute_id}

    def tick(self, live: frozenset[str]) -> None:
        self.calls.append(("tick", live))

    def listing(self, node_id: str | None = None) -> list[dict[str, Any]]:
        return [
            {**r, "kind": self.kind}
            for r in sorted(self.rows, key=lambda r: -r["created_at"])
            if node_id in (None, r["node"])
        ]


def shell() -> tuple[DisputeShell, ScriptedGame, ScriptedGame]:
    inf = ScriptedGame(
        "inference",
        "dsp-",
        rows=[
            {"id": "dsp-1", "node": "a", "created_at": 1.0},
            {"id": "dsp-3", "node": "b", "created_at": 3.0},
        ],
    )
    train = ScriptedGame(
        "training", "tdsp-", rows=[{"id": "tdsp-2", "node": "a", "created_at": 2.0}]
    )
    return DisputeShell([inf, train]), inf, train


def test_one_listing_shows_both_kinds_newest_first() -> None:
    sh, _, _ = shell()
    assert [(d["id"], d["kind"]) for d in sh.listing()] == [
        ("dsp-3", "inference"),
        ("tdsp-2", "training"),
        ("dsp-1", "inference"),
    ]
    assert [d["id"] for d in sh.listing("a")] == ["tdsp-2", "dsp-1"]
    assert [d["id"] for d in sh.listing(kind="training")] == ["tdsp-2"]
    with pytest.raises(InvalidRequest) as err:
        sh.listing(kind="bogus")
    assert err.value.param == "kind"


def test_open_dispatches_by_kind_and_a_bad_kind_names_kind() -> None:
    sh, inf, train = shell()
    assert sh.open("training", "p", "taud-9", "why")["id"] == "tdsp-taud-9"
    assert train.calls == [("open", "p", "taud-9", "why")] and inf.calls == []
    with pytest.raises(InvalidRequest) as err:
        sh.open("weather", "p", "aud-1", "")
    assert err.value.param == "kind" and "weather" in err.value.message


def test_queries_and_answers_go_to_the_game_the_id_names() -> None:
    sh, inf, train = shell()
    sh.query("a", "tdsp-2", 1)
    sh.answer("a", "dsp-1", 2, {"report": ""})
    assert train.calls == [("query", "a", "tdsp-2", 1)]
    assert inf.calls == [("answer", "a", "dsp-1", 2, {"report": ""})]
    with pytest.raises(NotFound):
        sh.query("a", "nothing-1", 1)


def test_pending_rounds_carry_their_kind_and_idle_games_are_skipped() -> None:
    sh, inf, train = shell()
    assert sh.pending("a") == [
        {"id": "dsp-1", "round": 1, "role": "challenger", "kind": "inference"},
        {"id": "tdsp-2", "round": 1, "role": "challenger", "kind": "training"},
    ]
    inf.active = False
    assert sh.active and [q["kind"] for q in sh.pending("a")] == ["training"]
    train.active = False
    assert not sh.active and sh.pending("a") == []
    sh.tick(frozenset({"a"}))
    assert inf.calls == train.calls == [("tick", frozenset({"a"}))]


@dataclass
class Row:
    id: str = "dsp-1"
    round: int = 2
    state: str = "bisecting"
    provider_id: str = "p"
    verifier_id: str = "v"
    referee_id: str | None = None


def test_seats_turns_and_deadlines() -> None:
    row = Row()
    waiting = [seats.PROVIDER, seats.CHALLENGER]
    assert seats.party(row, seats.CHALLENGER) == "v" and seats.party(row, "x") is None
    assert seats.asked(row, waiting, "v") == [{"id": "dsp-1", "round": 2, "role": "challenger"}]
    assert seats.seat(row, waiting, "p", 2, ("bisecting",)) == "provider"
    for node, round_, answering in (
        ("p", 1, ("bisecting",)),
        ("r", 2, ("bisecting",)),
        ("p", 2, ("refereeing",)),
    ):
        with pytest.raises(Conflict):
            seats.seat(row, waiting, node, round_, answering)
    seats.in_time("dsp-1", 2, deadline=10.0, now=10.0)
    with pytest.raises(Conflict, match="past its deadline"):
        seats.in_time("dsp-1", 2, deadline=10.0, now=10.5)
    assert seats.unb64({"report": "AAE="}, "report") == b"\x00\x01"
    with pytest.raises(InvalidRequest) as err:
        seats.unb64({"record": "not base64!"}, "record")
    assert err.value.param == "record"
