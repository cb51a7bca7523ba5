"""Inference reservations in per-request routing. Pure.

An active `inference` order reserves its placed providers for one consumer (its API key)
and one model until the order ends. The gateway routes that consumer's requests to them
first; a request they serve inside the order's period is covered by the order's accrual,
not charged per token (docs/market.md, "Reservations"). Everyone else gets the reserved
providers as spare capacity only: they are tried after every unreserved provider, so a
reserved provider takes another consumer's request only when nothing else has a free slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from idlegrid.core import routing
from idlegrid.core.ledger import Price
from idlegrid.core.routing import Candidate

COVERED = Price(0, 0)  # what a covered request is escrowed and settled at per token


@dataclass(frozen=True)
class Reservation:
    """One active inference order as routing sees it."""

    order_id: str
    key_id: str  # the consumer that owns the order
    model: str
    nodes: frozenset[str]  # its placed providers
    until: float  # the end of its active period (clock seconds)

    def covers(self, node_id: str, now: float) -> bool:
        """Whether a request served by `node_id` at `now` is inside this reservation."""
        return node_id in self.nodes and now < self.until

    def tag(self) -> dict[str, Any]:
        """How a covered request carries it (the task's payload, read at claim and SLO)."""
        return {"order": self.order_id, "nodes": sorted(self.nodes), "until": self.until}


@dataclass(frozen=True)
class Route:
    """Where a request goes and why; `reservation` is set when it is covered by one."""

    target: Candidate | None
    reason: str
    reservation: Reservation | None = None


def of_order(
    order_id: str,
    key_id: str,
    body: Mapping[str, Any],
    placement: Mapping[str, Any] | None,
    ends_at: float | None,
) -> Reservation | None:
    """The reservation an active order makes: only placed inference orders make one."""
    if body.get("kind") != "inference" or not placement or ends_at is None:
        return None
    nodes = frozenset(str(leg["provider"]) for leg in placement.get("legs", ()))
    model = body.get("model")
    if not nodes or not isinstance(model, str):
        return None
    return Reservation(order_id, key_id, model, nodes, float(ends_at))


def covered(tag: Mapping[str, Any] | None, node_id: str, now: float) -> bool:
    """Whether a task carrying reservation `tag` is covered when `node_id` serves it now."""
    if not tag:
        return False
    return node_id in tag.get("nodes", ()) and now < float(tag.get("until", 0.0))


def held(
    reservations: Iterable[Reservation], model: str, now: float
) -> dict[str, tuple[Reservation, ...]]:
    """Providers reserved for `model` now, each with the reservations that hold it."""
    out: dict[str, tuple[Reservation, ...]] = {}
    for r in reservations:
        if r.model == model and now < r.until:
            for n in r.nodes:
                out[n] = (*out.get(n, ()), r)
    return out


def kept(
    reservations: Iterable[Reservation],
    last_covered: Mapping[str, float],
    now: float,
    grace_s: float,
) -> frozenset[str]:
    """Reserved providers that are not spare now: their owner's covered work was routed
    to them or finished there within `grace_s`. Other consumers are not routed to them,
    and they claim only covered work from the queue.

    An owner sending one request after another leaves its provider idle for a round trip
    between them; other consumers' work filling that gap made most of the owner's requests
    fall back under load (bench/bench_reservations.py: 20% covered without the grace)."""
    reserved = {n for r in reservations if now < r.until for n in r.nodes}
    return frozenset(n for n, t in last_covered.items() if n in reserved and now - t < grace_s)


def order(
    candidates: Iterable[Candidate],
    reservations: Iterable[Reservation],
    key_id: str,
    model: str,
    now: float,
    keep: AbstractSet[str] = frozenset(),
) -> list[Candidate]:
    """Candidates in the order a request of `key_id` tries them: its own reserved providers
    first, then unreserved ones, then providers reserved by others (spare capacity) unless
    their owner keeps them (`keep`, see `kept`); each group ranked as `routing.rank` ranks."""
    holders = held(reservations, model, now)
    groups: tuple[list[Candidate], list[Candidate], list[Candidate]] = ([], [], [])
    for c in candidates:
        owners = {r.key_id for r in holders.get(c.node_id, ())}
        if c.node_id in keep and key_id not in owners:
            continue
        groups[0 if key_id in owners else 2 if owners else 1].append(c)
    return [c for g in groups for c in routing.rank(g)]


def route(
    candidates: Iterable[Candidate],
    reservations: Iterable[Reservation],
    key_id: str,
    model: str,
    now: float,
    keep: AbstractSet[str] = frozenset(),
) -> Route:
    """The provider a request of `key_id` goes to, why, and the reservation covering it.

    The requester's own reserved provider with a free slot wins; if none is live or free
    the request falls back to ordinary routing (charged per token), and the reason says so.
    Providers in `keep` (see `kept`) serve only their owners.
    """
    holders = held(reservations, model, now)
    pool = [
        c
        for c in candidates
        if c.node_id not in keep or any(r.key_id == key_id for r in holders.get(c.node_id, ()))
    ]
    mine = [r for r in reservations if r.key_id == key_id and r.model == model and now < r.until]
    own = [c for c in pool if any(r in mine for r in holders.get(c.node_id, ()))]
    if own and (target := routing.choose(own)) is not None:
        res = next(r for r in mine if r.covers(target.node_id, now))
        return Route(
            target, f"reserved by order {res.order_id}: {routing.reason(own, target)}", res
        )
    ordered = order(pool, reservations, key_id, model, now, keep)
    target = next((c for c in ordered if c.has_free_slot), None)
    spare = target is not None and any(r.key_id != key_id for r in holders.get(target.node_id, ()))
    unreserved = [c for c in pool if c.node_id not in holders]
    why = routing.reason(unreserved if target and not spare else pool, target)
    if spare:
        why = f"spare capacity of a reserved provider: {why}"
    if mine:
        ids = ", ".join(sorted(r.order_id for r in mine))
        state = "busy" if own else "unavailable (not live, or not cleared for paid work)"
        why = f"fallback, reserved provider(s) of order {ids} {state}, charged per token: {why}"
    return Route(target, why, None)
