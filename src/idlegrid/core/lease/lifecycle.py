"""The lifecycle of a lease, as a table whose every move is named by its cause. Pure.

    pending ──placed──▶ provisioning ──provisioned──▶ running ──end | expired──▶ ending
       │                    │  │                         │                       │
       │ cancel             │  └─provisioning-failed─▶ failed ◀──provider-lost───┤
       ▼                    └─cancel─▶ ending                                    │
     ended ◀──────────────────────────────────────────────────────wiped─────────┘
    pending ──no-provider | hw-unproven | provider-lost──▶ failed
    provisioning | running ──hw-unproven──▶ ending   (a re-check of the leased class failed)

`ending` is the time between the decision to stop and the provider's word that every
process of the workspace is dead and `/work` wiped: it is not billed (docs/leases.md).
A provider that vanishes while provisioning, running or ending fails the lease; the files
are lost and the consumer is told so (a pending one fails too: nothing ran). A provider
that fails a proof of the leased class while the lease runs ends it through the normal
wipe (`hw-unproven`), billed only up to the class's last passed proof. Re-placing a lost
lease (`--restart-on-loss`) makes a new lease: it is not a move of this one.

The states are the strings a database will store: never rename one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from idlegrid.core.lifecycle import Lifecycle
from idlegrid.errors import IllegalTransition


class LeaseState(StrEnum):
    """Where a lease is."""

    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


class LeaseCause(StrEnum):
    """Why a lease moves: each cause moves it from some states to one state each."""

    PLACED = "placed"  # the auction gave it a provider
    PROVISIONED = "provisioned"  # the provider's workspace answered its first command
    PROVISIONING_FAILED = "provisioning-failed"
    NO_PROVIDER = "no-provider"  # nobody took it within the queue window
    HW_UNPROVEN = "hw-unproven"  # its provider could not prove the leased device class
    PROVIDER_LOST = "provider-lost"  # the provider's heartbeats stopped
    CANCEL = "cancel"  # the consumer gave up before it ran
    END = "end"  # the consumer ended it
    EXPIRED = "expired"  # its paid time ran out
    WIPED = "wiped"  # the provider killed every process and wiped /work


_S = LeaseState
_C = LeaseCause

# Which move each cause makes from each state it applies to. The lifecycle table below is
# built from this, so a cause and the table cannot disagree.
CAUSES: Mapping[LeaseCause, Mapping[LeaseState, LeaseState]] = {
    _C.PLACED: {_S.PENDING: _S.PROVISIONING},
    _C.PROVISIONED: {_S.PROVISIONING: _S.RUNNING},
    _C.PROVISIONING_FAILED: {_S.PROVISIONING: _S.FAILED},
    _C.NO_PROVIDER: {_S.PENDING: _S.FAILED},
    # Before anything ran it simply fails; once a workspace exists it must still be wiped.
    _C.HW_UNPROVEN: {_S.PENDING: _S.FAILED, _S.PROVISIONING: _S.ENDING, _S.RUNNING: _S.ENDING},
    _C.PROVIDER_LOST: {
        _S.PENDING: _S.FAILED,
        _S.PROVISIONING: _S.FAILED,
        _S.RUNNING: _S.FAILED,
        _S.ENDING: _S.FAILED,
    },
    # Nothing runs yet while pending, so there is nothing to wipe: straight to ended.
    _C.CANCEL: {_S.PENDING: _S.ENDED, _S.PROVISIONING: _S.ENDING},
    _C.END: {_S.RUNNING: _S.ENDING},
    _C.EXPIRED: {_S.RUNNING: _S.ENDING},
    _C.WIPED: {_S.ENDING: _S.ENDED},
}


def _moves() -> dict[StrEnum, set[StrEnum]]:
    out: dict[StrEnum, set[StrEnum]] = {}
    for table in CAUSES.values():
        for src, dst in table.items():
            out.setdefault(src, set()).add(dst)
    return out


LEASE = Lifecycle.of("lease", LeaseState, _moves(), initial={_S.PENDING})


def advance(state: str, cause: str, *, key: str | None = None, story: Sequence[str] = ()) -> str:
    """The state `cause` moves a lease in `state` to; IllegalTransition (409) if the cause
    does not apply there (its `dst` names the cause, since no state was reached)."""
    try:
        dst = CAUSES[LeaseCause(cause)].get(LeaseState(state))
    except ValueError:
        dst = None
    if dst is None:
        raise IllegalTransition(
            LEASE.name, str(state), f"({cause})", key=key, story=(*story, str(cause))
        )
    return LEASE.move(state, dst, key=key, story=story)


@dataclass(frozen=True)
class Transition:
    """A lease entered `state` at `at` (seconds, the coordinator's clock) because of `cause`;
    the first one of a lease is its creation (`pending`, cause "created")."""

    at: float
    state: str
    cause: str


def replay(transitions: Sequence[Transition], *, key: str | None = None) -> str:
    """The state a lease's recorded history ends in, checking every move against the causes
    and that time never runs backwards (ValueError)."""
    if not transitions:
        raise ValueError("a lease's history starts with its creation")
    state = LEASE.begin(transitions[0].state, key=key)
    causes: list[str] = []
    for before, t in zip(transitions, transitions[1:], strict=False):
        if t.at < before.at:
            raise ValueError(f"lease {key}: {t.cause} at {t.at} precedes {before.at}")
        reached = advance(state, t.cause, key=key, story=causes)
        if reached != t.state:
            raise IllegalTransition(LEASE.name, state, t.state, key=key, story=(*causes, t.cause))
        causes.append(t.cause)
        state = reached
    return state


def running_seconds(transitions: Sequence[Transition], now: float | None = None) -> float:
    """Exact seconds spent in `running`; a lease still running counts up to `now`."""
    replay(transitions)
    total = 0.0
    for t, nxt in zip(transitions, [*transitions[1:], None], strict=True):
        if t.state != LeaseState.RUNNING:
            continue
        if nxt is None:
            if now is None:
                raise ValueError("a running lease is billed up to `now`: pass it")
            end = max(now, t.at)
        else:
            end = nxt.at
        total += end - t.at
    return total


def billable_until(transitions: Sequence[Transition], until: float) -> int:
    """Whole seconds spent in `running` before `until` (a lease billed only up to the last
    moment its provider proved the leased class), floored once like `billable_seconds`."""
    replay(transitions)
    total = 0.0
    for t, nxt in zip(transitions, [*transitions[1:], None], strict=True):
        if t.state != LeaseState.RUNNING:
            continue
        end = until if nxt is None else min(nxt.at, until)
        total += max(0.0, end - t.at)
    return math.floor(total)


def billable_seconds(transitions: Sequence[Transition], now: float | None = None) -> int:
    """Whole seconds to bill: the time in `running` only (provisioning and ending are the
    provider's), summed exactly first and floored once, so a lease is never billed more
    than it ran and less by under one second however often it moved."""
    return math.floor(running_seconds(transitions, now))
