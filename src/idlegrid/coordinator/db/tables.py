"""Database tables (SQLAlchemy 2). Alembic migrations in migrations/ must match these."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def table(cls: type[Base]) -> Table:
    """The Core table behind an ORM class (typed: `__table__` is a FromClause to mypy)."""
    return cast(Table, cls.__table__)


class Base(DeclarativeBase):
    """Declarative base for every table."""


class Node(Base):
    """A provider agent, identified by its public key."""

    __tablename__ = "nodes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))  # hex
    name: Mapped[str] = mapped_column(String(128))
    protocol_version: Mapped[int] = mapped_column(Integer)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    engine: Mapped[dict[str, Any]] = mapped_column(JSON)
    slots: Mapped[int] = mapped_column(Integer)
    prefill_tps: Mapped[float] = mapped_column(Float)
    decode_tps: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))  # live | draining | gone
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float, index=True)
    # Batch work: taken at all, and its price as a share of the offers (None: the default).
    batch: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    batch_price_bps: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Offer(Base):
    """A model a node serves and its prices (µcr per 1M tokens)."""

    __tablename__ = "offers"
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    prompt_price: Mapped[int] = mapped_column(BigInteger)
    output_price: Mapped[int] = mapped_column(BigInteger)


class ApiKey(Base):
    """A consumer API key; only the hash of its secret is kept."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Limits (migration 0017): most µcr ever spent, requests and tokens per minute; None: none.
    spend_cap: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Task(Base):
    """One inference request and where it stands."""

    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # completion | chat
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    target_node_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hold: Mapped[int] = mapped_column(BigInteger)
    # Claimed lowest first: 0 interactive, 1 a batch line (batch work fills what is left).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Token ids already delivered to the consumer; a new attempt continues after them.
    delivered_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # A batch line's answer as the consumer got it ({"text", "logprobs", "prompt"}), written
    # with its settlement: a coordinator restarted before the line was recorded rebuilds
    # the line from it instead of running (and charging) it again.
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Attempt(Base):
    """One provider's turn at a task, with the price it was claimed at."""

    __tablename__ = "task_attempts"
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    prompt_price: Mapped[int] = mapped_column(BigInteger)
    output_price: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Whether a valid commitment covers its output (False: delivered, never paid or charged,
    # `core/tasks.payable_tokens`); None on rows from before the rule (paid as delivered).
    committed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # Energy the provider reported for this attempt (None: an agent without a meter).
    energy_j: Mapped[float | None] = mapped_column(Float, nullable=True)
    energy_estimated: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class PowerSample(Base):
    """A node's energy counter as a heartbeat reported it; kWh over a period come from these."""

    __tablename__ = "power_samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    t: Mapped[float] = mapped_column(Float, index=True)
    joules_total: Mapped[float] = mapped_column(Float)
    watts: Mapped[float | None] = mapped_column(Float, nullable=True)
    source: Mapped[str] = mapped_column(String(16))
    estimated: Mapped[bool] = mapped_column(Boolean)


class Account(Base):
    """Cached balance of one ledger account, kept in step with its postings."""

    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)


class LedgerEntry(Base):
    """An append-only, hash-chained ledger entry."""

    __tablename__ = "ledger_entries"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(160), unique=True)
    cause_kind: Mapped[str] = mapped_column(String(32))
    cause_id: Mapped[str] = mapped_column(String(128), index=True)
    memo: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class LedgerPosting(Base):
    """One line of a ledger entry."""

    __tablename__ = "ledger_postings"
    __table_args__ = (UniqueConstraint("entry_seq", "account"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    entry_seq: Mapped[int] = mapped_column(ForeignKey("ledger_entries.seq"), index=True)
    account: Mapped[str] = mapped_column(String(128), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)


class LedgerHead(Base):
    """The single row that serialises appends to the hash chain."""

    __tablename__ = "ledger_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class DeviceOffer(Base):
    """A node's devices of one canonical model on sale per device-hour (market offers)."""

    __tablename__ = "device_offers"
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    device_model: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    vram_gb: Mapped[float] = mapped_column(Float)
    price_h: Mapped[int] = mapped_column(BigInteger)  # µcr per device-hour
    plugin: Mapped[str | None] = mapped_column(String(200), nullable=True)


class NodeMarket(Base):
    """Where a node is and how it links to others: what gang placement reads."""

    __tablename__ = "node_market"
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True)
    region: Mapped[str] = mapped_column(String(32))
    links: Mapped[dict[str, Any]] = mapped_column(JSON)  # peer node id -> measured Gbit/s
    # peer node id -> measured one-way latency, ms (what the gang planner adds per message)
    link_latency_ms: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The provider's lease controls as it registered them (core/lease/controls.py); None
    # from an agent that sends none: the defaults (no outbound network, bwrap only).
    lease: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class MarketOrder(Base):
    """A consumer's market order: lease, training, inference capacity or batch."""

    __tablename__ = "orders"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    body_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    budget: Mapped[int] = mapped_column(BigInteger)  # µcr prepaid into escrow:order:<id>
    spent: Mapped[int] = mapped_column(BigInteger, default=0)  # accrued to providers
    refunded: Mapped[int] = mapped_column(BigInteger, default=0)  # SLO refunds paid
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    reasons: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ends_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    accrued_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    accrual_seq: Mapped[int] = mapped_column(Integer, default=0)
    tokens_done: Mapped[int] = mapped_column(BigInteger, default=0)  # batch orders
