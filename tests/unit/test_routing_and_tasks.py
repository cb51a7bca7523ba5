"""Routing choice and the task lifecycle: pure."""

from __future__ import annotations

import pytest

from idlegrid.core.ledger import Price
from idlegrid.core.routing import Candidate, choose, rank
from idlegrid.core.tasks import TaskState, should_retry, transition
from idlegrid.errors import IllegalTransition


def c(
    node: str, in_flight: int = 0, slots: int = 1, price: int = 10, tps: float = 10.0
) -> Candidate:
    return Candidate(node, in_flight, slots, price, tps)


def test_least_loaded_first_then_cheapest_then_fastest() -> None:
    assert choose([c("busy", 1, 2), c("idle", 0, 2)]).node_id == "idle"  # type: ignore[union-attr]
    assert choose([c("dear", price=20), c("cheap", price=10)]).node_id == "cheap"  # type: ignore[union-attr]
    assert choose([c("slow", tps=5), c("fast", tps=50)]).node_id == "fast"  # type: ignore[union-attr]
    assert [x.node_id for x in rank([c("b"), c("a")])] == ["a", "b"]  # ties: stable by id


def test_routing_uses_the_market_score_reliability_included() -> None:
    shaky = Candidate("shaky", 0, 1, 10, 10.0, reliability=0.5, max_tokens=100)
    steady = Candidate("steady", 0, 1, 15, 10.0, reliability=1.0, max_tokens=100)
    # Cheaper per token, but half its attempts are redone: 10/0.5 > 15/1.
    assert choose([shaky, steady]).node_id == "steady"  # type: ignore[union-attr]
    long_prompt = dict(prompt_tokens=10_000, max_tokens=10)
    a = Candidate("cheap-output", 0, 1, 10, 10.0, prompt_price=50, **long_prompt)  # type: ignore[arg-type]
    b = Candidate("cheap-prompt", 0, 1, 40, 10.0, prompt_price=5, **long_prompt)  # type: ignore[arg-type]
    assert choose([a, b]).node_id == "cheap-prompt"  # type: ignore[union-attr]


def test_equally_good_providers_take_turns_least_recently_used_first() -> None:
    from dataclasses import replace

    # Slightly different reliability and speed: noise, not a reason to starve one of them.
    a = Candidate("a", 0, 1, 40, 12.0, reliability=1.0, max_tokens=64)
    b = Candidate("b", 0, 1, 40, 10.0, reliability=0.98, max_tokens=64)
    routed = {"a": 0, "b": 0}
    picks = []
    for seq in range(1, 7):
        cands = [replace(x, last_routed=routed[x.node_id]) for x in (a, b)]
        pick = choose(cands)
        assert pick is not None
        routed[pick.node_id] = seq
        picks.append(pick.node_id)
    assert picks == ["a", "b", "a", "b", "a", "b"]  # the faster one first, then turns
    # A real difference still decides: a quarter dearer is not a tie.
    dear = Candidate("dear", 0, 1, 50, 10.0, max_tokens=64)
    assert choose([replace(a, last_routed=5), dear]).node_id == "a"  # type: ignore[union-attr]
    # And load comes first: a recently used idle node beats a never-used busy one.
    busy = Candidate("busy", 1, 2, 40, 10.0, max_tokens=64)
    assert choose([replace(a, last_routed=9), busy]).node_id == "a"  # type: ignore[union-attr]


def test_each_choice_has_a_reason() -> None:
    from idlegrid.core.routing import reason

    a, b = c("a"), c("b", in_flight=1, slots=2)
    assert reason([a, b], choose([a, b])) == "least loaded of 2"
    assert reason([c("a"), c("b")], c("a")).startswith("tie among 2")
    assert reason([c("a"), c("dear", price=40)], c("a")) == "best cost/reliability of 2"
    assert reason([c("a", 1, 1)], None) == "queued: all 1 provider(s) busy"
    assert reason([a], a) == "only provider with a free slot"


def test_full_providers_leave_work_in_the_shared_queue() -> None:
    assert choose([c("a", 1, 1), c("b", 2, 2)]) is None
    assert choose([c("a", 1, 2)], exclude=frozenset({"a"})) is None


def test_lifecycle_moves_and_illegal_ones() -> None:
    s = transition(TaskState.QUEUED, "claim")
    assert s is TaskState.RUNNING
    assert transition(s, "requeue") is TaskState.QUEUED
    assert transition(s, "finish") is TaskState.DONE
    with pytest.raises(IllegalTransition) as exc:
        transition(TaskState.DONE, "claim")
    assert (exc.value.src, exc.value.dst) == ("done", "running")
    with pytest.raises(IllegalTransition):
        transition(TaskState.QUEUED, "finish")
    assert should_retry(1, 3) and not should_retry(3, 3)


def test_price_basis_ignores_offers_above_the_cap_and_lets_only_staked_nodes_set_it() -> None:
    from idlegrid.core.routing import price_basis, within

    cheap, dear, absurd = Price(10, 40), Price(20, 80), Price(10**11, 10**11)
    prices = {"a": cheap, "b": dear, "greedy": absurd}
    cap = Price(1000, 4000)
    # The absurd offer is above the cap; nobody staked: the dearest eligible sets it.
    assert price_basis(prices, frozenset(), cap) == dear
    # Only staked nodes set the price when any is live: the unstaked dear one does not.
    assert price_basis(prices, frozenset({"a"}), cap) == cheap
    # No cap (an internal caller): every offer counts.
    assert price_basis(prices, frozenset(), None) == absurd
    assert price_basis(prices, frozenset(), Price(1, 1)) is None
    assert within(cheap, cheap) and not within(Price(11, 40), cheap)
