"""What inference needs from other domains, as Protocols (handed in by `app.compose()`),
and the rule for who may serve paid requests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from idlegrid.core.ledger import MICRO, Price
from idlegrid.core.reservations import Reservation
from idlegrid.core.routing import Candidate

if TYPE_CHECKING:
    from idlegrid.coordinator.views import NodeView, TaskView
    from idlegrid.core.trust.commitment import Commitment
    from idlegrid.core.trust.embedding import AnyCommitment


class NodeDirectory(Protocol):
    """The node cache routing reads (the nodes domain keeps it)."""

    cache: dict[str, NodeView]

    async def seen(self, node_id: str) -> None: ...


class CommitmentChecks(Protocol):
    """Trust's checks on a provider's commitment, made before anything settles."""

    def check_commitment(
        self, task: TaskView, blob_b64: str, new_ids: list[int], finish_reason: str
    ) -> AnyCommitment: ...

    def check_part(self, task: TaskView, blob_b64: str, new_ids: list[int]) -> Commitment: ...


class RoutingSignals(Protocol):
    """What the market has measured about providers, for per-request routing."""

    reliability: dict[str, float]
    staked_nodes: frozenset[str]
    inference_staked: frozenset[str]
    reservations: tuple[Reservation, ...]  # active inference orders (core/reservations.py)

    @property
    def stale(self) -> bool: ...

    def current_book(self) -> object: ...


class PaidWork(Protocol):
    """Trust's word on who may take paid work: unverifiable providers past their budget."""

    def to_check(self, node_ids: Iterable[str]) -> list[str]: ...

    def paid_blocked(self, node_ids: Iterable[str]) -> frozenset[str]: ...

    @property
    def budget_ucr(self) -> int: ...


async def paid_ok(
    stake: int,
    market: RoutingSignals,
    paid: PaidWork | None,
    db: Callable[..., Awaitable[Any]],
    node_ids: Iterable[str],
) -> frozenset[str]:
    """Of these providers, those that may serve paid requests: staked (at least `stake`
    posted, the coordinator's `inference_stake`) and, if no independent verifier can check
    them, within their probation budget. Free requests (price 0) need neither."""
    ids = set(node_ids)
    if stake > 0:
        if market.stale:  # a stake just posted counts now, not from the market's next tick
            await db(market.current_book)
        ids &= market.inference_staked
    # Only providers that can be blocked cost a balance read (off the event loop): none while
    # every one is verifiable or the budget is unlimited, the common case on a routed request.
    if paid is not None and (check := paid.to_check(ids)):
        ids -= await db(paid.paid_blocked, check)
    return frozenset(ids)


def refusal(stake: int, market: RoutingSignals, budget: int, node_ids: Iterable[str]) -> str:
    """Why none of these live providers (all offering the model for a price) may serve a
    paid request, naming each reason that applies and how many providers it stops."""
    ids = set(node_ids)
    unstaked = {n for n in ids if stake > 0 and n not in market.inference_staked}
    spent = ids - unstaked  # paid_ok's only other rule: the probation budget
    reasons = []
    if unstaked:
        reasons.append(
            f"{_count(unstaked)} not posted the inference stake ({stake / MICRO:g} credits "
            "in its stake:<node>:<class> accounts)"
        )
    if spent:
        reasons.append(
            f"{_count(spent)} no independent verifier of its kernel family and has spent its "
            f"probation budget ({budget / MICRO:g} credits of held accrual)"
        )
    return "no provider may serve paid requests: " + "; ".join(reasons)


def _count(ids: set[str]) -> str:
    return "1 live provider has" if len(ids) == 1 else f"{len(ids)} live providers have"


async def paid_filter(
    ok: Callable[[Iterable[str]], Awaitable[frozenset[str]]],
    cands: list[Candidate],
    prices: dict[str, Price],
) -> tuple[list[Candidate], dict[str, Price]]:
    """Candidates and prices without the providers that may not serve paid requests
    (a provider at price 0 serves free requests, which need no stake)."""
    free = {n for n, p in prices.items() if not (p.prompt or p.output)}
    allowed = free | await ok(set(prices) - free)
    return [c for c in cands if c.node_id in allowed], {
        n: p for n, p in prices.items() if n in allowed
    }


def claimable(models: Iterable[str], node: NodeView | None, may_paid: bool) -> list[str]:
    """Models a polling provider may claim queued work for: all it asked for, or only
    those it serves for free when it may not take paid work."""
    if may_paid:
        return list(models)
    offers = node.offers if node is not None else {}
    return [m for m in models if m in offers and not (offers[m].prompt or offers[m].output)]
