"""The training dispute game's moves: parsed from a party's answer, and replayed from the
stored list onto the pure game (`core/training/dispute.py`) to rebuild its state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idlegrid.coordinator.training.tables import (
    TrainDispute,
)
from idlegrid.core import disputes as seats
from idlegrid.core.training import dispute as game
from idlegrid.core.training.proof import TrainingCommitment
from idlegrid.core.trust.merkle import Proof
from idlegrid.errors import Conflict, InvalidRequest

if TYPE_CHECKING:
    pass


def hex_field(body: dict[str, Any], name: str) -> bytes:
    try:
        return bytes.fromhex(str(body.get(name) or ""))
    except ValueError as exc:
        raise InvalidRequest(f"{name} is not hex", param=name) from exc


def proof_field(body: dict[str, Any], index: int) -> Proof:
    sib = body.get("siblings") or []
    right = body.get("right") or []
    if not isinstance(sib, list) or not isinstance(right, list) or len(sib) != len(right):
        raise InvalidRequest("siblings and right must be lists of one length", param="siblings")
    try:
        return Proof(
            index, tuple(bytes.fromhex(str(h)) for h in sib), tuple(bool(r) for r in right)
        )
    except ValueError as exc:
        raise InvalidRequest("siblings are not hex", param="siblings") from exc


def replay_game(row: TrainDispute, c: TrainingCommitment) -> game.Dispute | None:
    """The game as the recorded moves left it (None before the challenger's claim)."""
    if not row.moves:
        return None
    first = row.moves[0]
    d = game.Dispute.open(c, bytes.fromhex(first["hash"]), first["at"], row.round_s)
    for m in row.moves[1:]:
        apply_move(d, m)
    return d


def apply_move(d: game.Dispute, m: dict[str, Any]) -> None:
    at, party, kind = float(m["at"]), m["party"], m["kind"]
    if kind == "step":
        d.answer_step(bytes.fromhex(m["hash"]), at)
    elif kind == "commit":
        d.commit_ops(
            party,
            int(m["n"]),
            bytes.fromhex(m["root"]),
            bytes.fromhex(m["last"]),
            Proof(
                int(m["n"]) - 1, tuple(bytes.fromhex(h) for h in m["siblings"]), tuple(m["right"])
            ),
            at,
        )
    elif kind == "open":
        d.open_op(
            party,
            bytes.fromhex(m["link"]),
            Proof(
                int(m["index"]), tuple(bytes.fromhex(h) for h in m["siblings"]), tuple(m["right"])
            ),
            at,
        )
    elif kind == "record":
        d.reveal_record(party, bytes.fromhex(m["record"]), at)


def parse_move(d: game.Dispute, party: str, body: dict[str, Any], now: float) -> dict[str, Any]:
    """A party's answer as a recorded move (validated by the core as it is applied)."""
    base = {"party": party, "at": now}
    if d.phase == "steps":
        return {**base, "kind": "step", "hash": hex_field(body, "state_hash").hex()}
    if d.phase == "ops-commit":
        n = body.get("n_ops")
        if not isinstance(n, int) or n < 0:
            raise InvalidRequest("n_ops must be a non-negative integer", param="n_ops")
        p = proof_field(body, max(n - 1, 0))
        return {
            **base,
            "kind": "commit",
            "n": n,
            "root": hex_field(body, "root").hex(),
            "last": hex_field(body, "link").hex(),
            "siblings": [h.hex() for h in p.siblings],
            "right": list(p.right),
        }
    if d.phase == "ops":
        i = d.op_query()
        p = proof_field(body, i)
        return {
            **base,
            "kind": "open",
            "index": i,
            "link": hex_field(body, "link").hex(),
            "siblings": [h.hex() for h in p.siblings],
            "right": list(p.right),
        }
    if d.phase == "records":
        return {**base, "kind": "record", "record": seats.unb64(body, "record").hex()}
    raise Conflict(f"nothing to answer in phase {d.phase}", phase=d.phase)
