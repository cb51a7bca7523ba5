"""Data-parallel gangs: providers gather for one job until the gang is complete, then each
gets its rank's work (ranks as the market's placement gives them) and every member's job
stake is locked at once; a member that stops polling is dropped before the gang forms."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.training.common import TrainingBase
from idlegrid.coordinator.training.tables import (
    TrainCheckpoint,
    TrainJob,
)
from idlegrid.core import b64, ledger
from idlegrid.core.training import settlement as tset
from idlegrid.core.training.lifecycle import JOB

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


GANG_STALE_S = 10.0  # a gathering gang drops a member that stopped polling this long ago


@dataclass
class _Gang:
    """Providers gathering for one data-parallel job (in memory: a restarted coordinator
    loses only gangs not yet formed, whose members simply gather again)."""

    members: list[tuple[str, str]] = field(default_factory=list)  # (node, rendezvous addr)
    seen: dict[str, float] = field(default_factory=dict)


class Gangs(TrainingBase):
    """Gathering the members of data-parallel jobs."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._gangs: dict[str, _Gang] = {}  # job id → providers gathering for it
        self._handed: dict[str, dict[str, Any]] = {}  # node → its rank's work, once formed
        self._gang_lock = threading.Lock()

    def _gather(
        self,
        s: Session,
        job: TrainJob,
        node_id: str,
        addr: str,
        world: int,
        now: float,
        ranks: list[str] | None = None,
    ) -> dict[str, Any] | None:
        """Add a node to a data-parallel job's gang; once it has `world` members the job
        runs: rank 0 holds it and serves the rendezvous; every member gets its rank, the
        one the market's placement gave it (`ranks`, providers in rank order), or the
        order of joining if the placement names none. None while the gang is still
        gathering (the node keeps polling)."""
        gang = self._gangs.setdefault(job.id, _Gang())
        gang.members = [
            (n, a)
            for n, a in gang.members
            if n == node_id or now - gang.seen.get(n, now) <= GANG_STALE_S
        ]
        # Its latest address: the port was free when this poll was sent.
        gang.members = [(n, addr if n == node_id else a) for n, a in gang.members]
        if all(n != node_id for n, _ in gang.members):
            gang.members.append((node_id, addr))
        gang.seen[node_id] = now
        if len(gang.members) < world:
            return None
        order = {n: i for i, n in enumerate(ranks or [])}
        members = sorted(gang.members[:world], key=lambda m: order.get(m[0], world))
        # All or nothing: every member's job stake is locked as the gang forms, none while
        # it gathers (a gang that never forms holds no one's stake). A member that can no
        # longer cover it leaves the gang, which keeps gathering.
        need = int(job.spec["stake_required"])
        held = {n: self._balance(s, tset.job_stake_account(job.id, n)) for n, _ in members}
        short = {
            n
            for n, _ in members
            if held[n] < need and self._balance(s, ledger.provider_account(n)) < need
        }
        if short:
            gang.members = [m for m in gang.members if m[0] not in short]
            return None
        self._post_all(s, [tset.stake(job.id, n, need) for n, _ in members if held[n] < need])
        del self._gangs[job.id]
        job.state = JOB.move(job.state, "running", key=job.id, story=("gang formed",))
        job.node_id = members[0][0]
        job.attempt, job.lease_at = job.attempt + 1, now
        start = job.committed_step
        self._event(
            s,
            job.id,
            "resumed" if start > 0 else "assigned",
            f"node:{members[0][0]}",
            attempt=job.attempt,
            start_step=start,
            gang=[n for n, _ in members],
        )
        ckpt = s.get(TrainCheckpoint, (job.id, start)) if start > 0 else None
        work = {
            "job_id": job.id,
            "attempt": job.attempt,
            "spec": job.spec,
            "start_step": start,
            "checkpoint": b64.encode(ckpt.blob) if ckpt else None,
            "world": world,
            "rendezvous": members[0][1],
        }
        for rank, (n, _) in enumerate(members):
            self._handed[n] = {**work, "rank": rank}
        self.new_work.set()  # wake the members waiting in their polls
        return self._handed.pop(node_id)
