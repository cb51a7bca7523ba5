"""What every dispute game shares: who sits in which seat, whose turn it is, by when, and
strict decoding of a party's answer.

A dispute has three seats: the provider that was audited, the challenger (the verifier
whose failed audit is contested; its column is `verifier_id`) and, at the end, a referee
(a third verifier-mode node). Both games (inference: `core/trust/bisect.py`; training:
`core/training/dispute.py`) and the coordinator's one shell
(`coordinator/trust/dispute_shell.py`) use these names and rules.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from idlegrid.core import b64
from idlegrid.errors import Conflict

KINDS = ("inference", "training")
PROVIDER, CHALLENGER, REFEREE = "provider", "challenger", "referee"


def party(row: Any, role: str) -> str | None:
    """The node in `role`'s seat of a dispute row (provider_id, verifier_id, referee_id)."""
    return {PROVIDER: row.provider_id, CHALLENGER: row.verifier_id, REFEREE: row.referee_id}.get(
        role
    )


def asked(row: Any, waiting: Iterable[str], node_id: str) -> list[dict[str, Any]]:
    """The rounds `node_id` must answer now: one item per seat of its that is waited for."""
    return [
        {"id": row.id, "round": row.round, "role": role}
        for role in waiting
        if party(row, role) == node_id
    ]


def seat(
    row: Any, waiting: Iterable[str], node_id: str, round_: int, answering: Collection[str]
) -> str:
    """The seat `node_id` answers from at `round_` (409 if the dispute is at another round,
    not in an answering state, or asks nothing of this node now)."""
    if round_ != row.round or row.state not in answering:
        raise Conflict(
            f"dispute {row.id} is not at round {round_} (round {row.round}, {row.state})",
            round=row.round,
            state=row.state,
        )
    for role in waiting:
        if party(row, role) == node_id:
            return role
    raise Conflict(f"dispute {row.id} asks nothing of this node now", round=row.round)


def in_time(dispute_id: str, round_: int, deadline: float, now: float) -> None:
    """409 once a round's deadline has passed (the tick then settles it)."""
    if now > deadline:
        raise Conflict(f"round {round_} of dispute {dispute_id} is past its deadline")


def unb64(body: Mapping[str, Any], name: str) -> bytes:
    """Field `name` of an answer as strict base64 (400 naming it otherwise)."""
    return b64.decode(str(body.get(name) or ""), name)
