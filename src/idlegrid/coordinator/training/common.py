"""What every part of the training domain shares: its settings, the job's event history,
ledger postings, closing, requeueing and rewinding a job, and base64 for checkpoints."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import delete, select, update

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.training.tables import (
    TrainAudit,
    TrainCheckpoint,
    TrainEvent,
    TrainJob,
    TrainProbe,
    TrainSegment,
)
from idlegrid.core import ledger
from idlegrid.core.training.lifecycle import JOB, SEGMENT, TRAIN_AUDIT
from idlegrid.errors import NotFound, StaleAttempt

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


LIVE_STATES = JOB.live()  # queued, running, trained


class TrainSettings(BaseSettings):
    """Training knobs; IDLEGRID_TRAIN_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="IDLEGRID_TRAIN_", extra="ignore")

    # The steady rate comes from each job's price and stake (core: 2 × p*); this is a floor.
    audit_rate: float = Field(0.0, ge=0, le=1, description="least share of segments audited")
    probation_segments: int = Field(4, ge=0, description="a new provider's first segments: all")
    canary_rate: float = Field(0.02, ge=0, le=1)
    challenge_s: float = Field(30.0, ge=0, description="an unselected segment is final after")
    lease_timeout_s: float = Field(60.0, gt=0, description="no progress this long: stalled")
    reassign_after_s: float = Field(10.0, gt=0, description="designated verifier's head start")
    audit_timeout_s: float = Field(300.0, gt=0, description="an assigned audit comes back after")
    verifier_fee_bps: int = Field(1000, ge=0, le=10_000, description="of the audited segment")
    max_jobs_per_key: int = Field(20, ge=1, description="live jobs one key may hold")
    probe_rate: float = Field(0.1, ge=0, le=1, description="commits followed by a probe")
    probe_timeout_s: float = Field(30.0, gt=0, description="a probe unanswered this long fails")
    dispute_round_s: float = Field(30.0, gt=0, description="a dispute party answers within")
    queue_ttl_s: float = Field(3600.0, gt=0, description="a job queued this long expires")
    # A job's price ceiling when its `resources` name none: what one device-hour of a
    # provider may be offered at for the market to place the job there.
    max_price: float = Field(10.0, gt=0, le=1e6, description="credits per device-hour")
    claim_timeout_s: float = Field(30.0, gt=0, description="a placed provider claims within")


class TrainingBase:
    """State and primitives the jobs, audits, probes and gangs of one coordinator share."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = TrainSettings()
        self.new_work = asyncio.Event()
        self.new_audit = asyncio.Event()
        self.new_probe = asyncio.Event()

    @property
    def store(self) -> Any:
        """The coordinator's store."""
        return self.ctx.store

    @property
    def secret(self) -> bytes:
        """The beacon secret: the trust layer's, whose hash is published per epoch."""
        secret: bytes = self.ctx.secret
        return secret

    def _event(self, s: Session, job_id: str, kind: str, cause: str, **detail: Any) -> None:
        s.add(TrainEvent(job_id=job_id, at=self.ctx.clock(), kind=kind, cause=cause, detail=detail))

    def _post_all(self, s: Session, entries: list[ledger.Entry | None]) -> None:
        for e in entries:
            if e is not None:
                self.store._post(s, e)

    def _own(self, s: Session, key_id: str, job_id: str) -> TrainJob:
        job = s.get(TrainJob, job_id)
        if job is None or job.key_id != key_id:
            raise NotFound(f"no job {job_id}", job_id=job_id)
        return job

    def _close(self, s: Session, job: TrainJob, state: str, cause: str) -> None:
        """End a job: refund what is left of its escrow, with the cause."""
        from idlegrid.core.training import settlement as tset

        left = self._balance(s, tset.job_escrow_account(job.id))
        if left > 0:
            self._post_all(s, [tset.close(job.id, job.key_id, left)])
        # Every segment is final now (paid, refunded or dropped): stakes go back, except
        # where a probe is still open (it may yet find a checkpoint was not kept).
        for acct in self._accounts(s, "stake:%:job-" + job.id):
            self._unstake(s, job.id, acct.split(":")[1])
        job.state, job.node_id = JOB.move(job.state, state, key=job.id, story=(cause,)), None
        # Canaries still run: they test the verifier, not the job.
        s.execute(
            update(TrainAudit)
            .where(
                TrainAudit.job_id == job.id,
                TrainAudit.canary.is_(False),
                TrainAudit.state == "pending",
            )
            .values(
                state=TRAIN_AUDIT.move("pending", "dropped", key=f"job:{job.id}"),
                done_at=self.ctx.clock(),
            )
        )
        self._event(s, job.id, state, cause, refunded=left, verified_step=job.verified_step)

    def _unstake(self, s: Session, job_id: str, node_id: str) -> None:
        """Return a node's job stake unless one of its probes on the job is still open."""
        from idlegrid.core.training import settlement as tset

        open_probe = s.scalars(
            select(TrainProbe.id).where(
                TrainProbe.job_id == job_id,
                TrainProbe.node_id == node_id,
                TrainProbe.state == "pending",
            )
        ).first()
        stake = self._balance(s, tset.job_stake_account(job_id, node_id))
        if open_probe is None and stake > 0:
            self._post_all(s, [tset.unstake(job_id, node_id, stake)])

    @staticmethod
    def _balance(s: Session, account: str) -> int:
        from idlegrid.coordinator.db.tables import Account

        row = s.get(Account, account)
        return int(row.balance) if row is not None else 0

    @staticmethod
    def _accounts(s: Session, pattern: str) -> dict[str, int]:
        """Positive balances of accounts matching a LIKE pattern, read in this transaction
        (so postings made earlier in it count)."""
        from idlegrid.coordinator.db.tables import Account

        return {
            a.id: int(a.balance)
            for a in s.scalars(select(Account).where(Account.id.like(pattern), Account.balance > 0))
        }

    def _requeue(self, s: Session, job: TrainJob, kind: str, cause: str) -> None:
        self._event(
            s,
            job.id,
            kind,
            cause,
            node=job.node_id,
            attempt=job.attempt,
            resume_step=job.committed_step,
        )
        job.state = JOB.move(job.state, "queued", key=job.id, story=(kind, cause))
        job.node_id, job.progress = None, {}

    def _discard_after(self, s: Session, job: TrainJob, step: int, cause: str) -> None:
        """Drop segments (and held checkpoints) past `step`; the job continues from there."""
        now = self.ctx.clock()
        s.execute(
            update(TrainSegment)
            .where(
                TrainSegment.job_id == job.id,
                TrainSegment.start_step >= step,
                TrainSegment.state.in_(SEGMENT.sources("discarded")),
            )
            .values(
                state=SEGMENT.move("committed", "discarded", key=f"job:{job.id}", story=(cause,)),
                cause=cause,
                done_at=now,
            )
        )
        s.execute(
            delete(TrainCheckpoint).where(
                TrainCheckpoint.job_id == job.id, TrainCheckpoint.step > step
            )
        )
        dropped = [
            a
            for a in s.scalars(
                select(TrainAudit).where(
                    TrainAudit.job_id == job.id,
                    TrainAudit.state.in_(TRAIN_AUDIT.sources("dropped")),
                )
            )
            if (seg := s.get(TrainSegment, a.segment_id)) is not None and seg.state == "discarded"
        ]
        for a in dropped:
            a.state, a.done_at = TRAIN_AUDIT.move(a.state, "dropped", key=a.id), now
        job.committed_step = min(job.committed_step, step)

    @staticmethod
    def _gang_of(s: Session, job: TrainJob, attempt: int) -> tuple[str, ...]:
        """The ranks that ran an attempt of a data-parallel job (rank 0 first), from the
        event that started it; () for a single provider."""
        if int(job.spec.get("parallel", 1)) == 1:
            return ()
        for e in s.scalars(
            select(TrainEvent).where(
                TrainEvent.job_id == job.id, TrainEvent.kind.in_(("assigned", "resumed"))
            )
        ):
            if e.detail.get("attempt") == attempt and e.detail.get("gang"):
                return tuple(e.detail["gang"])
        return ()

    def _held(self, s: Session, node_id: str, job_id: str, attempt: int) -> TrainJob:
        job = s.get(TrainJob, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}", job_id=job_id)
        if job.node_id != node_id or job.attempt != attempt or job.state != "running":
            raise StaleAttempt(job_id, attempt)
        return job
