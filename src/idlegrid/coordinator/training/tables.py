"""Tables of verified training jobs (migration 0006_training): jobs, segments, checkpoints
held for resume and audits, audits, and each job's history."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from idlegrid.coordinator.db.tables import Base


class TrainJob(Base):
    """A consumer's training job: its spec, escrow, holder and how far it got."""

    __tablename__ = "train_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # queued running trained done failed canceled
    state: Mapped[str] = mapped_column(String(16), index=True)
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer)
    committed_step: Mapped[int] = mapped_column(Integer)  # end of the last kept segment
    verified_step: Mapped[int] = mapped_column(Integer)  # end of the last accepted segment
    escrow: Mapped[int] = mapped_column(Integer)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)  # step, loss, tokens_per_s, at
    excluded: Mapped[list[str]] = mapped_column(JSON)  # providers proven faulty on this job
    error: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[float] = mapped_column(Float)
    lease_at: Mapped[float] = mapped_column(Float)  # last sign of work from the holder


class TrainSegment(Base):
    """One committed segment (k steps): the signed commitment and what became of it."""

    __tablename__ = "train_segments"
    id: Mapped[str] = mapped_column(String(96), primary_key=True)  # job:index:attempt
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    start_step: Mapped[int] = mapped_column(Integer)
    end_step: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    digest: Mapped[str] = mapped_column(String(64))
    root: Mapped[str] = mapped_column(String(64))
    det_class: Mapped[str] = mapped_column(String(200))
    # committed accepted failed discarded
    state: Mapped[str] = mapped_column(String(16), index=True)
    cause: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float] = mapped_column(Float)


class TrainCheckpoint(Base):
    """A checkpoint the coordinator holds (segment ends): where resumes and audits start."""

    __tablename__ = "train_checkpoints"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class TrainAudit(Base):
    """A verifier's re-execution of one segment (or a planted canary)."""

    __tablename__ = "train_audits"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    segment_id: Mapped[str] = mapped_column(String(96))
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    designated: Mapped[str | None] = mapped_column(String(64), nullable=True)
    verifier_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    canary: Mapped[bool] = mapped_column(Boolean)
    blob: Mapped[bytes] = mapped_column(LargeBinary)  # the commitment shown to the verifier
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending assigned passed failed
    verdict: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    assigned_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float] = mapped_column(Float)


class TrainEvent(Base):
    """One line of a job's history; `cause` names what made it happen."""

    __tablename__ = "train_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    cause: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class TrainProbe(Base):
    """An availability probe: the provider must produce a committed checkpoint in time."""

    __tablename__ = "train_probes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    node_id: Mapped[str] = mapped_column(String(64), index=True)
    step: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))  # what the checkpoint must hash to
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending answered failed
    created_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float] = mapped_column(Float)


class TrainDispute(Base):
    """A provider contests a failed segment audit (migration 0008_train_disputes). The game
    itself (core/training/dispute.py) is rebuilt from `moves`, each stamped with its time,
    so that the row holds only what the parties said and the pure core decides."""

    __tablename__ = "train_disputes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    audit_id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    segment_id: Mapped[str] = mapped_column(String(96))
    provider_id: Mapped[str] = mapped_column(String(64), index=True)
    verifier_id: Mapped[str] = mapped_column(String(64), index=True)
    referee_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # open (parties' rounds) awaiting-referee refereeing won lost
    state: Mapped[str] = mapped_column(String(16), index=True)
    round: Mapped[int] = mapped_column(Integer)
    round_s: Mapped[float] = mapped_column(Float)
    moves: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    checkpoint: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    deadline: Mapped[float] = mapped_column(Float)  # the referee's (parties': in the game)
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
