"""Market money as ledger entries: prepay, accrue, payout, stake, SLO refund, slash. Pure.

    consumer ──prepay──▶ escrow:order:<id> ──accrue──▶ accrual:<node> ──payout──▶ provider:<node>
                              │                   └──fee──▶ system:fees
                              ├──carry (a lost lease restarted)──▶ escrow:order:<new id>
                              └──close (unused)──▶ consumer
    provider:<node> ──stake──▶ stake:<node>:<class> ──slash──▶ consumer / verifier / fees
    accrual:<node> (then stake) ──SLO refund──▶ consumer
    accrual:<node>, provider:<node>, fees ──unaccrue (time a lease could not prove)──▶ escrow

Each function returns one balanced entry whose idempotency key names its cause, so a
replayed accrual, payout or refund is a no-op, never a second payment. Accruals sit in
`accrual:<node>` until a payout batch, which is what makes a provider's recent earnings
forfeitable when an audit fails.
"""

from __future__ import annotations

from collections.abc import Mapping

from idlegrid.core.ledger import (
    FEES,
    Cause,
    Entry,
    Posting,
    accrual_account,
    consumer_account,
    fee_of,
    make_entry,
    order_escrow_account,
    provider_account,
    stake_account,
)
from idlegrid.errors import LedgerError


def _positive(amount: int, what: str) -> None:
    if amount <= 0:
        raise LedgerError(f"{what} must be positive, got {amount}", amount=amount)


def prepay(order_id: str, key_id: str, amount: int) -> Entry:
    """Move an order's budget from the consumer into the order's escrow."""
    _positive(amount, "prepay")
    return make_entry(
        f"prepay:{order_id}",
        Cause("order", order_id),
        [
            Posting(consumer_account(key_id), -amount),
            Posting(order_escrow_account(order_id), amount),
        ],
        "prepay",
    )


def top_up(order_id: str, key_id: str, seq: int, amount: int) -> Entry:
    """Move more of the consumer's credits into an order's escrow (a lease extended)."""
    _positive(amount, "top-up")
    return make_entry(
        f"topup:{order_id}:{seq}",
        Cause("order", order_id),
        [
            Posting(consumer_account(key_id), -amount),
            Posting(order_escrow_account(order_id), amount),
        ],
        "lease-extend",
    )


def carry(order_id: str, new_order_id: str, amount: int) -> Entry:
    """Move what a lost lease's order still holds into the escrow of the lease that
    replaces it (`--restart-on-loss`): the consumer pays nothing twice."""
    _positive(amount, "carried escrow")
    return make_entry(
        f"carry:{order_id}:{new_order_id}",
        Cause("order", order_id),
        [
            Posting(order_escrow_account(order_id), -amount),
            Posting(order_escrow_account(new_order_id), amount),
        ],
        "lease-restart",
    )


def accrue(order_id: str, node_id: str, seq: int, amount: int, fee_bps: int) -> Entry:
    """Pay `amount` of an order's escrow to a provider's accrual, less the protocol fee."""
    _positive(amount, "accrual")
    fee = fee_of(amount, fee_bps)
    return make_entry(
        f"accrue:{order_id}:{node_id}:{seq}",
        Cause("order", order_id),
        [
            Posting(order_escrow_account(order_id), -amount),
            Posting(accrual_account(node_id), amount - fee),
            Posting(FEES, fee),
        ],
        "accrue",
    )


def unaccrue(order_id: str, node_id: str, seq: int, sources: Mapping[str, int]) -> Entry:
    """Take back into an order's escrow what a provider was paid for lease time it could
    not prove, from `sources` (account -> µcr: its accrual first, its account, then fees)."""
    amount = sum(sources.values())
    _positive(amount, "unaccrual")
    if any(v < 0 for v in sources.values()):
        raise LedgerError("an unaccrual takes, never gives", sources=dict(sources))
    postings = [Posting(order_escrow_account(order_id), amount)]
    postings += [Posting(a, -v) for a, v in sources.items() if v > 0]
    return make_entry(
        f"unaccrue:{order_id}:{node_id}:{seq}", Cause("order", order_id), postings,
        "lease-unproven",
    )  # fmt: skip


def close(order_id: str, key_id: str, remaining: int) -> Entry:
    """Return what is left of an order's escrow to the consumer when the order ends."""
    _positive(remaining, "refund of unused escrow")
    return make_entry(
        f"close:{order_id}",
        Cause("order", order_id),
        [
            Posting(order_escrow_account(order_id), -remaining),
            Posting(consumer_account(key_id), remaining),
        ],
        "close",
    )


def payout(batch_id: str, accruals: Mapping[str, int]) -> Entry:
    """Pay every provider's accrual out to its account in one batch entry."""
    postings = []
    for node_id, amount in sorted(accruals.items()):
        if amount > 0:
            postings += [
                Posting(accrual_account(node_id), -amount),
                Posting(provider_account(node_id), amount),
            ]
    if not postings:
        raise LedgerError("payout batch pays nothing", batch=batch_id)
    return make_entry(f"payout:{batch_id}", Cause("payout", batch_id), postings, "payout")


def stake(ref: str, node_id: str, device_class: str, amount: int) -> Entry:
    """Lock `amount` of a provider's credits as stake for one device class."""
    _positive(amount, "stake")
    return make_entry(
        f"stake:{ref}",
        Cause("stake", node_id),
        [
            Posting(provider_account(node_id), -amount),
            Posting(stake_account(node_id, device_class), amount),
        ],
        "stake",
    )


def unstake(ref: str, node_id: str, device_class: str, amount: int) -> Entry:
    """Return stake to the provider's account."""
    _positive(amount, "unstake")
    return make_entry(
        f"unstake:{ref}",
        Cause("stake", node_id),
        [
            Posting(stake_account(node_id, device_class), -amount),
            Posting(provider_account(node_id), amount),
        ],
        "unstake",
    )


def slo_refund(
    ref: str, order_id: str, node_id: str, key_id: str, amount: int, accrued: int, device_class: str
) -> Entry:
    """Refund a missed SLO to the consumer from the provider's accrual, then from its stake."""
    _positive(amount, "SLO refund")
    from_accrual = min(amount, max(accrued, 0))
    postings = [Posting(consumer_account(key_id), amount)]
    if from_accrual:
        postings.append(Posting(accrual_account(node_id), -from_accrual))
    if amount - from_accrual:
        postings.append(Posting(stake_account(node_id, device_class), -(amount - from_accrual)))
    return make_entry(f"slo:{ref}", Cause("order", order_id), postings, "slo-refund")


def slash(
    ref: str, node_id: str, device_class: str, amount: int, shares: Mapping[str, int]
) -> Entry:
    """Take `amount` of stake and split it among `shares` (account -> µcr), rest to fees."""
    _positive(amount, "slash")
    given = sum(shares.values())
    if given > amount or any(v < 0 for v in shares.values()):
        raise LedgerError("slash shares exceed the amount slashed", amount=amount, shares=given)
    postings = [
        Posting(stake_account(node_id, device_class), -amount),
        Posting(FEES, amount - given),
    ]
    postings += [Posting(a, v) for a, v in shares.items()]
    return make_entry(f"slash:{ref}", Cause("slash", ref), postings, "slash")


def accrual_due(price_per_device_hour: int, devices: int, seconds: float) -> int:
    """µcr earned by `devices` at a device-hour price over `seconds`, rounded down."""
    return int(price_per_device_hour * devices * seconds // 3600)
