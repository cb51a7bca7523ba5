"""Answering dispute rounds of both kinds through the one route family (`/api/v1/disputes`).

Queries ride on the heartbeat answer (`disputes`, each with its `kind`); each is answered
once, signed like any node request: ask the round (`/query`), compute, answer (`/answer`).
What is computed depends on the kind:

- inference: the provider opens its committed chunk with a Merkle path; the challenger
  answers for the numbers it reported; a referee recomputes one position (on engine 0,
  under its lock, like audits), or every vector of a disputed embedding answer;
- training: the executor replays or traces the segment (`train_replay.py`).
"""

from __future__ import annotations

import asyncio
import base64
from functools import partial
from typing import Any

from idlegrid.agent.context import AgentContext, Answers, Role
from idlegrid.agent.roles.train_replay import TrainReplay
from idlegrid.agent.roles.trainer import Training, executor
from idlegrid.agent.roles.verifier import Verifier, check
from idlegrid.core import disputes as seats
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import dispute
from idlegrid.core.trust.merkle import merkle_proof
from idlegrid.core.trust.report_codec import decode_report, encode_report
from idlegrid.protocol.messages import AuditTaskMsg


class Disputes(Role):
    """Answers dispute rounds: inference ones from the kept commitments and verifier
    reports, training ones with the executor."""

    def __init__(self, ctx: AgentContext, verifier: Verifier, training: Training) -> None:
        self.ctx = ctx
        self.verifier = verifier
        self.replay = TrainReplay(training)
        self.answers = Answers("dispute")

    def on_heartbeat(self, beat: dict[str, Any]) -> None:
        """Answer each dispute round the heartbeat asks of this node, once."""
        for q in beat.get("disputes", []):
            qid = f"{q['kind']}/{q['id']}/{q['round']}/{q['role']}"
            self.answers.start(qid, partial(self.answer, q))

    async def answer(self, q: dict[str, Any]) -> dict[str, Any]:
        """Fetch what round `q` asks of this node, compute it, send it; the reply."""
        client = self.ctx.client
        base = f"/api/v1/disputes/{q['id']}"
        got = await client.call(f"{base}/query", {"round": q["round"]})
        assert got is not None
        loop = asyncio.get_running_loop()
        if q["kind"] == "training":
            body = await loop.run_in_executor(
                None, self.replay.compute, executor(self.ctx.config), got
            )
        elif got["role"] == seats.PROVIDER:
            body = self._opening(got, int(got["position"]))
        else:
            blob = await loop.run_in_executor(
                None, self._recompute, got, got["role"], int(got["position"])
            )
            body = {"report": base64.b64encode(blob).decode()}
        out = await client.call(f"{base}/answer", {"round": got["round"], **body})
        return out or {}

    def _opening(self, got: dict[str, Any], position: int) -> dict[str, Any]:
        """Our committed chunk at `position` (the last one for the finish claim), its path."""
        blob = self.ctx.commitments.get((got["task_id"], int(got["attempt"])))
        # After a restart we no longer hold it: the coordinator's copy is bound to our root.
        c = cm.decode(blob if blob is not None else base64.b64decode(got["commitment"]))
        if not c.chunks:
            return {}
        j = min(position, len(c.chunks) - 1)
        leaves = [ch.encode() for ch in c.chunks]
        proof = merkle_proof(leaves, j)
        return {
            "chunk": base64.b64encode(leaves[j]).decode(),
            "siblings": [h.hex() for h in proof.siblings],
            "right": list(proof.right),
        }

    def _recompute(self, got: dict[str, Any], role: str, position: int) -> bytes:
        """The challenger's numbers at one position (from its kept report when it has it), or
        the referee's recompute of that position alone (prefill up to it, nothing after)."""
        engine = self.ctx.engines[0]
        msg = AuditTaskMsg.model_validate(
            {k: got[k] for k in AuditTaskMsg.model_fields if k in got}
        )
        if msg.kind == "embedding":  # a panelist recomputes every vector (no positions)
            with self.ctx.engine_lock(engine):
                return check(engine, msg)
        c = cm.decode(base64.b64decode(msg.commitment))
        kept = self.verifier.reports.get(msg.audit_id) if role == seats.CHALLENGER else None
        with self.ctx.engine_lock(engine):
            if kept is None:
                kept = check(engine, msg, dispute.truncated(c, position))
        report = decode_report(kept)
        return encode_report(dispute.only_position(report, position, len(c.chunks)))
