"""Where a request goes when inference orders reserve providers (core/reservations.py),
and the price it is escrowed at: 0 per token when its owner's reservation covers it, else
the dearest price it may be served at, as for any request (split from service.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from idlegrid.core import ledger, reservations, routing
from idlegrid.core.ledger import Price
from idlegrid.errors import NoCapacity, PriceCapBelowOffers

if TYPE_CHECKING:
    from idlegrid.coordinator.inference.service import Inference


@dataclass(frozen=True)
class Routed:
    """A routed request: its first target, why, its escrow price, the providers' prices it
    may be claimed at, and the reservation covering it (its tag for the task's payload)."""

    target: routing.Candidate | None
    reason: str
    basis: Price
    prices: dict[str, Price]
    reservation: dict[str, Any] | None


def route_request(
    inf: Inference,
    key_id: str,
    model: str,
    cands: list[routing.Candidate],
    prices: dict[str, Price],
    price_cap: Price | None,
    batch: bool,
) -> Routed:
    """Route a request of `key_id` among `cands` (already cleared to serve it for pay).

    A covered request is escrowed at 0 and capped at 0, so only a provider that the
    reservation covers at claim time (or one that serves for free) can take it; it needs
    the same stake and probation checks as a paid request, which `cands` already passed."""
    now = inf.clock()
    held = inf.market.reservations
    owner = "" if batch else key_id  # batch lines have their own price and escrow
    # Only an owner's request is routed twice (covered first, else among the providers
    # within its escrow price); every other request once, as before reservations.
    mine = any(r.key_id == owner and r.model == model for r in held)
    keep = reservations.kept(held, inf.covered_at, now, inf.settings.reservation_grace_s)
    first = reservations.route(cands, held, owner, model, now, keep) if mine else None
    if first is not None and first.reservation is None:
        first = _batch_yields(inf, first, cands, held, owner, model, now)
    if first is not None and first.reservation is not None and first.target is not None:
        inf.covered_at[first.target.node_id] = now
        covered = {first.target.node_id: reservations.COVERED}
        tag = first.reservation.tag()
        return Routed(first.target, first.reason, reservations.COVERED, covered, tag)
    basis = routing.price_basis(prices, inf.market.staked_nodes, price_cap)
    if basis is None and price_cap is not None and prices:
        raise PriceCapBelowOffers(
            model,
            _credits(price_cap),
            _credits(
                Price(
                    min(p.prompt for p in prices.values()), min(p.output for p in prices.values())
                )
            ),
        )
    if basis is None:
        raise NoCapacity(model, "no live provider")
    # Escrow at the dearest price the request may be served at, so that whoever serves
    # it is covered; only providers at or below that price may claim it.
    cands = [c for c in cands if routing.within(prices[c.node_id], basis)]
    second = reservations.route(cands, held, owner, model, now, keep)
    if batch or second.target is not None:
        return Routed(second.target, second.reason, basis, prices, None)
    # Every provider is busy: one running a batch line makes room (docs/batch.md), tried
    # in the order this request tries providers (a provider its owner keeps is not).
    tried = reservations.order(cands, held, owner, model, now, keep)
    runner = inf.hub.batch_runner([c.node_id for c in tried])
    target = next((c for c in tried if c.node_id == runner), None)
    why = f"{second.reason}; a batch line on this one yields its slot" if target else second.reason
    return Routed(target, why, basis, prices, None)


def _credits(price: Price) -> dict[str, float]:
    """A price in credits per 1M tokens, as a request's `max_price` gives it."""
    return {"prompt": price.prompt / ledger.MICRO, "output": price.output / ledger.MICRO}


def _batch_yields(
    inf: Inference,
    fallback: reservations.Route,
    cands: list[routing.Candidate],
    held: tuple[reservations.Reservation, ...],
    owner: str,
    model: str,
    now: float,
) -> reservations.Route:
    """The owner's reserved providers are all busy: if one runs a batch line, that line
    yields its slot (docs/batch.md) and the request stays covered there instead of falling
    back; batch work on a reserved provider was only ever spare capacity."""
    mine = [r for r in held if r.key_id == owner and r.model == model]
    own = [c for c in cands if any(r.covers(c.node_id, now) for r in mine)]
    runner = inf.hub.batch_runner([c.node_id for c in routing.rank(own)])
    if runner is None:
        return fallback
    target = next(c for c in own if c.node_id == runner)
    res = next(r for r in mine if r.covers(runner, now))
    why = f"reserved by order {res.order_id}: busy, a batch line there yields its slot"
    return reservations.Route(target, why, res)
