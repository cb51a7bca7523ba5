"""Probes: after a commit, a provider may be asked for the checkpoint it claims to hold, at
once; one that cannot answer in time is faulted and the job resumes elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from idlegrid.coordinator.training.common import LIVE_STATES, TrainingBase
from idlegrid.coordinator.training.tables import (
    TrainCheckpoint,
    TrainJob,
    TrainProbe,
)
from idlegrid.core.training.lifecycle import PROBE
from idlegrid.core.trust import beacon
from idlegrid.errors import Conflict, NotFound

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Probes(TrainingBase):
    """Checkpoint probes of training providers."""

    def _probe(self, s: Session, job: TrainJob, node_id: str, digest: bytes, uid: str) -> None:
        """Ask the provider for one of its committed checkpoints of this job, chosen by the
        beacon: one that is not produced in time was not kept."""
        s.flush()
        held = list(
            s.scalars(
                select(TrainCheckpoint).where(
                    TrainCheckpoint.job_id == job.id, TrainCheckpoint.node_id == node_id
                )
            )
        )
        if not held:
            return
        pick = beacon.pick(self.secret, digest, [str(c.step) for c in held])
        ckpt = next(c for c in held if str(c.step) == pick)
        probe_id = f"tprb-{uid}"
        s.add(
            TrainProbe(
                id=probe_id,
                job_id=job.id,
                node_id=node_id,
                step=ckpt.step,
                sha256=ckpt.sha256,
                state=PROBE.begin("pending", key=probe_id),
                created_at=self.ctx.clock(),
                done_at=0.0,
            )
        )
        self._event(
            s,
            job.id,
            "probe-sent",
            f"beacon:{digest.hex()[:16]}",
            probe=probe_id,
            provider=node_id,
            step=ckpt.step,
        )

    async def poll_probes(self, node_id: str, wait_s: float = 5.0) -> list[dict[str, Any]]:
        """This node's pending probes (waits up to `wait_s` for one)."""
        deadline = self.ctx.clock() + wait_s
        while True:
            self.new_probe.clear()
            got = await self.ctx.db(self._pending_probes, node_id)
            remaining = deadline - self.ctx.clock()
            if got or remaining <= 0:
                return got
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.new_probe.wait(), timeout=min(remaining, 1.0))

    def _pending_probes(self, node_id: str) -> list[dict[str, Any]]:
        with self.store.read() as s:
            return [
                {"probe_id": p.id, "job_id": p.job_id, "step": p.step}
                for p in s.scalars(
                    select(TrainProbe).where(
                        TrainProbe.node_id == node_id, TrainProbe.state == "pending"
                    )
                )
            ]

    def answer_probe(self, node_id: str, probe_id: str, checkpoint: bytes) -> dict[str, Any]:
        """A probed checkpoint: it must hash to what the provider committed."""
        from idlegrid.core.training import proof

        with self.store.tx() as s:
            p = s.get(TrainProbe, probe_id)
            if p is None or p.node_id != node_id:
                raise NotFound(f"no probe {probe_id} for this node")
            if p.state != "pending":
                raise Conflict(f"probe {probe_id} is {p.state}", state=p.state)
            if not proof.probe_ok(bytes.fromhex(p.sha256), checkpoint):
                self._probe_fault(s, p, "the checkpoint is not the committed one")
                return {"ok": False, "state": p.state}
            p.state = PROBE.move(p.state, "answered", key=p.id)
            p.done_at = self.ctx.clock()
            self._event(
                s, p.job_id, "probe-answered", f"probe:{p.id}", provider=node_id, step=p.step
            )
            job = s.get(TrainJob, p.job_id)
            if job is not None and job.state not in LIVE_STATES:
                s.flush()
                self._unstake(s, job.id, node_id)  # the stake waited for this probe
            return {"ok": True, "state": p.state}

    def _probe_fault(self, s: Session, p: TrainProbe, reason: str) -> None:
        """A withheld checkpoint: slash the job stake, keep the provider off the job."""
        from idlegrid.core.training import settlement as tset

        p.state = PROBE.move(p.state, "failed", key=p.id, story=(reason,))
        p.done_at = self.ctx.clock()
        acct = tset.job_stake_account(p.job_id, p.node_id)
        stake = self._balance(s, acct)
        self._post_all(
            s,
            [tset.verifier_slash(f"probe:{p.id}", acct, stake, stake, "train checkpoint withheld")],
        )
        job = s.get(TrainJob, p.job_id)
        assert job is not None
        job.excluded = sorted({*job.excluded, p.node_id})
        self._event(
            s,
            job.id,
            "probe-failed",
            f"probe:{p.id}",
            provider=p.node_id,
            step=p.step,
            reason=reason,
            slashed=stake,
        )
        if job.state == "running" and job.node_id == p.node_id:
            self._requeue(s, job, "taken-away", f"probe:{p.id}")
            self.new_work.set()
