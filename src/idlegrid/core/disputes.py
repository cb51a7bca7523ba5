"""What every dispute game shares: who sits in which seat, whose turn it is, by when, and
strict decoding of a party's answer.

A dispute has three seats: the provider that was audited, the challenger (the verifier
whose failed audit is contested; its column is `verifier_id`) and, at the end, the referee
seat, held by a panel of k verifier-mode nodes (neither party), drawn by the beacon, each
recomputing the disputed position on its own; the majority of k rules (`draw_panel`,
`panel_ruling`, `slashed`). Both games (inference: `core/trust/bisect.py`; training:
`core/training/dispute.py`) and the coordinator's one shell
(`coordinator/trust/dispute_shell.py`) use these names and rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
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


def holds(row: Any, role: str, node_id: str) -> bool:
    """Whether `node_id` sits in `role`'s seat and still owes an answer there: the referee
    seat is every panelist that has not voted yet."""
    if role == REFEREE:
        return node_id in (row.panel or []) and node_id not in (row.votes or {})
    return party(row, role) == node_id


def asked(row: Any, waiting: Iterable[str], node_id: str) -> list[dict[str, Any]]:
    """The rounds `node_id` must answer now: one item per seat of its that is waited for."""
    return [
        {"id": row.id, "round": row.round, "role": role}
        for role in waiting
        if holds(row, role, node_id)
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
        if holds(row, role, node_id):
            return role
    raise Conflict(f"dispute {row.id} asks nothing of this node now", round=row.round)


def in_time(dispute_id: str, round_: int, deadline: float, now: float) -> None:
    """409 once a round's deadline has passed (the tick then settles it)."""
    if now > deadline:
        raise Conflict(f"round {round_} of dispute {dispute_id} is past its deadline")


def unb64(body: Mapping[str, Any], name: str) -> bytes:
    """Field `name` of an answer as strict base64 (400 naming it otherwise)."""
    return b64.decode(str(body.get(name) or ""), name)


# ---- the panel ---------------------------------------------------------------------------


def draw_panel(
    secret: bytes, dispute_id: str, stakes: Mapping[str, int], k: int, salt: int = 0
) -> tuple[str, ...]:
    """`k` distinct panelists from `stakes` (eligible node -> its stake, µcr), drawn by the
    coordinator's secret beacon, each draw weighted by stake + 1 µcr (so staked verifiers
    dominate and unstaked ones still fill a panel); () when fewer than `k` are eligible.
    `salt` makes a redraw (replacing silent panelists) independent of the first one."""
    if k <= 0 or len(stakes) < k:
        return ()
    pool = {n: max(w, 0) + 1 for n, w in sorted(stakes.items())}
    chosen: list[str] = []
    for i in range(k):
        h = hashlib.sha256(
            b"panel\x00" + secret + f"{dispute_id}\x00{salt}\x00{i}".encode()
        ).digest()
        x = int.from_bytes(h, "big") % sum(pool.values())
        for name, w in pool.items():
            if x < w:
                chosen.append(name)
                del pool[name]
                break
            x -= w
    return tuple(chosen)


@dataclass(frozen=True)
class PanelRuling:
    """What a panel decided: the side a majority of k took (None: no majority, the
    dispute expires), who voted with it (paid) and who did not (not paid, not slashed)."""

    winner: str | None
    paid: tuple[str, ...]
    unpaid: tuple[str, ...]


def panel_ruling(votes: Mapping[str, str], k: int, final: bool = False) -> PanelRuling | None:
    """The ruling once a side holds a majority of `k` (more than k/2 votes for PROVIDER,
    "the committed value holds there", or for CHALLENGER); with every one of k votes in
    (or `final`: no more will come) and no majority, a ruling with no winner. None while
    undecided."""
    for side in (PROVIDER, CHALLENGER):
        if sum(1 for v in votes.values() if v == side) > k // 2:
            paid = tuple(sorted(n for n, v in votes.items() if v == side))
            unpaid = tuple(sorted(n for n, v in votes.items() if v != side))
            return PanelRuling(side, paid, unpaid)
    if len(votes) >= k or final:
        return PanelRuling(None, (), tuple(sorted(votes)))
    return None


def slashed(winner: str | None, recomputed: bool) -> str | None:
    """Who a dispute slashes: the challenger only when a panel recomputed the disputed
    position and its majority found for the provider; nobody otherwise. (A provider whose
    dispute fails keeps the slash of the audit; the dispute adds none, it pays the panel.)"""
    return CHALLENGER if winner == PROVIDER and recomputed else None
