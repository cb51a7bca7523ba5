"""Who audits an answer, under which id, and what a canary asks: pure functions of the
coordinator's beacon secret.

- The verifier is drawn by H(secret ‖ digest ‖ round), weighted by its posted stake, among
  the verifiers of the provider's kernel family that are live, not ejected, not holding a
  lapsed audit, not on the provider's network and not excluded for this audit. Without the
  secret nobody can tell who will be drawn; with it (revealed after the epoch) anyone can
  recheck every draw.
- Audit ids are `aud-` and 24 hex digits of H(secret ‖ digest ‖ kind), real and canary
  alike: the id says nothing about which it is.
- A canary of kind "task" keeps the provider's commitment byte for byte and changes one
  character of the prompt the verifier is told to recompute, so an honest recomputation
  must disagree (its context hash differs) while the blob matches whatever the provider
  shared; a canary of kind "values" keeps the prompt and moves the first chunk's values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# An unstaked verifier weighs one µcr: chosen only when no candidate has stake.
UNSTAKED_WEIGHT = 1


def _h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"\x00".join(parts)).digest()


@dataclass(frozen=True)
class Candidate:
    """A verifier as the draw sees it."""

    node_id: str
    family: str  # kernel family of its determinism class
    address: str = ""  # peer address at registration ("" unknown)
    stake: int = 0  # posted stake, µcr
    held: bool = False  # let an audit lapse and has not reported since


def network_of(address: str, exempt_loopback: bool = True) -> str | None:
    """The network an address stands for: its /24 (IPv4) or /64 (IPv6). None when it
    matches nobody: unknown, unparsable, or loopback (the coordinator's own host) when
    `exempt_loopback`."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if exempt_loopback and ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def eligible(
    candidates: Iterable[Candidate],
    provider_id: str,
    family: str,
    provider_address: str,
    exclude: Iterable[str] = (),
    exempt_loopback: bool = True,
) -> list[Candidate]:
    """Candidates that may audit this provider's answer."""
    out = set(exclude) | {provider_id}
    net = network_of(provider_address, exempt_loopback)
    return [
        c
        for c in candidates
        if c.node_id not in out
        and c.family == family
        and not c.held
        and (net is None or network_of(c.address, exempt_loopback) != net)
    ]


def weight(c: Candidate) -> int:
    """A candidate's weight in the draw: its stake (an unstaked one weighs one µcr)."""
    return max(c.stake, 0) + UNSTAKED_WEIGHT


def pick(
    secret: bytes, digest: bytes, candidates: Sequence[Candidate], kind: str, round_: int = 0
) -> str | None:
    """Draw one verifier with probability proportional to its weight (None if none).

    `kind` ("audit" or "canary") and `round_` (how many verifiers this audit excluded
    already) make each draw of one answer independent of the others.
    """
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda c: c.node_id)
    total = sum(weight(c) for c in ordered)
    h = _h(b"verifier", kind.encode(), secret, digest, round_.to_bytes(4, "big"))
    u = int.from_bytes(h, "big") % total  # 256 bits against < 2^63: bias below 2^-190
    for c in ordered:
        u -= weight(c)
        if u < 0:
            return c.node_id
    raise AssertionError("unreachable")


def scope(task_id: str, attempt: int) -> bytes:
    """Which answer a draw or an id is for: its task and attempt. Two identical seeded
    requests commit to the same digest; this keeps their audits (and draws) apart."""
    return task_id.encode() + b"\x00" + attempt.to_bytes(4, "big")


def audit_id(secret: bytes, digest: bytes, kind: str, task_id: str, attempt: int) -> str:
    """The id of an audit of this answer (one per task attempt and kind): the same shape for
    real audits and canaries, and neither derivable without the secret."""
    return (
        "aud-" + _h(b"audit-id", kind.encode(), secret, digest, scope(task_id, attempt)).hex()[:24]
    )


def canary_probability(share: float, audit_rate: float) -> float:
    """The chance an answer gets a canary: `share` of its provider's audit rate, so canaries
    are the same share of every verifier's audits whoever the provider, and cost that share
    of the audits' compute (a flat rate per answer outweighed the audits themselves)."""
    return min(1.0, max(0.0, share) * max(0.0, audit_rate))


def canary_kind(secret: bytes, digest: bytes, payload: dict[str, Any]) -> str:
    """ "task" (perturbed prompt, commitment unchanged) or "values" (tampered commitment):
    half and half by the beacon, "values" where there is no text to perturb."""
    if not _text_of(payload):
        return "values"
    return "task" if _h(b"canary-kind", secret, digest)[0] < 128 else "values"


def _text_of(payload: dict[str, Any]) -> str:
    msgs = payload.get("messages")
    if msgs:
        content = msgs[-1].get("content")
        return content if isinstance(content, str) else ""
    prompt = payload.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def perturb_text(text: str, secret: bytes, digest: bytes) -> str:
    """`text` with one letter's case flipped (or one character changed), at a position the
    beacon picks: a different token sequence, the same length and look."""
    if not text:
        return "."
    letters = [i for i, ch in enumerate(text) if ch.isascii() and ch.isalpha()]
    spots = letters or list(range(len(text)))
    i = spots[int.from_bytes(_h(b"canary-spot", secret, digest), "big") % len(spots)]
    ch = text[i]
    new = ch.swapcase() if letters else ("." if ch != "." else ",")
    return text[:i] + new + text[i + 1 :]


def perturb_task(task: dict[str, Any], secret: bytes, digest: bytes) -> dict[str, Any]:
    """An audit task (prompt or messages) with its text perturbed as `perturb_text` says."""
    msgs = task.get("messages")
    if msgs:
        last = dict(msgs[-1])
        last["content"] = perturb_text(str(last.get("content") or ""), secret, digest)
        return {**task, "messages": [*msgs[:-1], last]}
    return {**task, "prompt": perturb_text(str(task.get("prompt") or ""), secret, digest)}


def tamper_values(chunks: Sequence[Any]) -> tuple[Any, ...]:
    """The first chunk's hidden-state values 1 % off (a "values" canary's chunks)."""
    first = chunks[0]
    bad = dataclasses.replace(first, values=tuple(v * 1.01 for v in first.values))
    return (bad, *chunks[1:])


def hold_slash(stake: int, bps: int) -> int:
    """What a verifier that let an audit lapse loses from one stake account."""
    return max(stake, 0) * bps // 10_000
