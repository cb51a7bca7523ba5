"""Ledger entries that trust decisions cause, built with `ledger.make_entry`.

Every key names its cause (`slash:<audit>`, `forfeit:<audit>`, `audit-pay:<audit>`,
`canary-slash:<audit>`, `lapse-slash:<audit>:<verifier>:<stake>`), so replaying a decision
posts nothing twice and "why did this stake shrink?" has an answer in one query.
"""

from __future__ import annotations

from dataclasses import dataclass

from idlegrid.core import ledger
from idlegrid.core.ledger import FEES, Cause, Entry, Posting

REFUND_FIRST = True


@dataclass(frozen=True)
class SlashSplit:
    """How a slashed stake is shared: the consumer is made whole first, then the verifier's
    reward, and the rest is burned to fees (burning part of it stops self-reporting farms)."""

    verifier_bps: int = 5_000  # share of what remains after the refund


def slash(
    audit_id: str,
    stake_account: str,
    stake_balance: int,
    amount: int,
    consumer: str,
    refund: int,
    verifier: str | None,
    split: SlashSplit = SlashSplit(),
) -> Entry | None:
    """Take up to `amount` from a stake: refund the consumer, reward the verifier, burn the rest."""
    take = min(amount, stake_balance)
    if take <= 0:
        return None
    to_consumer = min(refund, take)
    rest = take - to_consumer
    to_verifier = rest * split.verifier_bps // 10_000 if verifier else 0
    postings = [
        Posting(stake_account, -take),
        Posting(consumer, to_consumer),
        Posting(FEES, rest - to_verifier),
    ]
    if verifier:
        postings.append(Posting(ledger.provider_account(verifier), to_verifier))
    return ledger.make_entry(f"slash:{audit_id}", Cause("audit", audit_id), postings, "slash")


def forfeit(
    audit_id: str, accrual_account: str, accrual_balance: int, consumer: str, refund_left: int
) -> Entry | None:
    """Forfeit a cheater's unpaid earnings: what the stake did not refund goes to the consumer,
    the rest to fees (the window's other consumers are refunded by their own audits)."""
    if accrual_balance <= 0:
        return None
    to_consumer = min(refund_left, accrual_balance)
    postings = [
        Posting(accrual_account, -accrual_balance),
        Posting(consumer, to_consumer),
        Posting(FEES, accrual_balance - to_consumer),
    ]
    return ledger.make_entry(f"forfeit:{audit_id}", Cause("audit", audit_id), postings, "forfeit")


def verifier_pay(audit_id: str, verifier: str, amount: int, pool_balance: int) -> Entry | None:
    """Pay a verifier for an audit out of the protocol fees (capped by what fees hold)."""
    pay = min(amount, pool_balance)
    if pay <= 0:
        return None
    return ledger.make_entry(
        f"audit-pay:{audit_id}",
        Cause("audit", audit_id),
        [Posting(FEES, -pay), Posting(ledger.provider_account(verifier), pay)],
        "audit pay",
    )


def canary_slash(
    audit_id: str, stake_account: str, stake_balance: int, amount: int
) -> Entry | None:
    """A verifier approved a planted wrong answer: its stake goes to fees (the jackpot)."""
    take = min(amount, stake_balance)
    if take <= 0:
        return None
    return ledger.make_entry(
        f"canary-slash:{audit_id}",
        Cause("audit", audit_id),
        [Posting(stake_account, -take), Posting(FEES, take)],
        "canary slash",
    )


def lapse_slash(
    audit_id: str, verifier: str, stake_account: str, stake_balance: int, amount: int
) -> Entry | None:
    """A verifier took an audit and did not report in time: a slice of its stake is burned."""
    take = min(amount, stake_balance)
    if take <= 0:
        return None
    return ledger.make_entry(
        f"lapse-slash:{audit_id}:{verifier}:{stake_account}",
        Cause("audit", audit_id),
        [Posting(stake_account, -take), Posting(FEES, take)],
        "audit lapsed",
    )


def dispute_reversal(dispute_id: str, slash_entry: Entry, forfeit_entry: Entry | None) -> Entry:
    """Undo a slash (and forfeit) that a dispute found wrong: every posting reversed."""
    merged: dict[str, int] = {}
    for e in (slash_entry, forfeit_entry):
        if e is None:
            continue
        for p in e.postings:
            merged[p.account] = merged.get(p.account, 0) - p.amount
    return ledger.make_entry(
        f"reverse:{dispute_id}",
        Cause("dispute", dispute_id),
        [Posting(a, v) for a, v in merged.items()],
        "slash reversed",
    )


def hardware_slash(proof_id: str, stake_account: str, stake_balance: int) -> Entry | None:
    """A hardware claim its proof did not back: the stake for that class goes to fees."""
    if stake_balance <= 0:
        return None
    return ledger.make_entry(
        f"hw-slash:{proof_id}:{stake_account}",
        Cause("hwproof", proof_id),
        [Posting(stake_account, -stake_balance), Posting(FEES, stake_balance)],
        "hardware slash",
    )
