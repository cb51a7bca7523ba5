"""A lifecycle as a table: its states, the moves between them, where it starts. Pure.

    JOB.move("queued", "running", key=job.id)   -> "running"
    JOB.move("done", "running", key=job.id)     -> IllegalTransition (a 409 at the edge)
    JOB.sources("expired")                      -> ("queued",): for `state.in_(...)` updates

Every stored state string of the coordinator belongs to one of these tables
(`core/training/lifecycle.py`, `core/trust/lifecycle.py`, `core/nodes.py`; inference tasks
and market orders keep their named rules in `core/tasks.py` and `core/market/orders.py`).
`move` returns the plain string that the database stores, never an enum member, so a
value written through it reads back equal on every driver.

A state that moves to itself is a move like any other: listed when it is allowed (a
dispute that re-enters `refereeing` with another referee), refused otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from idlegrid.errors import IllegalTransition


@dataclass(frozen=True)
class Lifecycle:
    """One lifecycle: a name, its states, its allowed moves and its initial states."""

    name: str
    states: type[StrEnum]
    moves: Mapping[str, frozenset[str]] = field(repr=False)
    initial: frozenset[str]

    @classmethod
    def of(
        cls,
        name: str,
        states: type[StrEnum],
        moves: Mapping[StrEnum, Iterable[StrEnum]],
        initial: Iterable[StrEnum],
    ) -> Lifecycle:
        """Build a table; a move to or from a state outside `states` is a bug here."""
        names = {s.value for s in states}
        table = {s.value: frozenset(str(f) for f in moves.get(s, ())) for s in states}
        for src in moves:
            if str(src) not in names:
                raise ValueError(f"{name}: {src} is not one of its states")
        for start, ends in table.items():
            if not ends <= names:
                raise ValueError(f"{name}: {start} moves to unknown {sorted(ends - names)}")
        init = frozenset(str(s) for s in initial)
        if not init <= names:
            raise ValueError(f"{name}: unknown initial states {sorted(init - names)}")
        return cls(name, states, table, init)

    @property
    def terminal(self) -> frozenset[str]:
        """States with no way out."""
        return frozenset(s for s, ends in self.moves.items() if not ends)

    def allowed(self, start: str, finish: str) -> bool:
        """Whether the table has the move `start -> finish`."""
        return finish in self.moves.get(str(start), frozenset())

    def move(
        self, start: str, finish: str, *, key: str | None = None, story: Iterable[str] = ()
    ) -> str:
        """The new state (as stored), or IllegalTransition carrying every detail."""
        if not self.allowed(start, finish):
            raise IllegalTransition(self.name, str(start), str(finish), key=key, story=tuple(story))
        return str(finish)

    def begin(self, state: str, *, key: str | None = None) -> str:
        """The state a new row starts in; IllegalTransition if it may not start there."""
        if str(state) not in self.initial:
            raise IllegalTransition(self.name, "(new)", str(state), key=key)
        return str(state)

    def sources(self, *finish: str) -> tuple[str, ...]:
        """Every state that may move to one of `finish` (sorted): the `in_` set of a bulk
        update that moves rows there."""
        return tuple(sorted(s for s, ends in self.moves.items() if ends & set(map(str, finish))))

    def targets(self, start: str) -> tuple[str, ...]:
        """Every state `start` may move to (sorted)."""
        return tuple(sorted(self.moves.get(str(start), frozenset())))

    def live(self) -> tuple[str, ...]:
        """Every state that is not terminal (sorted)."""
        return tuple(sorted(set(self.moves) - self.terminal))
