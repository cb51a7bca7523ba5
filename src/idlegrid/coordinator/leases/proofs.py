"""The hardware proofs a lease waits for before it starts, and those that end it once placed
(the rules: `core/lease/proofs.py`).

Reads trust's `hw_proofs` rows of the leased class on the lease's provider, inside the
leases tick's transaction; the verdicts themselves (and the slash of a failed proof) are
the trust domain's (`trust/hwproofs.py`).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from idlegrid.coordinator.trust.tables import HwProof
from idlegrid.core.lease.proofs import Gate, ProofSeen, lapse, proof_gate


def device_class(placement: dict[str, object] | None) -> str | None:
    """The device class a lease's placement holds (its first leg's offer)."""
    legs = (placement or {}).get("legs") or []
    if not isinstance(legs, list) or not legs:
        return None
    return str(legs[0]["offer_id"]).split("/", 1)[-1]


def gate(s: Session, node_id: str, cls: str | None) -> tuple[Gate, tuple[str, ...], str]:
    """Whether a lease of `cls` on `node_id` may start now, on which proofs, or why not."""
    if cls is None:
        return Gate.GO, (), ""
    rows = s.scalars(select(HwProof).where(HwProof.node_id == node_id, HwProof.claimed == cls))
    return proof_gate([ProofSeen(r.id, r.kind, r.state, r.done_at) for r in rows])


def lapsed(s: Session, node_id: str, cls: str | None, since: float) -> tuple[str, float] | None:
    """(why, when the class was last proven) once a proof of `cls` on `node_id` judged
    after `since` failed or expired; None while it stays proven."""
    if cls is None:
        return None
    rows = s.scalars(select(HwProof).where(HwProof.node_id == node_id, HwProof.claimed == cls))
    found = lapse([ProofSeen(r.id, r.kind, r.state, r.done_at) for r in rows], since)
    if found is None:
        return None
    proof, proven = found
    how = "failed" if proof.state == "failed" else "was never answered"
    return f"the provider's {proof.kind} re-check {proof.id} of {cls} {how}", proven
