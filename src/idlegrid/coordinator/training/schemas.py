"""Response models of the training API: jobs, segments, audits, probes and disputes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from idlegrid.coordinator.nodes.schemas import Cause, Posting
from idlegrid.coordinator.schemas import Number

# ---- consumers -----------------------------------------------------------------------------


class JobSummary(BaseModel):
    """A job without its history (GET /jobs)."""

    id: str
    state: str
    steps: int
    committed_step: int
    verified_step: int
    price_per_step: int
    escrow: int
    provider: str | None
    progress: dict[str, Any] | None  # step, loss, tokens_per_s, at
    error: str | None
    created_at: Number


class JobList(BaseModel):
    """GET /jobs: the caller's jobs, newest first."""

    jobs: list[JobSummary]


class Segment(BaseModel):
    """A committed stretch of steps and what became of it."""

    id: str
    index: int
    start_step: int
    end_step: int
    provider: str
    attempt: int
    root: str
    det_class: str
    state: str
    cause: str


class JobAudit(BaseModel):
    """An audit of one of the job's segments."""

    id: str
    segment: str
    provider: str
    verifier: str | None
    canary: bool
    state: str
    verdict: dict[str, Any] | None


class TrainDispute(BaseModel):
    """A dispute over a failed training audit: the game's phase, moves and ruling."""

    id: str
    kind: Literal["training"]
    audit_id: str
    segment: str
    provider_id: str
    challenger_id: str
    referee_id: str | None
    panel: list[str] = []  # the drawn verifiers (the referee seat)
    votes: dict[str, str] = {}  # panelist -> "provider" | "challenger"
    awaiting_since: float = 0.0  # waiting for enough eligible verifiers since
    state: str
    round: int
    phase: str
    waiting_for: list[str]
    moves: int
    ruling: dict[str, Any]
    reason: str
    created_at: Number
    done_at: Number


class JobEvent(BaseModel):
    """Something that happened to the job; the other fields depend on the kind."""

    model_config = ConfigDict(extra="allow")

    at: Number
    kind: str
    cause: str


class JobLedgerEntry(BaseModel):
    """A ledger entry the job caused."""

    key: str
    cause: Cause
    memo: str
    at: Number
    postings: list[Posting]


class Bill(BaseModel):
    """The job's money, µcr."""

    escrowed: int
    refunded: int
    charged: int
    held: int
    compensated: int
    to_providers: int
    fees: int
    to_verifiers: int
    slashed: int


class Job(JobSummary):
    """One job with its history (GET /jobs/{id}, and what submit and cancel answer)."""

    spec: dict[str, Any]
    # Its market order: order_id, order_state, waiting, providers, and either the
    # placement or why nothing fits (decisive, reasons); None before it has one.
    market: dict[str, Any] | None = None
    losses: list[list[Number]]  # [step, loss]
    segments: list[Segment]
    audits: list[JobAudit]
    disputes: list[TrainDispute]
    events: list[JobEvent]
    ledger: list[JobLedgerEntry]
    bill: Bill


class TrainAudit(BaseModel):
    """A training audit and its verdict (operator view)."""

    id: str
    job_id: str
    segment: str
    node_id: str
    verifier_id: str | None
    canary: bool
    state: str
    verdict: dict[str, Any] | None


class TrainAuditList(BaseModel):
    """GET /train/audits."""

    audits: list[TrainAudit]


# ---- providers and verifiers ----------------------------------------------------------------


class SegmentCommitted(BaseModel):
    """A segment was stored; `continue` is false after the job's last segment."""

    model_config = ConfigDict(populate_by_name=True)

    ok: bool
    continue_: bool = Field(alias="continue")


class TrainVerdict(BaseModel):
    """A judged training audit."""

    audit_id: str
    passed: bool
    first_bad_step: int | None
    reason: str
    detail: dict[str, Any]
    exact: bool
    provider_class: str
    verifier_class: str
    weight_distance: Number | None
    canary: bool


class Probe(BaseModel):
    """A checkpoint the provider must produce now."""

    probe_id: str
    job_id: str
    step: int


class ProbeList(BaseModel):
    """POST /train/probes/poll (may be empty)."""

    probes: list[Probe]


class ProbeAnswered(BaseModel):
    """Whether the checkpoint hashed to the committed state, and the probe's state."""

    ok: bool
    state: str


class TrainDisputeQuery(BaseModel):
    """What the current round of a training dispute asks of the caller."""

    dispute_id: str
    round: int
    role: str
    job_id: str
    spec: dict[str, Any]
    start_step: int
    end_step: int
    commitment: str
    start_checkpoint: str | None
    deadline_in_s: Number
    phase: str
    step: int
    op_index: int | None = None
    agreed_checkpoint: str | None = None  # the referee's
