"""NVIDIA confidential-computing attestation as extra evidence for a GPU claim (optional).

Uses NVIDIA's `nv-attestation-sdk` where it is installed and the GPU runs in CC mode; the
challenger chooses the nonce, so a replayed report fails. Absent SDK, GPU or CC mode, there
is no evidence (None) and the matmul and memory proofs stand alone. Not exercised in CPU CI:
its test skips without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Evidence:
    """An attestation token bound to the challenger's nonce."""

    token: Any
    nonce: bytes


@dataclass(frozen=True)
class Claims:
    """What the verified token says."""

    nonce_match: bool
    verified: bool


def collect(nonce: bytes) -> Evidence | None:
    """Attest the local GPU with the given nonce; None where CC attestation is unavailable."""
    try:
        from nv_attestation_sdk import attestation
    except ImportError:
        return None
    client = attestation.Attestation()
    client.set_name("idlegrid")
    client.set_nonce(nonce.hex())
    client.add_verifier(attestation.Devices.GPU, attestation.Environment.LOCAL, "", "")
    if not client.attest():
        return None
    return Evidence(client.get_token(), nonce)


def verify(evidence: Evidence, nonce: bytes, policy: str = "") -> Claims:
    """Validate the token against a policy (NVIDIA's default GPU policy when empty)."""
    from nv_attestation_sdk import attestation

    client = attestation.Attestation()
    client.set_nonce(nonce.hex())
    ok = bool(client.validate_token(policy or "{}", evidence.token))
    return Claims(nonce_match=evidence.nonce == nonce and ok, verified=ok)
