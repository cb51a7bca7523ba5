"""The hardware proofs a lease waits for before it starts (the rule: `core/lease/proofs.py`).

Reads trust's `hw_proofs` rows of the leased class on the lease's provider, inside the
leases tick's transaction; the verdicts themselves (and the slash of a failed proof) are
the trust domain's (`trust/hwproofs.py`).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from idlegrid.coordinator.trust.tables import HwProof
from idlegrid.core.lease.proofs import Gate, ProofSeen, proof_gate


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
