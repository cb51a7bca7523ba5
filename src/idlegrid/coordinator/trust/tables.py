"""Tables of the trust layer (migration 0004_trust): commitments, audits, per-node record."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, LargeBinary, String, false
from sqlalchemy.orm import Mapped, mapped_column

from idlegrid.coordinator.db.tables import Base


class TrustCommitment(Base):
    """An answer's commitment, kept for the audit window."""

    __tablename__ = "trust_commitments"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    digest: Mapped[str] = mapped_column(String(64))
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    prior_ids: Mapped[list[int]] = mapped_column(JSON)
    max_new: Mapped[int] = mapped_column(Integer)
    charge: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    # An attempt that handed the request on (failover) committed to its part only
    # (migration 0007_disputes); its charge is its share, worked out once settled.
    part: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class TrustAudit(Base):
    """One re-check of a commitment by a verifier (or a planted canary)."""

    __tablename__ = "trust_audits"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(String(128))
    designated: Mapped[str | None] = mapped_column(String(64), nullable=True)
    verifier_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    canary: Mapped[bool] = mapped_column(Boolean)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending assigned passed failed
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    assigned_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float] = mapped_column(Float)
    # Verifiers that took this audit and let it lapse (migration 0007_disputes).
    expired: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")


class TrustNode(Base):
    """A node's audit record as provider and as verifier."""

    __tablename__ = "trust_nodes"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    verifier: Mapped[bool] = mapped_column(Boolean)
    det_class: Mapped[str] = mapped_column(String(200))
    passed: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    verifier_passed: Mapped[int] = mapped_column(Integer)
    verifier_failed: Mapped[int] = mapped_column(Integer)
    ejected: Mapped[bool] = mapped_column(Boolean)
    proven_class: Mapped[str] = mapped_column(String(64))
    verifier_expired: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Peer address at registration, and "let an audit lapse, not reported since"
    # (migration 0012_verifier_address).
    address: Mapped[str] = mapped_column(String(64), default="", server_default="")
    held: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class HwProof(Base):
    """One hardware challenge (migration 0005_hwproofs): issued, started, committed, judged."""

    __tablename__ = "hw_proofs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    claimed: Mapped[str] = mapped_column(String(64))  # device class the challenge tests
    kind: Mapped[str] = mapped_column(String(16))  # matmul | memory
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[str] = mapped_column(String(64))  # revealed to the node only at start
    root: Mapped[str] = mapped_column(String(64))
    wanted: Mapped[list[int]] = mapped_column(JSON)
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float] = mapped_column(Float)
    committed_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float] = mapped_column(Float)


class TrustDispute(Base):
    """A provider contesting a failed audit (migration 0007_disputes): bisection state,
    the current round's answers and deadline, the referee, and the ruling."""

    __tablename__ = "trust_disputes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    audit_id: Mapped[str] = mapped_column(String(64), unique=True)
    provider_id: Mapped[str] = mapped_column(String(64), index=True)
    verifier_id: Mapped[str] = mapped_column(String(64), index=True)
    referee_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # bisecting -> refereeing (or awaiting-referee) -> won | lost
    state: Mapped[str] = mapped_column(String(16), index=True)
    n: Mapped[int] = mapped_column(Integer)
    lo: Mapped[int] = mapped_column(Integer)
    hi: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    waiting: Mapped[list[str]] = mapped_column(JSON)  # roles still to answer this round
    answers: Mapped[dict[str, Any]] = mapped_column(JSON)  # role -> base64 answer, this round
    deadline: Mapped[float] = mapped_column(Float)
    rounds: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # position and agreement
    excluded: Mapped[list[str]] = mapped_column(JSON)  # panelists that did not answer
    ruling: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float] = mapped_column(Float)
    # The panel (migration 0011_dispute_panels): its members, their votes (node -> the side
    # its recompute found for, "provider" | "challenger"), since when it waits for members.
    panel: Mapped[list[str]] = mapped_column(JSON, default=list)
    votes: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    awaiting_since: Mapped[float] = mapped_column(Float, default=0.0)
