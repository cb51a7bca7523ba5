"""Double-entry ledger, pure: entries, postings, request charges, invariants, hash chain.

Amounts are integers in micro-credits (µcr; 1 credit = 1,000,000 µcr), so arithmetic is
exact. Prices are integers in µcr per 1M tokens, i.e. "credits per token, ×1e6", so a
price of 40 credits per 1M output tokens is 40_000_000 and charges 40 µcr per token.

Every entry balances (postings sum to zero) and names its cause. Only the issuer account
may go negative: its balance is minus the money in circulation, so "sum over all accounts
is zero" holds always and money appears only through explicit mint entries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from idlegrid.errors import InsufficientCredits, LedgerError

MICRO = 1_000_000  # µcr per credit
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens

ISSUER = "system:issuer"
ESCROW = "system:escrow"
FEES = "system:fees"

GENESIS_HASH = "0" * 64


def consumer_account(key_id: str) -> str:
    """Account of a consumer API key."""
    return f"consumer:{key_id}"


def provider_account(node_id: str) -> str:
    """Account of a provider node."""
    return f"provider:{node_id}"


def accrual_account(node_id: str) -> str:
    """Earnings of a provider not yet paid out: forfeitable while their audit window is open."""
    return f"accrual:{node_id}"


STAKE_PREFIX = "stake:"


def stake_account(node_id: str, device_class: str) -> str:
    """Stake a provider has posted for one claimed device class; slashed on proven fraud."""
    return f"{STAKE_PREFIX}{node_id}:{device_class}"


def order_escrow_account(order_id: str) -> str:
    """Prepaid funds of one market order, drawn down as the order accrues."""
    return f"escrow:order:{order_id}"


def may_go_negative(account: str) -> bool:
    """Only the issuer's balance is allowed below zero."""
    return account == ISSUER


@dataclass(frozen=True)
class Cause:
    """Why an entry exists: the request, deposit or audit behind it."""

    kind: str
    id: str


@dataclass(frozen=True)
class Posting:
    """A signed amount on one account: positive raises its balance."""

    account: str
    amount: int


@dataclass(frozen=True)
class Entry:
    """A balanced set of postings with an idempotency key and a cause."""

    key: str
    cause: Cause
    postings: tuple[Posting, ...]
    memo: str = ""

    def canonical(self) -> bytes:
        """Stable bytes that the hash chain covers."""
        body = {
            "key": self.key,
            "cause": [self.cause.kind, self.cause.id],
            "postings": [[p.account, p.amount] for p in self.postings],
            "memo": self.memo,
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Price:
    """A provider's price for one model, in µcr per 1M tokens."""

    prompt: int
    output: int


def make_entry(key: str, cause: Cause, postings: Iterable[Posting], memo: str = "") -> Entry:
    """Build an entry, merging postings per account and refusing one that does not balance."""
    merged: dict[str, int] = {}
    for p in postings:
        merged[p.account] = merged.get(p.account, 0) + p.amount
    kept = tuple(Posting(a, v) for a, v in sorted(merged.items()) if v != 0)
    if sum(p.amount for p in kept) != 0:
        raise LedgerError(f"entry {key} does not balance", key=key)
    if not kept:
        raise LedgerError(f"entry {key} moves nothing", key=key)
    return Entry(key, cause, kept, memo)


def chain_hash(prev_hash: str, entry: Entry) -> str:
    """Hash of an entry chained to the previous entry's hash."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + entry.canonical()).hexdigest()


def apply(balances: Mapping[str, int], entry: Entry) -> dict[str, int]:
    """Balances after `entry`; raises InsufficientCredits if any account would go negative."""
    out = dict(balances)
    for p in entry.postings:
        new = out.get(p.account, 0) + p.amount
        if new < 0 and not may_go_negative(p.account):
            raise InsufficientCredits(p.account, needed=-p.amount, available=out.get(p.account, 0))
        out[p.account] = new
    return out


def check_invariants(balances: Mapping[str, int]) -> None:
    """Raise LedgerError unless the books sum to zero and no account is overdrawn."""
    total = sum(balances.values())
    if total != 0:
        raise LedgerError(f"accounts sum to {total}, not 0", total=total)
    for account, value in balances.items():
        if value < 0 and not may_go_negative(account):
            raise LedgerError(f"{account} is negative ({value})", account=account, balance=value)


def mint(key: str, account: str, amount: int, cause: Cause) -> Entry:
    """Create `amount` µcr for `account` (deposits, faucets on a local grid)."""
    if amount <= 0:
        raise LedgerError("mint amount must be positive", amount=amount)
    return make_entry(key, cause, [Posting(ISSUER, -amount), Posting(account, amount)], "mint")


def token_cost(tokens: int, price_per_m: int) -> int:
    """µcr for `tokens` at `price_per_m` µcr per 1M tokens, rounded down (in the payer's favour)."""
    return tokens * price_per_m // TOKENS_PER_PRICE_UNIT


def hold_amount(max_prompt_tokens: int, max_output_tokens: int, price: Price) -> int:
    """The most a request can cost: what is escrowed before work starts."""
    return token_cost(max_prompt_tokens, price.prompt) + token_cost(max_output_tokens, price.output)


def request_hold(request_id: str, payer: str, amount: int, cause: Cause | None = None) -> Entry:
    """Move a request's worst-case cost from the consumer into escrow (`cause`: what the
    request serves when not itself, e.g. a batch line)."""
    cause = cause or Cause("request", request_id)
    return make_entry(
        f"hold:{request_id}", cause, [Posting(payer, -amount), Posting(ESCROW, amount)], "hold"
    )


def request_release(request_id: str, payer: str, held: int, cause: Cause | None = None) -> Entry:
    """Return a failed request's hold in full: work not done is not charged."""
    cause = cause or Cause("request", request_id)
    return make_entry(
        f"settle:{request_id}", cause, [Posting(ESCROW, -held), Posting(payer, held)], "release"
    )


@dataclass(frozen=True)
class Share:
    """One provider's part in serving a request (several after a failover)."""

    node_id: str
    prompt_tokens: int
    output_tokens: int
    price: Price

    def charge(self) -> int:
        """What the consumer pays for this share, before the fee is split off."""
        return token_cost(self.prompt_tokens, self.price.prompt) + token_cost(
            self.output_tokens, self.price.output
        )


def fee_of(charge: int, fee_bps: int) -> int:
    """Protocol fee in µcr for a charge, at `fee_bps` basis points, rounded down."""
    return charge * fee_bps // 10_000


def request_settlement(
    request_id: str,
    payer: str,
    held: int,
    shares: Sequence[Share],
    fee_bps: int,
    cause: Cause | None = None,
) -> Entry:
    """Pay each provider its share minus the fee, take the fee, refund the rest of the hold."""
    postings = [Posting(ESCROW, -held)]
    total = 0
    for share in shares:
        charge = share.charge()
        fee = fee_of(charge, fee_bps)
        postings += [Posting(accrual_account(share.node_id), charge - fee), Posting(FEES, fee)]
        total += charge
    if total > held:
        raise LedgerError(
            f"request {request_id} costs {total} µcr but only {held} µcr were held",
            request_id=request_id,
            charge=total,
            held=held,
        )
    postings.append(Posting(payer, held - total))
    cause = cause or Cause("request", request_id)
    return make_entry(f"settle:{request_id}", cause, postings, "settle")
