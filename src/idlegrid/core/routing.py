"""Which provider takes a request: least-loaded first, then cheapest, then fastest. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A live provider that serves the requested model, as the router sees it."""

    node_id: str
    in_flight: int  # tasks it holds or has been handed and not finished
    slots: int  # requests it serves at once
    output_price: int  # µcr per 1M output tokens
    decode_tps: float  # measured at start-up

    @property
    def load(self) -> float:
        """Fraction of its slots in use (may exceed 1 when work queues on it)."""
        return self.in_flight / max(self.slots, 1)

    @property
    def has_free_slot(self) -> bool:
        """Whether it can start one more request right now."""
        return self.in_flight < self.slots


def rank(candidates: Iterable[Candidate], exclude: frozenset[str] = frozenset()) -> list[Candidate]:
    """Candidates best first: lowest load, then lowest price, then highest speed, then id."""
    pool = [c for c in candidates if c.node_id not in exclude]
    return sorted(pool, key=lambda c: (c.load, c.output_price, -c.decode_tps, c.node_id))


def choose(
    candidates: Iterable[Candidate], exclude: frozenset[str] = frozenset()
) -> Candidate | None:
    """The provider a new request goes to, or None when every one is busy or excluded.

    None does not refuse the request: it waits in the model's shared queue for the first
    provider that frees a slot, which keeps every provider busy under load.
    """
    for c in rank(candidates, exclude):
        if c.has_free_slot:
            return c
    return None
