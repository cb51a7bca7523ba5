"""What inference needs from other domains, as Protocols (handed in by `app.compose()`),
and the rule for who may serve paid requests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from idlegrid.core.ledger import Price
from idlegrid.core.routing import Candidate

if TYPE_CHECKING:
    from idlegrid.coordinator.views import NodeView, TaskView
    from idlegrid.core.trust.commitment import Commitment


class NodeDirectory(Protocol):
    """The node cache routing reads (the nodes domain keeps it)."""

    cache: dict[str, NodeView]

    async def seen(self, node_id: str) -> None: ...


class CommitmentChecks(Protocol):
    """Trust's checks on a provider's commitment, made before anything settles."""

    def check_commitment(
        self, task: TaskView, blob_b64: str, new_ids: list[int], finish_reason: str
    ) -> Commitment: ...

    def check_part(self, task: TaskView, blob_b64: str, new_ids: list[int]) -> Commitment: ...


class RoutingSignals(Protocol):
    """What the market has measured about providers, for per-request routing."""

    reliability: dict[str, float]
    staked_nodes: frozenset[str]
    inference_staked: frozenset[str]


class PaidWork(Protocol):
    """Trust's word on who may take paid work: unverifiable providers past their budget."""

    def paid_blocked(self, node_ids: Iterable[str]) -> frozenset[str]: ...


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
        ids &= market.inference_staked
    if ids and paid is not None:
        ids -= await db(paid.paid_blocked, sorted(ids))
    return frozenset(ids)


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
