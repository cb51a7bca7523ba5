"""Who may serve a request now: live providers of a model, their load, prices and
reliability (split from service.py to keep it readable in one sitting)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from idlegrid.core import routing
from idlegrid.core.batch.money import batch_price, provider_share
from idlegrid.core.ledger import Price

if TYPE_CHECKING:
    from idlegrid.coordinator.inference.service import Inference
    from idlegrid.coordinator.views import NodeView


def live_candidates(
    inf: Inference, model: str, prompt_tokens: int = 0, max_tokens: int = 1
) -> tuple[list[routing.Candidate], dict[str, Price]]:
    """Live providers of `model` with their load (from the hub), prices and reliability."""
    cutoff = inf.clock() - inf.settings.node_timeout_s
    busy = in_flight(inf)
    live = [
        n
        for n in inf.nodes.cache.values()
        if n.live_since(cutoff) and model in n.offers and n.id not in inf.ctx.ejected
    ]
    rel = inf.market.reliability
    cands = [
        routing.Candidate(
            n.id,
            busy.get(n.id, 0),
            n.slots,
            n.offers[model].output,
            n.decode_tps,
            n.offers[model].prompt,
            rel.get(n.id, 1.0),
            prompt_tokens,
            max_tokens,
            inf.hub.routed.get(n.id, 0),
        )
        for n in live
    ]
    return cands, {n.id: n.offers[model] for n in live}


def in_flight(inf: Inference) -> dict[str, int]:
    """Per node, the tasks it holds or has been handed and not finished."""
    busy: dict[str, int] = {}
    for stream in inf.hub.streams.values():
        holder = stream.node_id if stream.attempt > 0 else stream.target
        if holder:
            busy[holder] = busy.get(holder, 0) + 1
    return busy


def unrouted(inf: Inference) -> int:
    """Tasks waiting in the shared queue: routed to no provider, claimed by none."""
    return sum(1 for s in inf.hub.streams.values() if s.attempt == 0 and s.target is None)


def batch_slots(node: NodeView) -> int:
    """How many of a node's slots batch lines may hold: all but its engine's headroom,
    the sequences it keeps for interactive work (a continuous-batching engine takes one
    more sequence at little cost, so an interactive request there waits for no line to
    yield: docs/batch.md)."""
    headroom = node.engine.get("headroom") if isinstance(node.engine, dict) else 0
    return max(1, node.slots - (headroom if isinstance(headroom, int) else 0))


def for_batch(
    inf: Inference,
    cands: list[routing.Candidate],
    prices: dict[str, Price],
    share_bps: int | None,
) -> tuple[list[routing.Candidate], dict[str, Price]]:
    """The candidates of a batch line at their batch prices (core/batch/money.py: each
    provider's own share of its offer, else `share_bps`); those that take no batch work
    dropped."""
    nodes = inf.nodes.cache
    # A claim under way fills a slot only with a task from the shared queue (the tasks
    # routed to its node are in `in_flight` already): with that queue empty, a provider
    # between two polls is idle, and counting its claim sent a line to a dearer one.
    queued = unrouted(inf)
    batch: dict[str, Price] = {}
    for n, p in prices.items():
        node = nodes.get(n)
        share = provider_share(node.batch, node.batch_price_bps, share_bps) if node else None
        if (b := batch_price(p, share)) is not None:
            batch[n] = b
    return [
        replace(
            c,
            prompt_price=batch[c.node_id].prompt,
            output_price=batch[c.node_id].output,
            slots=batch_slots(nodes[c.node_id]),
            # A poll claiming a line there counts too (for batch lines only: interactive work
            # that saw it as full would ask a line to hand its slot back).
            in_flight=c.in_flight + min(inf.hub.claiming.get(c.node_id, 0), queued),
        )
        for c in cands
        if c.node_id in batch
    ], batch
