"""Whether a lease may start on its provider: the hardware proofs of the leased device
class (`core/trust/hwproof.py`, `memproof.py`). Pure.

Every registration issues one matmul and one memory challenge per claimed class, before
the provider can be matched, so a newly registered provider has proofs in flight when its
first lease is placed. The lease waits (pending, not billed) until the latest judged proof
of each kind is known: both passed → it starts and records them; either failed, or expired
because the provider never started it → the provider cannot prove the class and the lease
fails (`hw-unproven`, its escrow refunded whole; the trust rules slash a failed proof).
A class with no proofs at all (proofs off on this coordinator, or a class the catalog
cannot challenge) starts on no proof, and records none.

Once placed, a later proof of the leased class that fails or expires (a random re-check)
ends the lease (`lapse`): the consumer pays only up to the last proof of that kind that
passed, the conservative reading of "never a charge for time not delivered" (the device
may have left at any moment since; nothing shows when).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

KINDS = ("matmul", "memory")
OPEN = ("issued", "started", "committed")
JUDGED = ("passed", "failed", "expired")


class Gate(StrEnum):
    """What a lease waiting on its provider's proofs does now."""

    GO = "go"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True)
class ProofSeen:
    """One hardware proof of the leased class on the lease's provider."""

    id: str
    kind: str  # matmul | memory
    state: str  # issued | started | committed | passed | failed | expired
    done_at: float  # when it was judged (0 while open)


def proof_gate(proofs: Sequence[ProofSeen]) -> tuple[Gate, tuple[str, ...], str]:
    """(what to do, the proofs a start rests on, why it waits or fails)."""
    if not proofs:
        return Gate.GO, (), ""
    ids: list[str] = []
    waiting: list[str] = []
    for kind in KINDS:
        judged = [p for p in proofs if p.kind == kind and p.state in JUDGED]
        latest = max(judged, key=lambda p: p.done_at) if judged else None
        if latest is not None and latest.state == "passed":
            ids.append(latest.id)
        elif any(p.kind == kind and p.state in OPEN for p in proofs):
            waiting.append(kind)
        elif latest is not None:
            how = "failed" if latest.state == "failed" else "was never answered"
            return Gate.FAIL, (), f"the provider's {kind} proof {latest.id} {how}"
        else:
            return Gate.FAIL, (), f"the provider has no {kind} proof of this class"
    if waiting:
        return Gate.WAIT, (), f"waiting for the provider's {' and '.join(waiting)} proof"
    return Gate.GO, tuple(ids), ""


def lapse(proofs: Sequence[ProofSeen], since: float) -> tuple[ProofSeen, float] | None:
    """The first proof of the leased class judged not passed after `since` (when the lease
    was placed on its proofs), and when that kind last passed before it (0.0: never), or
    None while the class stays proven."""
    bad = [p for p in proofs if p.state in ("failed", "expired") and p.done_at > since]
    if not bad:
        return None
    first = min(bad, key=lambda p: p.done_at)
    passes = [
        p.done_at
        for p in proofs
        if p.kind == first.kind and p.state == "passed" and p.done_at <= first.done_at
    ]
    return first, max(passes, default=0.0)
