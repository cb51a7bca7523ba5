"""Which provider takes a request: least-loaded first, then the market's score, then the
least recently used among equally good ones, then speed. Pure.

The score is the auction's (`request_score` below): the request's expected cost
at the provider's prices, divided by the provider's measured reliability. Scores within
`TIE` of the best at the same load are equally good: a reliability of 0.99 against 1.0,
or a benchmark a few percent apart, is noise, and ranking on it sent every request of an
idle grid to one provider while the other sat idle and earned nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from idlegrid.core.ledger import TOKENS_PER_PRICE_UNIT, Price

TIE = 0.05  # scores within 5 % of the best are equally good


@dataclass(frozen=True)
class Candidate:
    """A live provider that serves the requested model, as the router sees it."""

    node_id: str
    in_flight: int  # tasks it holds or has been handed and not finished
    slots: int  # requests it serves at once
    output_price: int  # µcr per 1M output tokens
    decode_tps: float  # measured at start-up
    prompt_price: int = 0  # µcr per 1M prompt tokens
    reliability: float = 1.0  # measured success ratio, 0..1
    prompt_tokens: int = 0  # of the request being routed
    max_tokens: int = 1
    last_routed: int = 0  # when it was last routed a request (a sequence; 0: never)

    @property
    def score(self) -> float:
        """The request's expected cost here, as the market scores it."""
        return request_score(
            self.prompt_tokens,
            self.max_tokens,
            Price(self.prompt_price, self.output_price),
            self.reliability,
        )

    @property
    def load(self) -> float:
        """Fraction of its slots in use (may exceed 1 when work queues on it)."""
        return self.in_flight / max(self.slots, 1)

    @property
    def has_free_slot(self) -> bool:
        """Whether it can start one more request right now."""
        return self.in_flight < self.slots


def rank(candidates: Iterable[Candidate], exclude: frozenset[str] = frozenset()) -> list[Candidate]:
    """Candidates best first: lowest load, then lowest score (within `TIE` of the best at
    that load counts as a tie), then least recently used, then highest speed, then id."""
    pool = [c for c in candidates if c.node_id not in exclude]
    best = _best_scores(pool)

    def key(c: Candidate) -> tuple[float, float, int, float, str]:
        score = 0.0 if _near(c, best) else c.score
        return (c.load, score, c.last_routed, -c.decode_tps, c.node_id)

    return sorted(pool, key=key)


def _best_scores(pool: list[Candidate]) -> dict[float, float]:
    best: dict[float, float] = {}
    for c in pool:
        best[c.load] = min(best.get(c.load, c.score), c.score)
    return best


def _near(c: Candidate, best: dict[float, float]) -> bool:
    return c.score <= best[c.load] * (1 + TIE)


def reason(candidates: Iterable[Candidate], chosen: Candidate | None) -> str:
    """Why `chosen` got a request, in a few words (the `x-idlegrid-route` header)."""
    pool = list(candidates)
    if chosen is None:
        return f"queued: all {len(pool)} provider(s) busy" if pool else "queued: no provider"
    free = [c for c in pool if c.has_free_slot]
    if len(free) == 1:
        return "only provider with a free slot"
    if any(c.load > chosen.load for c in free):
        return f"least loaded of {len(free)}"
    best = _best_scores(pool)
    tied = [c for c in free if c.load == chosen.load and _near(c, best)]
    if len(tied) > 1:
        return f"tie among {len(tied)} within {TIE:.0%} on cost/reliability: least recently used"
    return f"best cost/reliability of {len(free)}"


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


def within(price: Price, cap: Price) -> bool:
    """Whether a provider's price is at or below a cap on both parts."""
    return price.prompt <= cap.prompt and price.output <= cap.output


def price_basis(
    prices: Mapping[str, Price], staked: AbstractSet[str], cap: Price | None
) -> Price | None:
    """The price a request is escrowed at: the dearest it may be served at, or None.

    Only providers at or below the consumer's cap count, and among them only staked ones
    set the price when any is live: a node that staked nothing cannot raise every
    consumer's escrow by offering an absurd price. Unstaked providers may still serve at
    or below that basis.
    """
    eligible = {n: p for n, p in prices.items() if cap is None or within(p, cap)}
    if not eligible:
        return None
    setters = [p for n, p in eligible.items() if n in staked] or list(eligible.values())
    return Price(max(p.prompt for p in setters), max(p.output for p in setters))


def request_score(prompt_tokens: int, max_tokens: int, price: Price, reliability: float) -> float:
    """The auction's scoring for one gateway request: expected cost ÷ reliability."""
    cost = (prompt_tokens * price.prompt + max_tokens * price.output) / TOKENS_PER_PRICE_UNIT
    return cost / max(reliability, 0.01)
