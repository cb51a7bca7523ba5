"""Audit selection from a beacon the provider cannot predict.

The coordinator draws a secret per epoch and publishes its hash when the epoch starts
(commit); it reveals the secret when the epoch ends, so anyone can recheck every selection
afterwards. A request is audited iff H(secret || commitment digest || task id, attempt)
< p·2^256 (the task's scope is public in the records): the
provider learns nothing before it has committed, and changing any committed byte changes
the draw. Canaries use a separate domain of the same hash.
"""

from __future__ import annotations

import hashlib

_SCALE = 1 << 256


def beacon_commitment(secret: bytes) -> str:
    """What is published before the epoch: the hash of its secret."""
    return hashlib.sha256(b"idlegrid-beacon" + secret).hexdigest()


def draw(secret: bytes, digest: bytes, domain: bytes = b"audit") -> float:
    """A uniform number in [0, 1) fixed by the beacon secret and the commitment digest."""
    h = hashlib.sha256(domain + b"\x00" + secret + digest).digest()
    return int.from_bytes(h, "big") / _SCALE


def selected(
    secret: bytes, digest: bytes, p: float, domain: bytes = b"audit", scope: bytes = b""
) -> bool:
    """True if the request with this commitment digest is audited at rate p.

    `scope` (core/trust/selection.scope: task id and attempt) makes the draws of answers
    with one digest (identical seeded requests) independent; empty: by digest alone."""
    if p >= 1:
        return True
    h = hashlib.sha256(domain + b"\x00" + secret + digest + scope).digest()
    return int.from_bytes(h, "big") < int(p * _SCALE)


def pick(secret: bytes, digest: bytes, candidates: list[str], domain: bytes = b"verifier") -> str:
    """A verifier drawn uniformly from `candidates` (the caller excludes the provider)."""
    if not candidates:
        raise ValueError("no candidates")
    ordered = sorted(candidates)
    h = hashlib.sha256(domain + b"\x00" + secret + digest).digest()
    return ordered[int.from_bytes(h, "big") % len(ordered)]
