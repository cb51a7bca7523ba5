"""Response models of the node API and of the grid's status, ledger and operator routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from idlegrid.coordinator.schemas import Number
from idlegrid.coordinator.trust.schemas import TrustStatus

# ---- node API (signed) ---------------------------------------------------------------------


class Registered(BaseModel):
    """The settings a registered agent follows."""

    node_id: str
    heartbeat_interval_s: Number
    long_poll_s: Number
    protocol_version: int
    stake_per_device: int


class PendingQuery(BaseModel):
    """A dispute round waiting for this node's answer, from its seat (provider, challenger
    or referee), in a dispute of either kind."""

    id: str
    kind: Literal["inference", "training"]
    round: int
    role: str


class HeartbeatAnswer(BaseModel):
    """What a heartbeat hears back: hardware challenges and dispute rounds to answer, and
    the stake the node has posted."""

    ok: bool
    hwproofs: list[str]
    disputes: list[PendingQuery]  # both kinds
    stakes: dict[str, int] = {}  # µcr posted per device class: a slashed agent tops up


# ---- operators and the grid's state ---------------------------------------------------------


class NewKeyCreated(BaseModel):
    """A new consumer API key; `api_key` is shown only this once."""

    key_id: str
    api_key: str


class KeyInfo(BaseModel):
    """One consumer key as the operator sees it (never its secret); µcr."""

    key_id: str
    name: str
    created_at: Number
    revoked_at: Number | None
    spend_cap: int | None
    rpm: int | None
    tpm: int | None
    balance: int
    spent: int  # deposited less the balance: paid for, or held for open work


class KeyList(BaseModel):
    """GET /admin/keys."""

    keys: list[KeyInfo]


class KeyRevoked(BaseModel):
    """POST /admin/keys/{id}/revoke; `changed` is false when it was revoked already."""

    key_id: str
    revoked: bool
    changed: bool


class Minted(BaseModel):
    """POST /admin/mint; `created` is false for a replayed reference."""

    created: bool
    account: str
    balance: int


class Balance(BaseModel):
    """The calling key's balance, µcr."""

    key_id: str
    account: str
    balance: int


class ModelPrice(BaseModel):
    """A provider's price for one model, µcr per 1M tokens."""

    prompt_price: int
    output_price: int


class NodeStatus(BaseModel):
    """A node as /status shows it."""

    id: str
    name: str
    state: str
    live: bool
    last_seen_s_ago: Number
    slots: int
    running: int
    prefill_tps: Number
    decode_tps: Number
    hardware: dict[str, Any]
    engine: dict[str, Any]
    offers: dict[str, ModelPrice]
    accrued: int  # work not paid out yet
    paid: int  # work paid to the provider account, ever (never a mint or stake)
    earned: int  # net income for work, ever (core/income.py)


class GridStatus(BaseModel):
    """GET /status; `balances` (every account's) only with the operator key."""

    nodes: list[NodeStatus]
    fee_bps: int
    inference_stake: int = 0  # µcr of stake a node needs posted to serve paid requests
    fees: int
    tasks: dict[str, int]
    trust: TrustStatus
    balances: dict[str, int] | None = None


class Cause(BaseModel):
    """Why a ledger entry was posted."""

    kind: str
    id: str


class Posting(BaseModel):
    """One account's side of a ledger entry, µcr."""

    account: str
    amount: int


class LedgerEntry(BaseModel):
    """A hash-chained ledger entry with its postings."""

    seq: int
    key: str
    cause: Cause
    memo: str
    hash: str
    prev_hash: str
    created_at: Number
    postings: list[Posting]


class LedgerEntries(BaseModel):
    """GET /ledger."""

    entries: list[LedgerEntry]


class LedgerCheck(BaseModel):
    """GET /ledger/verify."""

    ok: bool
    problems: list[str]
