"""Income for work, by source, from ledger postings: never a mint, a deposit or stake."""

from __future__ import annotations

from idlegrid.core import income
from idlegrid.core.ledger import Cause, Price, Share, mint, request_settlement
from idlegrid.core.market import settlement as market
from idlegrid.core.trust import entries as trust_entries


def _postings(*entries: object) -> list[tuple[str, str, str, int]]:
    return [(e.key, e.memo, p.account, p.amount) for e in entries for p in e.postings]  # type: ignore[attr-defined]


def test_a_minted_and_staked_provider_earns_only_what_it_served() -> None:
    faucet = mint("mint:local-stake-faucet:n1", "provider:n1", 20_000_000, Cause("deposit", "x"))
    staked = market.stake("s1", "n1", "CPU", 5_000_000)
    served = request_settlement(
        "r1", "consumer:k", 10_000, [Share("n1", 100, 50, Price(10_000_000, 40_000_000))], 100
    )
    report = income.tally(_postings(faucet, staked, served))["n1"]
    charge = 100 * 10 + 50 * 40  # µcr at 10 and 40 cr per 1M tokens
    assert report.by_source == {income.TOKENS: charge - charge // 100}
    assert report.earned == charge - charge // 100
    assert report.paid == 0  # still in accrual


def test_payouts_count_as_paid_not_twice_as_earned_and_penalties_subtract() -> None:
    served = request_settlement(
        "r1", "consumer:k", 10_000, [Share("n1", 0, 100, Price(0, 40_000_000))], 0
    )
    paid_out = market.payout("b1", {"n1": 4_000})
    fee = trust_entries.verifier_pay("a1", "n1", 300, pool_balance=1_000)
    assert fee is not None
    lease = market.accrue("o1", "n1", 1, 1_000, 0)
    unstaked = market.unstake("u1", "n1", "CPU", 5_000_000)
    slashed = market.slash("sl1", "n1", "CPU", 2_000, {})
    report = income.tally(_postings(served, paid_out, fee, lease, unstaked, slashed))["n1"]
    assert report.by_source == {
        income.TOKENS: 4_000,
        income.VERIFIER_FEES: 300,
        income.SECONDS: 1_000,
        income.PENALTIES: -2_000,
    }
    assert report.earned == 3_300
    assert report.paid == 4_000 + 300  # the payout and the fee reached provider:n1


def test_an_unknown_kind_of_entry_is_reported_as_other_not_dropped() -> None:
    assert income.source_of("batch-settle:b1") == income.OTHER
    assert income.source_of("anything", memo="mint") is None
    assert income.owner_of("stake:n1:RTX-4090") == "n1"
    assert income.owner_of("consumer:k") is None


def test_totals_from_balances_agree_with_the_tally_of_every_posting() -> None:
    from idlegrid.core.ledger import apply

    fee = trust_entries.verifier_pay("a1", "n1", 300, pool_balance=1_000)
    assert fee is not None
    history = [
        mint("mint:faucet", "provider:n1", 20_000_000, Cause("deposit", "f")),
        mint("mint:k", "consumer:k", 1_000_000, Cause("deposit", "k")),
        market.stake("s1", "n1", "CPU", 5_000_000),
        request_settlement(
            "r1", "consumer:k", 10_000, [Share("n1", 0, 100, Price(0, 40_000_000))], 0
        ),
        market.payout("b1", {"n1": 3_000}),
        fee,
        market.slash("sl1", "n1", "CPU", 2_000, {}),
    ]
    balances: dict[str, int] = {"system:fees": 1_000, "system:escrow": 10_000}
    for e in history:
        balances = apply(balances, e)
    deposits = {"provider:n1": 20_000_000}
    total = income.totals(balances, deposits)["n1"]
    tallied = income.tally(_postings(*history))["n1"]
    assert total.earned == tallied.earned == 4_000 + 300 - 2_000
    # All time, "paid" is what no longer waits in accrual: 1,000 of the 4,000 still does.
    assert total.paid == total.earned - balances["accrual:n1"] == 1_300
