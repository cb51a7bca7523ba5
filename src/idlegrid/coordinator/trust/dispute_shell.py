"""The one dispute shell: a provider contests a failed audit, whatever kind of work it was.

The shell knows nothing of either game's rules. It holds one `DisputeGame` per kind
("inference": `trust/disputes.py`, bisection over committed chunks; "training":
`training/disputes.py`, the replayed game of `core/training/dispute.py`); `app.compose()`
registers both. It opens a dispute with the game of the kind asked for, sends a query or an
answer to the game whose id prefix the dispute carries (`dsp-`, `tdsp-`), gathers the rounds
a node must answer (each tagged with its kind) for the heartbeat, ticks every game, and
lists disputes of every kind in one list. The seats (provider, challenger, referee), turns
and deadlines both games share are `core/disputes.py`'s. All of it runs in `ctx.db`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from idlegrid.core.disputes import KINDS
from idlegrid.errors import InvalidRequest, NotFound


class DisputeGame(Protocol):
    """One kind of dispute: its rules, its table, its consequences."""

    kind: str  # "inference" | "training"
    prefix: str  # every dispute id of this kind starts with it
    active: bool  # False while none is open: heartbeats skip the lookup

    def open(self, provider_id: str, audit_id: str, reason: str) -> dict[str, Any]:
        """Contest a failed audit of the provider's own work; the dispute's view."""
        ...

    def pending(self, node_id: str) -> list[dict[str, Any]]:
        """Rounds this node must answer now: id, round, role."""
        ...

    def query(self, node_id: str, dispute_id: str, round_: int) -> dict[str, Any]:
        """What the current round asks of the calling seat."""
        ...

    def answer(
        self, node_id: str, dispute_id: str, round_: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        """One seat's answer for the current round; the dispute's view."""
        ...

    def tick(self, live: frozenset[str]) -> None:
        """Settle rounds past their deadline; find referees."""
        ...

    def listing(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Every dispute of this kind (or one node's, in any seat), newest first."""
        ...


class DisputeShell:
    """Open, route, tick and list disputes of every kind."""

    def __init__(self, games: Iterable[DisputeGame]) -> None:
        self.games = {g.kind: g for g in games}
        assert set(self.games) <= set(KINDS), self.games

    @property
    def active(self) -> bool:
        """Whether any game has a dispute open."""
        return any(g.active for g in self.games.values())

    def game(self, kind: str) -> DisputeGame:
        """The game of `kind` (400 naming `kind` for any other)."""
        got = self.games.get(kind)
        if got is None:
            raise InvalidRequest(
                f"kind must be one of {', '.join(sorted(self.games))}, not {kind!r}", param="kind"
            )
        return got

    def of(self, dispute_id: str) -> DisputeGame:
        """The game a dispute id belongs to (404 when none does)."""
        for g in self.games.values():
            if dispute_id.startswith(g.prefix):
                return g
        raise NotFound(f"no dispute {dispute_id}")

    def open(self, kind: str, provider_id: str, audit_id: str, reason: str) -> dict[str, Any]:
        """Contest a failed audit of the caller's own work, of `kind`."""
        return self.game(kind).open(provider_id, audit_id, reason)

    def pending(self, node_id: str) -> list[dict[str, Any]]:
        """Rounds of every kind this node must answer now (they ride on its heartbeat)."""
        return [
            {**q, "kind": g.kind}
            for g in self.games.values()
            if g.active
            for q in g.pending(node_id)
        ]

    def query(self, node_id: str, dispute_id: str, round_: int) -> dict[str, Any]:
        """What the current round of a dispute asks of the calling node."""
        return self.of(dispute_id).query(node_id, dispute_id, round_)

    def answer(
        self, node_id: str, dispute_id: str, round_: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        """A seat's answer for the current round of a dispute."""
        return self.of(dispute_id).answer(node_id, dispute_id, round_, body)

    def tick(self, live: frozenset[str]) -> None:
        """Each game settles its late rounds and finds its referees."""
        for g in self.games.values():
            g.tick(live)

    def listing(self, node_id: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Disputes of every kind (or one), of every node (or one), newest first."""
        games = [self.game(kind)] if kind is not None else list(self.games.values())
        out = [d for g in games for d in g.listing(node_id)]
        return sorted(out, key=lambda d: d["created_at"], reverse=True)
