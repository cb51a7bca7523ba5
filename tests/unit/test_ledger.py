"""Ledger postings and invariants: pure, no database."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idlegrid.core import ledger
from idlegrid.core.ledger import Cause, Posting, Price, Share
from idlegrid.errors import InsufficientCredits, LedgerError

ALICE = ledger.consumer_account("alice")
PRICE = Price(prompt=10 * ledger.MICRO, output=40 * ledger.MICRO)


def books(*entries: ledger.Entry) -> dict[str, int]:
    balances: dict[str, int] = {}
    for e in entries:
        balances = ledger.apply(balances, e)
    ledger.check_invariants(balances)
    return balances


def test_token_cost_is_exact_integer_micro_credits() -> None:
    assert ledger.token_cost(1, 40 * ledger.MICRO) == 40
    assert ledger.token_cost(3, 1) == 0  # rounds down, in the payer's favour
    assert ledger.token_cost(1_000_000, 7) == 7


def test_entry_must_balance_and_move_something() -> None:
    with pytest.raises(LedgerError):
        ledger.make_entry("k", Cause("t", "1"), [Posting(ALICE, 5)])
    with pytest.raises(LedgerError):
        ledger.make_entry("k", Cause("t", "1"), [Posting(ALICE, 5), Posting(ALICE, -5)])


def test_overdraft_is_refused_with_data() -> None:
    b = books(ledger.mint("m", ALICE, 100, Cause("deposit", "d")))
    with pytest.raises(InsufficientCredits) as exc:
        ledger.apply(b, ledger.request_hold("r1", ALICE, 101))
    assert (exc.value.account, exc.value.needed, exc.value.available) == (ALICE, 101, 100)


def test_settlement_pays_provider_minus_fee_and_refunds_rest() -> None:
    held = ledger.hold_amount(10, 20, PRICE)
    share = Share("n1", prompt_tokens=7, output_tokens=20, price=PRICE)
    charge = 7 * 10 + 20 * 40
    assert share.charge() == charge
    b = books(
        ledger.mint("m", ALICE, 10_000, Cause("deposit", "d")),
        ledger.request_hold("r1", ALICE, held),
        ledger.request_settlement("r1", ALICE, held, [share], fee_bps=200),
    )
    fee = charge * 200 // 10_000
    assert b[ALICE] == 10_000 - charge
    assert b[ledger.accrual_account("n1")] == charge - fee
    assert b[ledger.FEES] == fee
    assert b.get(ledger.ESCROW, 0) == 0


def test_settlement_never_exceeds_the_hold() -> None:
    with pytest.raises(LedgerError):
        ledger.request_settlement("r", ALICE, 10, [Share("n", 0, 1, PRICE)], 0)


def test_release_returns_everything() -> None:
    b = books(
        ledger.mint("m", ALICE, 500, Cause("deposit", "d")),
        ledger.request_hold("r", ALICE, 300),
        ledger.request_release("r", ALICE, 300),
    )
    assert b[ALICE] == 500 and b.get(ledger.ESCROW, 0) == 0


def test_chain_hash_covers_content_and_order() -> None:
    e1 = ledger.mint("a", ALICE, 1, Cause("deposit", "x"))
    e2 = ledger.mint("b", ALICE, 2, Cause("deposit", "y"))
    h1 = ledger.chain_hash(ledger.GENESIS_HASH, e1)
    assert ledger.chain_hash(h1, e2) != ledger.chain_hash(ledger.GENESIS_HASH, e2)
    tampered = ledger.mint("a", ALICE, 2, Cause("deposit", "x"))
    assert ledger.chain_hash(ledger.GENESIS_HASH, tampered) != h1


@given(
    funds=st.integers(1, 10**9),
    prompt=st.integers(0, 5000),
    out=st.integers(0, 5000),
    split=st.integers(0, 5000),
    fee_bps=st.integers(0, 10_000),
    p1=st.integers(0, 10**9),
    p2=st.integers(0, 10**9),
)
def test_any_failover_settlement_conserves_money(
    funds: int, prompt: int, out: int, split: int, fee_bps: int, p1: int, p2: int
) -> None:
    """Two providers share a request: books sum to zero, nothing negative, hold fully spent."""
    split = min(split, out)
    worst = Price(max(p1, p2), max(p1, p2))
    held = ledger.hold_amount(prompt, out, worst)
    entries = [ledger.mint("m", ALICE, funds, Cause("deposit", "d"))]
    try:
        b = books(*entries, ledger.request_hold("r", ALICE, held)) if held else books(*entries)
    except InsufficientCredits:
        assert held > funds
        return
    shares = [Share("a", 0, split, Price(p1, p1)), Share("b", prompt, out - split, Price(p2, p2))]
    if held:
        b = ledger.apply(b, ledger.request_settlement("r", ALICE, held, shares, fee_bps))
    ledger.check_invariants(b)
    assert b.get(ledger.ESCROW, 0) == 0
    paid = sum(s.charge() for s in shares) if held else 0
    assert b[ALICE] == funds - paid
