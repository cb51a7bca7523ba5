"""Lifecycles of training jobs, segments, segment audits and probes, as tables. Pure.

A job (docs/training.md, "Lifecycle of a job"):

    queued ──claim──▶ running ──last segment committed──▶ trained ──all accepted──▶ done
      ▲                  │                                   │
      └── lost / stalled / handed back / probe failed ───────┘ (rewind after a failed audit)
    queued | running | trained ──▶ canceled (consumer)      running ──▶ failed (bad spec)
    queued ──▶ expired (nobody took it within the queue TTL)

A segment: committed ──▶ accepted (paid) | failed (its audit failed) | discarded (rewound).
A segment audit: pending ⇄ assigned ──▶ passed | failed ──▶ overturned (dispute won);
pending | assigned ──▶ dropped (its segment was discarded, or the job ended).
A probe: pending ──▶ answered | failed.

The states are the strings the database stores (migration 0006_training): never rename one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from idlegrid.core.lifecycle import Lifecycle


class JobState(StrEnum):
    """Where a training job is."""

    QUEUED = "queued"
    RUNNING = "running"
    TRAINED = "trained"
    DONE = "done"
    CANCELED = "canceled"
    FAILED = "failed"
    EXPIRED = "expired"


class SegmentState(StrEnum):
    """What became of a committed segment."""

    COMMITTED = "committed"
    ACCEPTED = "accepted"
    FAILED = "failed"
    DISCARDED = "discarded"


class TrainAuditState(StrEnum):
    """Where a segment audit (or a canary) is."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    PASSED = "passed"
    FAILED = "failed"
    DROPPED = "dropped"
    OVERTURNED = "overturned"


class ProbeState(StrEnum):
    """Where an availability probe is."""

    PENDING = "pending"
    ANSWERED = "answered"
    FAILED = "failed"


_J = JobState
JOB = Lifecycle.of(
    "train-job",
    JobState,
    {
        _J.QUEUED: {_J.RUNNING, _J.CANCELED, _J.EXPIRED},
        _J.RUNNING: {_J.QUEUED, _J.TRAINED, _J.CANCELED, _J.FAILED},
        _J.TRAINED: {_J.QUEUED, _J.DONE, _J.CANCELED},
    },
    initial={_J.QUEUED},
)

_S = SegmentState
SEGMENT = Lifecycle.of(
    "train-segment",
    SegmentState,
    {
        _S.COMMITTED: {_S.ACCEPTED, _S.FAILED, _S.DISCARDED},
    },
    initial={_S.COMMITTED},
)

_A = TrainAuditState
TRAIN_AUDIT = Lifecycle.of(
    "train-audit",
    TrainAuditState,
    {
        _A.PENDING: {_A.ASSIGNED, _A.DROPPED},
        _A.ASSIGNED: {_A.PENDING, _A.PASSED, _A.FAILED, _A.DROPPED},
        _A.FAILED: {_A.OVERTURNED},
    },
    initial={_A.PENDING},
)

_P = ProbeState
PROBE = Lifecycle.of(
    "train-probe",
    ProbeState,
    {
        _P.PENDING: {_P.ANSWERED, _P.FAILED},
    },
    initial={_P.PENDING},
)


# ---- the supervisor's decisions ------------------------------------------------------------
#
# `Jobs.tick` loads a snapshot, asks these, and carries the actions out in one transaction:
# first the silent verifiers and unanswered probes (a failed probe may take its job back),
# then, from a fresh snapshot of the live jobs, expiry, lost holders and acceptance.


@dataclass(frozen=True)
class TickLimits:
    """The training knobs the supervisor's decisions read (TrainSettings)."""

    queue_ttl_s: float
    lease_timeout_s: float
    challenge_s: float
    audit_timeout_s: float
    probe_timeout_s: float


@dataclass(frozen=True)
class AssignedAudit:
    """An audit a verifier holds."""

    id: str
    assigned_at: float


@dataclass(frozen=True)
class PendingProbe:
    """A probe waiting for its checkpoint."""

    id: str
    created_at: float


@dataclass(frozen=True)
class SegmentSnap:
    """A committed segment at or past its job's verified step, with its audit (not the
    canary) if the beacon drew one."""

    id: str
    start_step: int
    end_step: int
    created_at: float
    audit_id: str | None = None
    audit_state: str | None = None


@dataclass(frozen=True)
class JobSnap:
    """A live job, with its committed segments in step order."""

    id: str
    state: str
    node_id: str | None
    created_at: float
    lease_at: float
    verified_step: int
    steps: int
    price_per_step: int
    segments: tuple[SegmentSnap, ...] = ()


@dataclass(frozen=True)
class Reassign:
    """A silent verifier's audit goes back to the pool, for anyone."""

    audit_id: str


@dataclass(frozen=True)
class FailProbe:
    """A probe not answered in time: the checkpoint was not kept."""

    probe_id: str
    reason: str


@dataclass(frozen=True)
class Expire:
    """A job nobody took within the queue TTL ends; the rest of its escrow goes back."""

    job_id: str
    cause: str


@dataclass(frozen=True)
class Requeue:
    """A running job whose holder is gone (`provider-lost`) or silent (`provider-stalled`)."""

    job_id: str
    why: str
    node_id: str | None


@dataclass(frozen=True)
class Accept:
    """A final segment, next in order: paid, its audit's verifier paid, the job moves on."""

    job_id: str
    segment_id: str
    price: int
    cause: str
    audit_id: str | None
    end_step: int


@dataclass(frozen=True)
class Finish:
    """Every step of the job is verified: it is done."""

    job_id: str


Action = Reassign | FailProbe | Expire | Requeue | Accept | Finish


def decide_timeouts(
    assigned: Sequence[AssignedAudit],
    probes: Sequence[PendingProbe],
    now: float,
    limits: TickLimits,
) -> list[Action]:
    """Silent verifiers lose their audits; probes unanswered in time fail."""
    out: list[Action] = [
        Reassign(a.id) for a in assigned if a.assigned_at < now - limits.audit_timeout_s
    ]
    out += [
        FailProbe(p.id, f"not answered within {limits.probe_timeout_s:.0f} s")
        for p in probes
        if p.created_at < now - limits.probe_timeout_s
    ]
    return out


def decide_job(job: JobSnap, live: frozenset[str], now: float, limits: TickLimits) -> list[Action]:
    """One live job: expire it if it waited too long in the queue; take it back from a
    lost or stalled holder; accept its final segments in order, stopping at the first whose
    audit has not passed, or (not audited) whose challenge window is still open; finish it
    once every step is verified."""
    if (
        job.state == JobState.QUEUED
        and now - max(job.created_at, job.lease_at or 0.0) > limits.queue_ttl_s
    ):
        # No provider took it (or took it back) for the whole window: what is left of its
        # escrow goes back rather than waiting for ever.
        return [Expire(job.id, f"queued over {limits.queue_ttl_s:.0f} s")]
    out: list[Action] = []
    if job.state == JobState.RUNNING and (
        job.node_id not in live or now - job.lease_at > limits.lease_timeout_s
    ):
        why = "provider-lost" if job.node_id not in live else "provider-stalled"
        out.append(Requeue(job.id, why, job.node_id))
    verified = job.verified_step
    for seg in job.segments:
        if seg.start_step != verified:
            break
        if seg.audit_id is not None and seg.audit_state != TrainAuditState.PASSED:
            break
        if seg.audit_id is None and now - seg.created_at < limits.challenge_s:
            break
        cause = f"audit:{seg.audit_id}" if seg.audit_id else "challenge window passed"
        price = job.price_per_step * (seg.end_step - seg.start_step)
        out.append(Accept(job.id, seg.id, price, cause, seg.audit_id, seg.end_step))
        verified = seg.end_step
    if verified >= job.steps:
        out.append(Finish(job.id))
    return out


def decide_jobs(
    jobs: Sequence[JobSnap], live: frozenset[str], now: float, limits: TickLimits
) -> list[Action]:
    """`decide_job` for each live job, in order."""
    return [a for job in jobs for a in decide_job(job, live, now, limits)]
