"""The dispute panel's pure maths: the draw, the majority, who is paid, who is slashed, and
a ruling that cannot be paid."""

from __future__ import annotations

from collections import Counter

import pytest

from idlegrid.core import disputes as seats
from idlegrid.core import ledger
from idlegrid.core.ledger import FEES
from idlegrid.core.trust import dispute
from idlegrid.errors import UnpayableRuling

P, C = seats.PROVIDER, seats.CHALLENGER


def test_draw_is_k_distinct_members_and_fixed_by_the_beacon() -> None:
    stakes = {f"v{i}": 0 for i in range(6)}
    a = seats.draw_panel(b"s", "dsp-1", stakes, 3)
    assert len(a) == 3 and len(set(a)) == 3 and set(a) <= set(stakes)
    assert seats.draw_panel(b"s", "dsp-1", stakes, 3) == a  # replayable with the secret
    draws = {seats.draw_panel(bytes([i]), "dsp-1", stakes, 3) for i in range(30)}
    assert len(draws) > 5  # the secret decides, not the dispute alone


def test_too_few_eligible_draws_nobody() -> None:
    assert seats.draw_panel(b"s", "dsp-1", {"a": 1, "b": 1}, 3) == ()


def test_draw_is_stake_weighted() -> None:
    stakes = {"rich": 1_000_000, "poor1": 0, "poor2": 0, "poor3": 0}
    seen = Counter(
        n for i in range(200) for n in seats.draw_panel(i.to_bytes(2, "big"), "d", stakes, 1)
    )
    assert seen["rich"] > 190


def test_majority_rules_and_the_minority_is_not_paid() -> None:
    assert seats.panel_ruling({"a": P}, 3) is None
    assert seats.panel_ruling({"a": P, "b": C}, 3) is None
    r = seats.panel_ruling({"a": P, "b": C, "c": P}, 3)
    assert r == seats.PanelRuling(P, ("a", "c"), ("b",))
    # One colluding member cannot overturn two honest ones.
    r = seats.panel_ruling({"colluder": P, "h1": C, "h2": C}, 3)
    assert r is not None and r.winner == C and "colluder" in r.unpaid


def test_a_tie_is_no_majority() -> None:
    r = seats.panel_ruling({"a": P, "b": C, "c": P, "d": C}, 4)
    assert r is not None and r.winner is None and r.paid == ()


def test_no_slash_without_a_panel_recompute() -> None:
    assert seats.slashed(P, recomputed=True) == C
    assert seats.slashed(P, recomputed=False) is None  # e.g. the challenger went silent
    assert seats.slashed(C, recomputed=True) is None
    assert seats.slashed(None, recomputed=True) is None  # expired: nobody


def test_panel_pay_comes_from_the_loser_first_then_the_fee_pool() -> None:
    stake = "stake:liar:cpu"
    e = dispute.panel_pay("dsp-1", ["a", "b"], 30, {stake: 50, FEES: 100})
    assert e is not None and e.key == "panel-pay:dsp-1"
    got = {p.account: p.amount for p in e.postings}
    assert got == {
        stake: -50,
        FEES: -10,
        ledger.provider_account("a"): 30,
        ledger.provider_account("b"): 30,
    }
    assert sum(got.values()) == 0


def test_an_unpayable_ruling_is_a_typed_error() -> None:
    with pytest.raises(UnpayableRuling) as exc:
        dispute.panel_pay("dsp-1", ["a", "b", "c"], 10, {"stake:x:cpu": 5, FEES: 4})
    assert exc.value.needed == 30 and exc.value.available == 9
    assert exc.value.dispute_id == "dsp-1"


def test_bug_a_reversal_and_pay_no_longer_drain_the_fee_pool_twice() -> None:
    # The slash went half to the fee pool; the pool holds only that half now (2% fee).
    slash = ledger.make_entry(
        "slash:aud-1:stake:p:cpu",
        ledger.Cause("audit", "aud-1"),
        [
            ledger.Posting("stake:p:cpu", -100),
            ledger.Posting(FEES, 50),
            ledger.Posting("provider:v", 50),
        ],
    )
    balances = {FEES: 50, "provider:v": 50, "stake:v:cpu": 100}
    rev, used = dispute.reversal("dsp-1", [slash], balances, {"stake:v:cpu": 100})
    after = dispute.apply(balances, [rev])
    assert after[FEES] == 0 and after["stake:p:cpu"] == 100
    pay = dispute.panel_pay(
        "dsp-1", ["a", "b", "c"], 10, {"stake:v:cpu": after["stake:v:cpu"], FEES: after[FEES]}
    )
    after = dispute.apply(after, [pay])
    assert all(v >= 0 for v in after.values()) and after["stake:v:cpu"] == 70
