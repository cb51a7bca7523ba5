"""What a provider earned for work, by source, read from ledger postings.

A provider's balance is not its income: `idlegrid up` mints credits into the provider
account so it can stake, stake moves credits between its own accounts, and a payout moves
accrual to the paid account. Income is only what entries for work put in (tokens served,
device-seconds, verified training steps, verifier fees) less what penalties took out.
Entries are classified by the prefix of their idempotency key (`settle:…`, `accrue:…`),
which every ledger constructor in core/ sets; a mint is also recognised by its memo.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TOKENS = "tokens"
SECONDS = "seconds"
STEPS = "training steps"
VERIFIER_FEES = "verifier fees"
PENALTIES = "penalties"
OTHER = "other"
SOURCES = (TOKENS, SECONDS, STEPS, VERIFIER_FEES, PENALTIES, OTHER)
ALL = "all"  # `totals`: every source together

# Key prefix -> source. Prefixes absent here and from NOT_INCOME count as OTHER, so a new
# kind of entry shows up in the report instead of vanishing from it.
_SOURCE_OF = {
    "settle": TOKENS,
    "accrue": SECONDS,
    "train-seg": STEPS,
    "audit-pay": VERIFIER_FEES,
    "train-audit-pay": VERIFIER_FEES,
    "referee-pay": VERIFIER_FEES,
    "panel-pay": VERIFIER_FEES,
    "slash": PENALTIES,
    "canary-slash": PENALTIES,
    "lapse-slash": PENALTIES,
    "train-slash": PENALTIES,
    "train-vslash": PENALTIES,
    "hw-slash": PENALTIES,
    "dispute-penalty": PENALTIES,
    "dispute-fee": PENALTIES,
    "forfeit": PENALTIES,
    "slo": PENALTIES,
    "reverse": PENALTIES,  # a slash given back: the penalty shrinks
}
# Money that moves in (deposits, faucets) or between a provider's own accounts.
NOT_INCOME = frozenset(
    {"mint", "stake", "unstake", "train-stake", "train-unstake", "payout", "hold", "prepay"}
)
_OWNED_PREFIXES = ("provider:", "accrual:", "stake:")


def source_of(key: str, memo: str = "") -> str | None:
    """The income source of a ledger entry, or None when it is not income."""
    prefix = key.split(":", 1)[0]
    if memo == "mint" or prefix in NOT_INCOME:
        return None
    return _SOURCE_OF.get(prefix, OTHER)


def owner_of(account: str) -> str | None:
    """The node id owning a provider, accrual or stake account; None for other accounts."""
    if not account.startswith(_OWNED_PREFIXES):
        return None
    rest = account.split(":", 1)[1]
    # stake:<node>:<device class>; node ids hold no colon.
    return rest.split(":", 1)[0] if account.startswith("stake:") else rest


@dataclass
class Income:
    """One provider's income over a period, µcr: by source, and how much reached its
    paid account (directly or by payout) rather than waiting in accrual."""

    by_source: dict[str, int] = field(default_factory=dict)
    paid: int = 0

    @property
    def earned(self) -> int:
        """Net income: every source, penalties included."""
        return sum(self.by_source.values())


def tally(postings: Iterable[tuple[str, str, str, int]]) -> dict[str, Income]:
    """Per node, from (entry key, entry memo, account, amount) postings."""
    out: dict[str, Income] = {}
    for key, memo, account, amount in postings:
        node = owner_of(account)
        if node is None:
            continue
        source = source_of(key, memo)
        inc = out.setdefault(node, Income())
        if (
            account.startswith("provider:")
            and amount > 0
            and (source is not None or key.startswith("payout:"))
        ):
            inc.paid += amount
        if source is not None:
            inc.by_source[source] = inc.by_source.get(source, 0) + amount
    return out


def totals(balances: Mapping[str, int], deposited: Mapping[str, int]) -> dict[str, Income]:
    """All-time income per node from balances alone: what its accounts hold, less what
    was deposited into them (mints). Stake, unstake and payouts move credits between a
    node's own accounts and cancel out; every other entry that touches them is work or a
    penalty, so the total is exact though not split by source (`by_source` holds it under
    "all"). `paid` is whatever no longer waits in accrual. No ledger scan: `tally` over
    every posting ever made gives the same total at about 5 µs a posting."""
    out: dict[str, Income] = {}
    for sign, amounts in ((1, balances), (-1, deposited)):
        for account, amount in amounts.items():
            node = owner_of(account)
            if node is None or (sign < 0 and node not in out):
                continue
            inc = out.setdefault(node, Income())
            inc.by_source[ALL] = inc.by_source.get(ALL, 0) + sign * amount
            if not account.startswith("accrual:"):
                inc.paid += sign * amount
    return out
