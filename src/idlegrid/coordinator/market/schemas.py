"""Response models of the market API: orders, the book, provider money, payouts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from idlegrid.coordinator.nodes.schemas import ModelPrice
from idlegrid.coordinator.schemas import Number


class Order(BaseModel):
    """An order as the API shows it (market/store.py OrderView); money in µcr."""

    id: str
    key_id: str
    kind: str
    body: dict[str, Any]
    state: str
    budget: int
    spent: int
    refunded: int
    placement: dict[str, Any] | None
    reasons: dict[str, Any] | None
    created_at: Number
    started_at: Number | None
    ends_at: Number | None
    accrued_until: Number | None
    tokens_done: int


class OrderList(BaseModel):
    """Orders, newest first."""

    orders: list[Order]


class Explanation(BaseModel):
    """Why an order sits where it does; `now` is a fresh match attempt for an open order."""

    order: str
    state: str
    placement: dict[str, Any] | None = None
    now: dict[str, Any] | None = None
    matches_now: bool | None = None
    reasons_at_submission: dict[str, Any] | None = None


class LeaseTerms(BaseModel):
    """What the provider lets a lease of this offer take (its lease controls); None: no
    limit beyond the hardware. `leased`: what its running leases hold now."""

    leases: bool
    max_cpus: Number | None
    max_ram_gb: Number | None
    max_disk_gb: Number | None
    total_cpus: Number | None
    total_ram_gb: Number | None
    total_disk_gb: Number | None
    egress: bool
    pip: bool
    runtimes: list[str]
    leased: dict[str, Number]


class BookOffer(BaseModel):
    """One device offer in the live book."""

    id: str
    provider: str
    device: str
    count: int
    free: int
    vram_gb: Number
    region: str
    price_per_device_hour: int
    plugin: str | None
    staked: bool
    reliability: Number
    verified: bool
    models: dict[str, ModelPrice]
    tokens_per_s: dict[str, Number]
    lease: LeaseTerms


class Book(BaseModel):
    """GET /offers: the matching offers (up to `limit`) and the size of the whole book."""

    offers: list[BookOffer]
    total: int


class StakeMoved(BaseModel):
    """Stake or unstake; `posted` is false for a replayed `ref`."""

    ok: bool
    posted: bool


class NodeAccount(BaseModel):
    """A provider's money, µcr: accrued, paid, and stake per device class."""

    node_id: str
    accrued: int
    paid: int
    stakes: dict[str, int]


class Payouts(BaseModel):
    """POST /admin/payouts: µcr paid per provider account, and the total."""

    paid: dict[str, int]
    total: int
