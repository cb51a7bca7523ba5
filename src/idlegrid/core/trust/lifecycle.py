"""Lifecycles of the trust layer, as tables. Pure.

An answer audit (or canary): pending ⇄ assigned ──▶ passed | failed ──▶ overturned
(a lapsed verifier's audit goes back to pending; a dispute won overturns a failure).

A hardware proof: issued ──▶ started ──▶ committed ──▶ passed | failed;
issued ──▶ expired (never started); started ──▶ failed (no commitment in time).

A dispute, inference (bisecting) or training (open, the parties' game):

    bisecting | open ──▶ awaiting-referee ⇄ refereeing ──▶ won | lost | expired
    bisecting | open ──────────────────────────────────▶ won | lost

The referee seat is a panel (core/disputes.py). `expired`: too few eligible verifiers for
a panel within the wait, or no majority; the audit's verdict stands and nobody is slashed.

An inference dispute's referee pick writes its state every time: with no candidate it stays
awaiting-referee, with a new referee (the last one was silent) it re-enters refereeing. A
training dispute goes back through awaiting-referee instead.

The states are the strings the database stores (migrations 0004, 0005, 0007, 0008).
"""

from __future__ import annotations

from enum import StrEnum

from idlegrid.core.lifecycle import Lifecycle


class AuditState(StrEnum):
    """Where an answer audit is."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    PASSED = "passed"
    FAILED = "failed"
    OVERTURNED = "overturned"


class HwProofState(StrEnum):
    """Where a hardware challenge is."""

    ISSUED = "issued"
    STARTED = "started"
    COMMITTED = "committed"
    PASSED = "passed"
    FAILED = "failed"
    EXPIRED = "expired"
    LATE = "late"  # right but over its time, a first time: re-tried, no slash


class DisputeState(StrEnum):
    """Where an inference dispute is."""

    BISECTING = "bisecting"
    AWAITING_REFEREE = "awaiting-referee"
    REFEREEING = "refereeing"
    WON = "won"
    LOST = "lost"
    EXPIRED = "expired"


class TrainDisputeState(StrEnum):
    """Where a training dispute is."""

    OPEN = "open"
    AWAITING_REFEREE = "awaiting-referee"
    REFEREEING = "refereeing"
    WON = "won"
    LOST = "lost"
    EXPIRED = "expired"


_A = AuditState
AUDIT = Lifecycle.of(
    "audit",
    AuditState,
    {
        _A.PENDING: {_A.ASSIGNED},
        _A.ASSIGNED: {_A.PENDING, _A.PASSED, _A.FAILED},
        _A.FAILED: {_A.OVERTURNED},
    },
    initial={_A.PENDING},
)

_H = HwProofState
HW_PROOF = Lifecycle.of(
    "hw-proof",
    HwProofState,
    {
        _H.ISSUED: {_H.STARTED, _H.EXPIRED},
        _H.STARTED: {_H.COMMITTED, _H.FAILED},
        _H.COMMITTED: {_H.PASSED, _H.FAILED, _H.LATE},
    },
    initial={_H.ISSUED},
)

_D = DisputeState
DISPUTE = Lifecycle.of(
    "dispute",
    DisputeState,
    {
        _D.BISECTING: {_D.AWAITING_REFEREE, _D.REFEREEING, _D.WON, _D.LOST},
        _D.AWAITING_REFEREE: {_D.AWAITING_REFEREE, _D.REFEREEING, _D.WON, _D.LOST, _D.EXPIRED},
        _D.REFEREEING: {_D.AWAITING_REFEREE, _D.REFEREEING, _D.WON, _D.LOST, _D.EXPIRED},
    },
    initial={_D.BISECTING},
)

_T = TrainDisputeState
TRAIN_DISPUTE = Lifecycle.of(
    "train-dispute",
    TrainDisputeState,
    {
        _T.OPEN: {_T.AWAITING_REFEREE, _T.WON, _T.LOST},
        _T.AWAITING_REFEREE: {_T.AWAITING_REFEREE, _T.REFEREEING, _T.WON, _T.LOST, _T.EXPIRED},
        _T.REFEREEING: {_T.AWAITING_REFEREE, _T.REFEREEING, _T.WON, _T.LOST, _T.EXPIRED},
    },
    initial={_T.OPEN},
)
