"""Leases and their transitions (migration 0016_leases): a lease is the running side of a
market order of kind `lease` (same id); each move of its lifecycle is a row with its cause."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from idlegrid.coordinator.db.tables import Base


class Lease(Base):
    """One lease: whose, on which provider, where it is, what was billed so far."""

    __tablename__ = "leases"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the order's id
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    hours: Mapped[float] = mapped_column(Float)
    billed_s: Mapped[int] = mapped_column(Integer, default=0)  # running seconds paid for
    message: Mapped[str | None] = mapped_column(String(4000), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # Migration 0023_lease_loss: lost with its provider, the lease is ordered again
    # elsewhere (a new lease, linked both ways) when the consumer asked for it.
    restart_on_loss: Mapped[bool] = mapped_column(Boolean, default=False)
    restarted_from: Mapped[str | None] = mapped_column(String(64), nullable=True)
    restarted_as: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The hardware proofs (trust's hw_proofs ids) of the leased class it started on.
    proofs: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class LeaseTransition(Base):
    """A lease entered `state` at `at` because of `cause` (the first row: `created`)."""

    __tablename__ = "lease_transitions"
    lease_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(String(32))
