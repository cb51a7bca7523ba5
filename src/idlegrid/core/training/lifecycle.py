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
JOB = Lifecycle.of("train-job", JobState, {
    _J.QUEUED: {_J.RUNNING, _J.CANCELED, _J.EXPIRED},
    _J.RUNNING: {_J.QUEUED, _J.TRAINED, _J.CANCELED, _J.FAILED},
    _J.TRAINED: {_J.QUEUED, _J.DONE, _J.CANCELED},
}, initial={_J.QUEUED})

_S = SegmentState
SEGMENT = Lifecycle.of("train-segment", SegmentState, {
    _S.COMMITTED: {_S.ACCEPTED, _S.FAILED, _S.DISCARDED},
}, initial={_S.COMMITTED})

_A = TrainAuditState
TRAIN_AUDIT = Lifecycle.of("train-audit", TrainAuditState, {
    _A.PENDING: {_A.ASSIGNED, _A.DROPPED},
    _A.ASSIGNED: {_A.PENDING, _A.PASSED, _A.FAILED, _A.DROPPED},
    _A.FAILED: {_A.OVERTURNED},
}, initial={_A.PENDING})

_P = ProbeState
PROBE = Lifecycle.of("train-probe", ProbeState, {
    _P.PENDING: {_P.ANSWERED, _P.FAILED},
}, initial={_P.PENDING})
