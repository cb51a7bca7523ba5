"""The training-job service: escrow on submit, hand jobs to providers, take segment
commitments, draw audits by beacon, judge verifiers' replays, pay per verified step,
slash on proven faults, resume lost jobs elsewhere, and keep each job's history.

Decisions come from the pure core (`core/training`); this module reads and writes state.
Order that matters: a segment's commitment and end checkpoint are stored first, and only
then is the beacon drawn for it, from the same per-epoch secret as inference audits.
A segment is accepted (and paid) only after every earlier segment of its job is, so a
failed audit never has to claw back a payment: it rewinds the job to the failed
segment's start, which is an accepted (or the initial) state.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import delete, func, or_, select, update

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.training.tables import (
    TrainAudit,
    TrainCheckpoint,
    TrainEvent,
    TrainJob,
    TrainProbe,
    TrainSegment,
)
from idlegrid.coordinator.trust.tables import TrustNode
from idlegrid.core import ledger
from idlegrid.core.training import lifecycle as life
from idlegrid.core.training.lifecycle import JOB, PROBE, SEGMENT, TRAIN_AUDIT
from idlegrid.core.trust import beacon
from idlegrid.errors import AuthError, Conflict, InvalidRequest, NotFound, StaleAttempt

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


def b64(text: str, param: str) -> bytes:
    """Strict base64 decoding; a 400 naming the field otherwise."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{param} is not base64", param=param) from exc


def enc(data: bytes) -> str:
    """Base64 text for JSON."""
    return base64.b64encode(data).decode()


GANG_STALE_S = 10.0  # a gathering gang drops a member that stopped polling this long ago


@dataclass
class _Gang:
    """Providers gathering for one data-parallel job (in memory: a restarted coordinator
    loses only gangs not yet formed, whose members simply gather again)."""

    members: list[tuple[str, str]] = field(default_factory=list)  # (node, rendezvous addr)
    seen: dict[str, float] = field(default_factory=dict)


class Jobs:
    """Training jobs for one coordinator."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = TrainSettings()
        self.new_work = asyncio.Event()
        self.new_audit = asyncio.Event()
        self.new_probe = asyncio.Event()
        from idlegrid.coordinator.training.disputes import TrainDisputes

        self.disputes = TrainDisputes(self)
        self._gangs: dict[str, _Gang] = {}  # job id → providers gathering for it
        self._handed: dict[str, dict[str, Any]] = {}  # node → its rank's work, once formed
        self._gang_lock = threading.Lock()

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
        s.add(TrainEvent(job_id=job_id, at=self.ctx.clock(), kind=kind, cause=cause,
                         detail=detail))

    def _post_all(self, s: Session, entries: list[ledger.Entry | None]) -> None:
        for e in entries:
            if e is not None:
                self.store._post(s, e)

    # ---- consumers -----------------------------------------------------------------------

    def submit(self, key_id: str, body: Any) -> dict[str, Any]:
        """Validate a spec, escrow its full price, queue it (400 bad spec, 402 short)."""
        from idlegrid.core.training import settlement as tset
        from idlegrid.core.training.spec import JobSpec
        from idlegrid.core.training.spec import job_id as make_job_id

        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object with a 'spec'", param="spec")
        unknown = set(body) - {"spec", "ref"}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidRequest(f"unknown field '{name}'", param=name)
        ref = body.get("ref") or secrets.token_hex(8)
        if not isinstance(ref, str) or not 1 <= len(ref) <= 64:
            raise InvalidRequest("ref must be a string of 1 to 64 characters", param="ref")
        spec = JobSpec.parse(body.get("spec"))
        job_id = make_job_id(spec, ledger.consumer_account(key_id), ref)
        amount = spec.escrow_total
        now = self.ctx.clock()
        with self.store.tx() as s:
            if s.get(TrainJob, job_id) is not None:
                raise Conflict(f"job {job_id} exists already (ref '{ref}' was used)",
                               job_id=job_id)
            live = s.scalar(select(func.count()).select_from(TrainJob).where(
                TrainJob.key_id == key_id, TrainJob.state.in_(LIVE_STATES))) or 0
            if live >= self.settings.max_jobs_per_key:
                raise Conflict(f"this key holds {live} live jobs already",
                               limit=self.settings.max_jobs_per_key)
            s.add(TrainJob(id=job_id, key_id=key_id, spec=spec.to_dict(),
                           state=JOB.begin("queued", key=job_id),
                           node_id=None, attempt=0, committed_step=0, verified_step=0,
                           escrow=amount, progress={}, excluded=[], error="", created_at=now,
                           lease_at=now))
            if amount > 0:
                self._post_all(s, [tset.escrow(job_id, key_id, amount)])
            self._event(s, job_id, "submitted", f"key:{key_id}", escrow=amount,
                        steps=spec.steps, price_per_step=spec.price_per_step)
        self.new_work.set()
        self.ctx.changes.bump()
        return self.view(key_id, job_id)

    def cancel(self, key_id: str, job_id: str) -> dict[str, Any]:
        """Stop a job: verified steps stay paid, the unused escrow comes back."""
        with self.store.tx() as s:
            job = self._own(s, key_id, job_id)
            if job.state not in LIVE_STATES:
                raise Conflict(f"job {job_id} is {job.state}", state=job.state)
            self._discard_after(s, job, job.verified_step, "job canceled by its consumer")
            self._close(s, job, "canceled", f"key:{key_id}")
        self.ctx.changes.bump()
        return self.view(key_id, job_id)

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
        s.execute(update(TrainAudit).where(TrainAudit.job_id == job.id,
                                           TrainAudit.canary.is_(False),
                                           TrainAudit.state == "pending").values(
            state=TRAIN_AUDIT.move("pending", "dropped", key=f"job:{job.id}"),
            done_at=self.ctx.clock()))
        self._event(s, job.id, state, cause, refunded=left, verified_step=job.verified_step)

    def _unstake(self, s: Session, job_id: str, node_id: str) -> None:
        """Return a node's job stake unless one of its probes on the job is still open."""
        from idlegrid.core.training import settlement as tset

        open_probe = s.scalars(select(TrainProbe.id).where(
            TrainProbe.job_id == job_id, TrainProbe.node_id == node_id,
            TrainProbe.state == "pending")).first()
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

        return {a.id: int(a.balance) for a in s.scalars(select(Account).where(
            Account.id.like(pattern), Account.balance > 0))}

    def jobs(self, key_id: str) -> list[dict[str, Any]]:
        """The key's jobs, newest first, without their history."""
        with self.store.read() as s:
            rows = list(s.scalars(select(TrainJob).where(TrainJob.key_id == key_id)
                                  .order_by(TrainJob.created_at.desc())))
            return [self._summary(j) for j in rows]

    @staticmethod
    def _summary(j: TrainJob) -> dict[str, Any]:
        spec = j.spec
        return {"id": j.id, "state": j.state, "steps": spec["steps"],
                "committed_step": j.committed_step, "verified_step": j.verified_step,
                "price_per_step": spec["price_per_step"], "escrow": j.escrow,
                "provider": j.node_id, "progress": j.progress, "error": j.error or None,
                "created_at": j.created_at}

    def view(self, key_id: str, job_id: str) -> dict[str, Any]:
        """One job with its history: segments, audits, events and ledger entries."""
        with self.store.read() as s:
            job = self._own(s, key_id, job_id)
            segs = list(s.scalars(select(TrainSegment).where(TrainSegment.job_id == job_id)
                                  .order_by(TrainSegment.created_at)))
            audits = list(s.scalars(select(TrainAudit).where(TrainAudit.job_id == job_id)
                                    .order_by(TrainAudit.created_at)))
            events = list(s.scalars(select(TrainEvent).where(TrainEvent.job_id == job_id)
                                    .order_by(TrainEvent.id)))
            out = self._summary(job)
            out["spec"] = job.spec
            disputes = self.disputes.of_job(s, job_id)
        losses: list[list[float]] = []
        for g in segs:
            if g.state in ("committed", "accepted"):
                losses += [[leaf.step, leaf.loss] for leaf in self._leaves(g.blob)]
        with self.store.read() as s:
            probes = [p.id for p in s.scalars(select(TrainProbe).where(
                TrainProbe.job_id == job_id))]
        causes = ([a.id for a in audits] + [f"probe:{p}" for p in probes]
                  + [d["id"] for d in disputes])
        entries = self._entries(job_id, causes, [a.id for a in audits if a.canary])
        paid = bill(entries, ledger.consumer_account(key_id))
        out.update({
            "losses": sorted(losses),
            "segments": [{"id": g.id, "index": g.idx, "start_step": g.start_step,
                          "end_step": g.end_step, "provider": g.node_id, "attempt": g.attempt,
                          "root": g.root, "det_class": g.det_class, "state": g.state,
                          "cause": g.cause} for g in segs],
            "audits": out_audits(audits),
            "disputes": disputes,
            "events": [{"at": e.at, "kind": e.kind, "cause": e.cause, **e.detail}
                       for e in events],
            "ledger": entries,
            "bill": paid,
        })
        return out

    def _entries(self, job_id: str, causes: list[str],
                 per_account: list[str]) -> list[dict[str, Any]]:
        """Ledger entries caused by the job, its segments, audits and probes, oldest first
        (`per_account`: causes whose entries are keyed per slashed account)."""
        from idlegrid.coordinator.db.tables import LedgerEntry, LedgerPosting

        with self.store.read() as s:
            rows = list(s.scalars(select(LedgerEntry).where(or_(
                LedgerEntry.cause_id == job_id, LedgerEntry.cause_id.like(f"{job_id}:%"),
                LedgerEntry.cause_id.in_(causes),
                *(LedgerEntry.cause_id.like(f"{c}:%") for c in per_account)))
                .order_by(LedgerEntry.seq)))
            seqs = [e.seq for e in rows]
            postings: dict[int, list[dict[str, Any]]] = {}
            for seq, acct, amount in s.execute(select(
                    LedgerPosting.entry_seq, LedgerPosting.account, LedgerPosting.amount)
                    .where(LedgerPosting.entry_seq.in_(seqs))):
                postings.setdefault(seq, []).append({"account": acct, "amount": amount})
            return [{"key": e.key, "cause": {"kind": e.cause_kind, "id": e.cause_id},
                     "memo": e.memo, "at": e.created_at, "postings": postings.get(e.seq, [])}
                    for e in rows]

    @staticmethod
    def _leaves(blob: bytes) -> list[Any]:
        from idlegrid.core.training.proof import TrainingCommitment

        return list(TrainingCommitment.from_bytes(blob).leaves)

    # ---- providers -----------------------------------------------------------------------

    async def poll(self, node_id: str, det_class: str, wait_s: float,
                   gang_addr: str = "") -> dict[str, Any] | None:
        """A job for this provider, or None after `wait_s`. A node that names a
        `gang_addr` may also join a data-parallel job's gang (its work comes once the gang
        is complete)."""
        if node_id in self.ctx.ejected:
            raise AuthError("this node was ejected after failed audits")
        return await self.ctx.long_poll(self.new_work,
                                         lambda: self._claim(node_id, gang_addr), wait_s)

    def _claim(self, node_id: str, gang_addr: str = "") -> dict[str, Any] | None:
        with self._gang_lock:  # gangs live in memory; claims run on the db threads
            return self._claim_locked(node_id, gang_addr)

    def _claim_locked(self, node_id: str, gang_addr: str) -> dict[str, Any] | None:
        from idlegrid.core.training import settlement as tset

        now = self.ctx.clock()
        with self.store.tx() as s:
            handed = self._handed.pop(node_id, None)
            if handed is not None:
                job = s.get(TrainJob, handed["job_id"])
                if (job is not None and job.state == "running"
                        and job.attempt == handed["attempt"]):
                    return handed  # its gang formed while it was between polls
            free = self._balance(s, ledger.provider_account(node_id))
            rows = s.scalars(select(TrainJob).where(TrainJob.state == "queued")
                             .order_by(TrainJob.created_at).limit(50))
            for job in rows:
                need = int(job.spec["stake_required"])
                held = self._balance(s, tset.job_stake_account(job.id, node_id))
                if node_id in job.excluded or (held < need and free < need):
                    continue
                world = int(job.spec.get("parallel", 1))
                if world > 1:
                    if not gang_addr:
                        continue  # this node cannot serve a gang's rendezvous
                    got = self._gather(s, job, node_id, gang_addr, world, now)
                    if need > 0 and held < need:
                        # Each member's stake is locked as it joins; returned at the end
                        # of the job like a single provider's.
                        self._post_all(s, [tset.stake(job.id, node_id, need)])
                    return got
                res = s.execute(update(TrainJob).where(
                    TrainJob.id == job.id, TrainJob.state == job.state).values(
                    state=JOB.move(job.state, "running", key=job.id), node_id=node_id,
                    attempt=TrainJob.attempt + 1, lease_at=now))
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                s.refresh(job)
                if need > 0 and held < need:
                    # The job's stake is locked as the job is taken: slashed on a proven
                    # fault in it, returned when the job ends.
                    self._post_all(s, [tset.stake(job.id, node_id, need)])
                start = job.committed_step
                kind = "resumed" if start > 0 else "assigned"
                self._event(s, job.id, kind, f"node:{node_id}", attempt=job.attempt,
                            start_step=start)
                ckpt = s.get(TrainCheckpoint, (job.id, start)) if start > 0 else None
                return {"job_id": job.id, "attempt": job.attempt, "spec": job.spec,
                        "start_step": start, "checkpoint": enc(ckpt.blob) if ckpt else None}
        return None

    def _gather(self, s: Session, job: TrainJob, node_id: str, addr: str, world: int,
                now: float) -> dict[str, Any] | None:
        """Add a node to a data-parallel job's gang; once it has `world` members the job
        runs: rank 0 (the first to join) holds it and serves the rendezvous; every member
        gets its rank. None while the gang is still gathering (the node keeps polling)."""
        gang = self._gangs.setdefault(job.id, _Gang())
        gang.members = [(n, a) for n, a in gang.members
                        if n == node_id or now - gang.seen.get(n, now) <= GANG_STALE_S]
        # Its latest address: the port was free when this poll was sent.
        gang.members = [(n, addr if n == node_id else a) for n, a in gang.members]
        if all(n != node_id for n, _ in gang.members):
            gang.members.append((node_id, addr))
        gang.seen[node_id] = now
        if len(gang.members) < world:
            return None
        del self._gangs[job.id]
        members = gang.members[:world]
        job.state = JOB.move(job.state, "running", key=job.id, story=("gang formed",))
        job.node_id = members[0][0]
        job.attempt, job.lease_at = job.attempt + 1, now
        start = job.committed_step
        self._event(s, job.id, "resumed" if start > 0 else "assigned", f"node:{members[0][0]}",
                    attempt=job.attempt, start_step=start, gang=[n for n, _ in members])
        ckpt = s.get(TrainCheckpoint, (job.id, start)) if start > 0 else None
        work = {"job_id": job.id, "attempt": job.attempt, "spec": job.spec,
                "start_step": start, "checkpoint": enc(ckpt.blob) if ckpt else None,
                "world": world, "rendezvous": members[0][1]}
        for rank, (n, _) in enumerate(members):
            self._handed[n] = {**work, "rank": rank}
        self.new_work.set()  # wake the members waiting in their polls
        return self._handed.pop(node_id)

    @staticmethod
    def _gang_of(s: Session, job: TrainJob, attempt: int) -> tuple[str, ...]:
        """The ranks that ran an attempt of a data-parallel job (rank 0 first), from the
        event that started it; () for a single provider."""
        if int(job.spec.get("parallel", 1)) == 1:
            return ()
        for e in s.scalars(select(TrainEvent).where(
                TrainEvent.job_id == job.id, TrainEvent.kind.in_(("assigned", "resumed")))):
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

    def progress(self, node_id: str, job_id: str, attempt: int, step: int, loss: float,
                 tokens_per_s: float) -> None:
        """The holder's live progress (not settled on: commitments are)."""
        now = self.ctx.clock()
        with self.store.tx() as s:
            job = self._held(s, node_id, job_id, attempt)
            if step > int(job.spec["steps"]):
                raise InvalidRequest("step is past the job's end", param="step")
            job.progress = {"step": step, "loss": loss, "tokens_per_s": tokens_per_s, "at": now}
            job.lease_at = now
        self.ctx.changes.bump()

    def commit(self, node_id: str, job_id: str, attempt: int, index: int, commitment: bytes,
               checkpoint: bytes, det_class: str) -> dict[str, Any]:
        """Store a segment's commitment and end checkpoint, then draw its audit."""
        from idlegrid.core.training import proof
        from idlegrid.core.training.spec import segments

        now = self.ctx.clock()
        try:
            c = proof.TrainingCommitment.from_bytes(commitment)
        except InvalidRequest as exc:
            raise InvalidRequest(f"commitment: {exc.message}", param="commitment") from exc
        except ValueError as exc:
            raise InvalidRequest(f"commitment: {exc}", param="commitment") from exc
        with self.store.tx() as s:
            job = self._held(s, node_id, job_id, attempt)
            bounds = segments(int(job.spec["steps"]), int(job.spec["checkpoint_interval"]))
            if not 0 <= index < len(bounds):
                raise InvalidRequest(f"segment {index} does not exist", param="index")
            start, end = bounds[index]
            if start != job.committed_step:
                raise Conflict(f"segment {index} starts at {start}; the job is at step "
                               f"{job.committed_step}", expected_step=job.committed_step)
            steps = [leaf.step for leaf in c.leaves]
            if c.job_id != job_id or c.start_step != start or steps != list(range(start, end)):
                raise InvalidRequest(f"commitment must cover steps {start}..{end - 1} of "
                                     f"{job_id}", param="commitment")
            if start > 0:
                prev = s.scalars(select(TrainSegment).where(
                    TrainSegment.job_id == job_id, TrainSegment.end_step == start,
                    TrainSegment.state.in_(("committed", "accepted")))).first()
                if prev is None or not c.follows(proof.TrainingCommitment.from_bytes(prev.blob)):
                    raise InvalidRequest("commitment does not start from the state the "
                                         "previous segment committed", param="commitment")
            if hashlib.sha256(checkpoint).digest() != c.end_hash:
                # Checkpoints are their state's canonical bytes (training/verified.py): the
                # one a provider leaves must be the state its last leaf commits to.
                raise InvalidRequest("checkpoint does not hash to the last committed leaf",
                                     param="checkpoint")
            digest = c.digest()
            seg_id = f"{job_id}:{index}:{attempt}"
            s.add(TrainSegment(id=seg_id, job_id=job_id, idx=index, start_step=start,
                               end_step=end, node_id=node_id, attempt=attempt, blob=commitment,
                               digest=digest.hex(), root=c.root.hex(), det_class=det_class,
                               state=SEGMENT.begin("committed", key=seg_id),
                               cause=f"commit by node:{node_id}",
                               created_at=now, done_at=0.0))
            s.merge(TrainCheckpoint(job_id=job_id, step=end, node_id=node_id,
                                    sha256=hashlib.sha256(checkpoint).hexdigest(),
                                    blob=checkpoint, created_at=now))
            job.committed_step = end
            job.lease_at = now
            last = end >= int(job.spec["steps"])
            if last:
                job.state = JOB.move(job.state, "trained", key=job_id, story=(seg_id,))
                job.node_id = None
            self._event(s, job_id, "committed", f"node:{node_id}", segment=seg_id,
                        start_step=start, end_step=end, root=c.root.hex(),
                        loss=c.leaves[-1].loss)
            # Stored above, drawn only now: the provider committed before selection.
            audited = self._draw(s, job, seg_id, node_id, digest, c)
        if audited:
            self.new_audit.set()
        self.new_probe.set()
        self.ctx.changes.bump()
        return {"ok": True, "continue": not last}

    def _draw(self, s: Session, job: TrainJob, seg_id: str, node_id: str, digest: bytes,
              c: Any) -> bool:
        from idlegrid.core.training import proof

        now = self.ctx.clock()
        passed = s.scalar(select(func.count()).select_from(TrainAudit).where(
            TrainAudit.node_id == node_id, TrainAudit.state == "passed",
            TrainAudit.canary.is_(False))) or 0
        st = self.settings
        spec = job.spec
        steady = proof.audit_rate(int(spec["price_per_step"]), int(spec["checkpoint_interval"]),
                                  int(spec["stake_required"]))
        rate = 1.0 if passed < st.probation_segments else max(st.audit_rate, steady)
        if c.start_step == 0:
            # Only a replay of the first segment checks the initial weights against the
            # job seed (later segments chain from it), so it is always audited.
            rate = 1.0
        verifiers = [v for v in s.scalars(select(TrustNode.node_id).where(
            TrustNode.verifier.is_(True), TrustNode.ejected.is_(False))) if v != node_id]
        designated = beacon.pick(self.secret, digest, verifiers) if verifiers else None
        made = []
        # An honest re-run of a segment (after a rewind) commits the same digest again:
        # ids name the segment row too, so each commit has its own audit and probe.
        uid = hashlib.sha256(digest + seg_id.encode()).hexdigest()[:24]
        if proof.select_segment(self.secret, digest, rate):
            made.append((f"taud-{uid}", False, c.to_bytes()))
        if beacon.selected(self.secret, digest, st.canary_rate, domain=b"train-canary"):
            seed = int.from_bytes(hashlib.sha256(self.secret + digest).digest()[:8], "little")
            made.append((f"tcan-{uid}", True, proof.canary_commitment(c, seed).to_bytes()))
        for audit_id, is_canary, blob in made:
            s.add(TrainAudit(id=audit_id, job_id=job.id, segment_id=seg_id, node_id=node_id,
                             designated=designated, verifier_id=None, canary=is_canary,
                             blob=blob, state=TRAIN_AUDIT.begin("pending", key=audit_id),
                             verdict={}, created_at=now,
                             assigned_at=0.0, done_at=0.0))
            if not is_canary:
                self._event(s, job.id, "audit-selected", f"beacon:{digest.hex()[:16]}",
                            audit=audit_id, segment=seg_id, rate=rate)
        if beacon.selected(self.secret, digest, st.probe_rate, domain=b"train-probe"):
            self._probe(s, job, node_id, digest, uid)
        return bool(made)

    def _probe(self, s: Session, job: TrainJob, node_id: str, digest: bytes,
               uid: str) -> None:
        """Ask the provider for one of its committed checkpoints of this job, chosen by the
        beacon: one that is not produced in time was not kept."""
        s.flush()
        held = list(s.scalars(select(TrainCheckpoint).where(
            TrainCheckpoint.job_id == job.id, TrainCheckpoint.node_id == node_id)))
        if not held:
            return
        pick = beacon.pick(self.secret, digest, [str(c.step) for c in held])
        ckpt = next(c for c in held if str(c.step) == pick)
        probe_id = f"tprb-{uid}"
        s.add(TrainProbe(id=probe_id, job_id=job.id, node_id=node_id, step=ckpt.step,
                         sha256=ckpt.sha256, state=PROBE.begin("pending", key=probe_id),
                         created_at=self.ctx.clock(),
                         done_at=0.0))
        self._event(s, job.id, "probe-sent", f"beacon:{digest.hex()[:16]}", probe=probe_id,
                    provider=node_id, step=ckpt.step)

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
            return [{"probe_id": p.id, "job_id": p.job_id, "step": p.step}
                    for p in s.scalars(select(TrainProbe).where(
                        TrainProbe.node_id == node_id, TrainProbe.state == "pending"))]

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
            self._event(s, p.job_id, "probe-answered", f"probe:{p.id}", provider=node_id,
                        step=p.step)
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
        self._post_all(s, [tset.verifier_slash(f"probe:{p.id}", acct, stake, stake,
                                               "train checkpoint withheld")])
        job = s.get(TrainJob, p.job_id)
        assert job is not None
        job.excluded = sorted({*job.excluded, p.node_id})
        self._event(s, job.id, "probe-failed", f"probe:{p.id}", provider=p.node_id,
                    step=p.step, reason=reason, slashed=stake)
        if job.state == "running" and job.node_id == p.node_id:
            self._requeue(s, job, "taken-away", f"probe:{p.id}")
            self.new_work.set()

    def release(self, node_id: str, job_id: str, attempt: int, reason: str,
                kind: str) -> dict[str, Any]:
        """The holder gives the job back: it resumes elsewhere, or fails on a bad spec."""
        with self.store.tx() as s:
            job = self._held(s, node_id, job_id, attempt)
            if kind == "invalid_request":
                # Every provider would refuse it (e.g. a dataset hash no corpus has).
                job.error = reason[:500]
                self._discard_after(s, job, job.verified_step, "job failed")
                self._close(s, job, "failed", f"node:{node_id}: {reason[:120]}")
            elif kind == "unsuitable":  # not a fault: it just never gets this job again
                job.excluded = sorted({*job.excluded, node_id})
                self._requeue(s, job, "declined", f"node:{node_id}: {reason[:120]}")
            else:
                self._requeue(s, job, "handed-back", f"node:{node_id}: {reason[:120]}")
        self.new_work.set()
        self.ctx.changes.bump()
        return {"ok": True}

    def _requeue(self, s: Session, job: TrainJob, kind: str, cause: str) -> None:
        self._event(s, job.id, kind, cause, node=job.node_id, attempt=job.attempt,
                    resume_step=job.committed_step)
        job.state = JOB.move(job.state, "queued", key=job.id, story=(kind, cause))
        job.node_id, job.progress = None, {}

    # ---- verifiers -----------------------------------------------------------------------

    async def poll_audit(self, node_id: str, wait_s: float = 5.0) -> dict[str, Any] | None:
        """A segment audit for this verifier (never its own segments), or None."""
        return await self.ctx.long_poll(self.new_audit, lambda: self._claim_audit(node_id),
                                         wait_s)

    def _claim_audit(self, node_id: str) -> dict[str, Any] | None:
        now = self.ctx.clock()
        with self.store.tx() as s:
            me = s.get(TrustNode, node_id)
            if me is None or not me.verifier or me.ejected:
                raise AuthError("this node is not an active verifier")
            rows = s.scalars(select(TrainAudit).where(
                TrainAudit.state == "pending", TrainAudit.node_id != node_id)
                .order_by(TrainAudit.created_at).limit(20))
            for a in rows:
                if a.designated not in (None, node_id) and \
                        now - a.created_at < self.settings.reassign_after_s:
                    continue
                seg = s.get(TrainSegment, a.segment_id)
                job = s.get(TrainJob, a.job_id)
                assert seg is not None and job is not None
                if node_id in self._gang_of(s, job, seg.attempt):
                    continue  # a rank of the gang that trained it: its own work
                res = s.execute(update(TrainAudit).where(
                    TrainAudit.id == a.id, TrainAudit.state == a.state).values(
                    state=TRAIN_AUDIT.move(a.state, "assigned", key=a.id),
                    verifier_id=node_id, assigned_at=now))
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                start = s.get(TrainCheckpoint, (job.id, seg.start_step))
                end = s.get(TrainCheckpoint, (job.id, seg.end_step))
                if end is None or (seg.start_step > 0 and start is None):
                    # Rewound past it meanwhile.
                    a.state, a.done_at = TRAIN_AUDIT.move(a.state, "dropped", key=a.id), now
                    continue
                return {"audit_id": a.id, "job_id": job.id, "spec": job.spec,
                        "start_step": seg.start_step, "end_step": seg.end_step,
                        "start_checkpoint": enc(start.blob) if start else None,
                        "end_checkpoint": enc(end.blob), "commitment": enc(a.blob)}
        return None

    def report(self, node_id: str, audit_id: str, leaves: bytes, weight_distance: float | None,
               det_class: str, checkpoints_match: bool) -> dict[str, Any]:
        """Judge a verifier's replay against the commitment and apply the consequences."""
        from idlegrid.core.training import proof
        from idlegrid.core.training import settlement as tset

        try:
            recomputed = proof.TrainingCommitment.from_bytes(leaves)
        except (InvalidRequest, ValueError) as exc:
            raise InvalidRequest(f"leaves: {exc}", param="leaves") from exc
        now = self.ctx.clock()
        with self.store.tx() as s:
            a = s.get(TrainAudit, audit_id)
            if a is None:
                raise NotFound(f"no audit {audit_id}")
            if a.verifier_id != node_id or a.state != "assigned":
                raise Conflict(f"audit {audit_id} is not assigned to this node", state=a.state)
            seg = s.get(TrainSegment, a.segment_id)
            job = s.get(TrainJob, a.job_id)
            assert seg is not None and job is not None
            committed = proof.TrainingCommitment.from_bytes(a.blob)
            exact = bool(seg.det_class) and seg.det_class == det_class
            v = judge(committed, recomputed, exact, weight_distance, checkpoints_match)
            verdict = {"passed": v.ok, "first_bad_step": v.first_bad_step, "reason": v.reason,
                       "detail": v.detail, "exact": exact, "provider_class": seg.det_class,
                       "verifier_class": det_class, "weight_distance": weight_distance,
                       "canary": a.canary}
            a.state = TRAIN_AUDIT.move(a.state, "passed" if v.ok else "failed", key=a.id,
                                       story=(f"verifier:{node_id}",))
            a.done_at, a.verdict = now, verdict
            price = int(job.spec["price_per_step"]) * (seg.end_step - seg.start_step)
            consumer = ledger.consumer_account(job.key_id)
            verifier = s.get(TrustNode, node_id)
            assert verifier is not None
            if a.canary:
                if v.ok:  # approved a planted wrong commitment: lazy or colluding
                    verifier.verifier_failed += 1
                    verifier.ejected = True
                    self.ctx.ejected.add(node_id)
                    self._post_all(s, [tset.verifier_slash(
                        f"{audit_id}:{acct}", acct, bal, bal, "train canary approved")
                        for acct, bal in self._accounts(s, f"stake:{node_id}:%").items()])
                    self._event(s, job.id, "canary-failed", f"audit:{audit_id}",
                                verifier=node_id)
                else:
                    verifier.verifier_passed += 1
                return {"audit_id": audit_id, **verdict}
            verifier.verifier_passed += 1
            if not v.ok:  # a passed audit's fee is paid with the segment (see tick)
                self._pay_verifier(s, a, price)
            self._event(s, job.id, "audit-passed" if v.ok else "audit-failed",
                        f"audit:{audit_id}", segment=seg.id, verifier=node_id,
                        reason=v.reason, first_bad_step=v.first_bad_step)
            if not v.ok and seg.state == "committed":
                self._fault(s, job, seg, audit_id, node_id, consumer, price)
        self.ctx.changes.bump()
        self.new_work.set()
        return {"audit_id": audit_id, **verdict}

    def _pay_verifier(self, s: Session, a: TrainAudit, price: int) -> None:
        """The verifier's fee, out of the protocol fees (capped by what they hold)."""
        from idlegrid.core.training import settlement as tset

        if a.verifier_id is None:
            return
        fee = price * self.settings.verifier_fee_bps // 10_000
        self._post_all(s, [tset.audit_fee(a.id, a.verifier_id, fee,
                                          self._balance(s, ledger.FEES))])

    def _fault(self, s: Session, job: TrainJob, seg: TrainSegment, audit_id: str,
               verifier_id: str, consumer: str, price: int) -> None:
        """A proven fault: slash, refund, exclude the provider and rewind to the segment."""
        from idlegrid.core.training import settlement as tset

        provider = seg.node_id
        stake = self._balance(s, tset.job_stake_account(job.id, provider))
        # The whole job stake: the consumer's compensation (the segment's price) first.
        self._post_all(s, [tset.slash(job.id, seg.idx, provider, stake, stake, job.key_id,
                                      price, verifier_id)])
        seg.state = SEGMENT.move(seg.state, "failed", key=seg.id, story=(f"audit:{audit_id}",))
        seg.done_at, seg.cause = self.ctx.clock(), f"audit:{audit_id}"
        node = s.get(TrustNode, provider)
        if node is not None:
            node.failed += 1
        job.excluded = sorted({*job.excluded, provider})
        self._event(s, job.id, "slashed", f"audit:{audit_id}", provider=provider,
                    stake=stake, compensation=min(price, stake))
        self._discard_after(s, job, seg.start_step, f"built on failed segment {seg.id}")
        if JOB.allowed(job.state, "queued"):  # running or trained: taken back, rewound
            holder = job.node_id
            job.state = JOB.move(job.state, "queued", key=job.id, story=(f"audit:{audit_id}",))
            job.node_id, job.progress = None, {}
            self._event(s, job.id, "rewound", f"audit:{audit_id}", resume_step=seg.start_step,
                        taken_from=holder)

    def _discard_after(self, s: Session, job: TrainJob, step: int, cause: str) -> None:
        """Drop segments (and held checkpoints) past `step`; the job continues from there."""
        now = self.ctx.clock()
        s.execute(update(TrainSegment).where(
            TrainSegment.job_id == job.id, TrainSegment.start_step >= step,
            TrainSegment.state.in_(SEGMENT.sources("discarded"))).values(
            state=SEGMENT.move("committed", "discarded", key=f"job:{job.id}", story=(cause,)),
            cause=cause, done_at=now))
        s.execute(delete(TrainCheckpoint).where(TrainCheckpoint.job_id == job.id,
                                                TrainCheckpoint.step > step))
        dropped = [a for a in s.scalars(select(TrainAudit).where(
            TrainAudit.job_id == job.id, TrainAudit.state.in_(TRAIN_AUDIT.sources("dropped"))))
            if (seg := s.get(TrainSegment, a.segment_id)) is not None
            and seg.state == "discarded"]
        for a in dropped:
            a.state, a.done_at = TRAIN_AUDIT.move(a.state, "dropped", key=a.id), now
        job.committed_step = min(job.committed_step, step)

    # ---- supervision ---------------------------------------------------------------------

    def tick(self, live: frozenset[str]) -> None:
        """Accept final segments in order, pay them, finish jobs; take jobs from lost
        providers; hand silent verifiers' audits to others. The decisions are the core's
        (`core/training/lifecycle.py`): load a snapshot, decide, apply."""
        now = self.ctx.clock()
        st = self.settings
        with self.store.read() as r:  # most ticks find nothing: no write lock for that
            busy = any(r.scalars(q.limit(1)).first() is not None for q in (
                select(TrainJob.id).where(TrainJob.state.in_(LIVE_STATES)),
                select(TrainProbe.id).where(TrainProbe.state == "pending"),
                select(TrainAudit.id).where(TrainAudit.state == "assigned")))
        if not busy:
            return
        limits = life.TickLimits(st.queue_ttl_s, st.lease_timeout_s, st.challenge_s,
                                 st.audit_timeout_s, st.probe_timeout_s)
        with self.store.tx() as s:
            assigned = [life.AssignedAudit(i, at) for i, at in s.execute(
                select(TrainAudit.id, TrainAudit.assigned_at).where(
                    TrainAudit.state.in_(TRAIN_AUDIT.sources("pending"))))]
            probes = {p.id: p for p in s.scalars(select(TrainProbe).where(
                TrainProbe.state.in_(PROBE.sources("failed"))))}
            snap = [life.PendingProbe(p.id, p.created_at) for p in probes.values()]
            for act in life.decide_timeouts(assigned, snap, now, limits):
                if isinstance(act, life.Reassign):
                    s.execute(update(TrainAudit).where(
                        TrainAudit.id == act.audit_id, TrainAudit.state == "assigned").values(
                        state=TRAIN_AUDIT.move("assigned", "pending", key=act.audit_id,
                                               story=("verifier silent",)),
                        verifier_id=None, designated=None))
                elif isinstance(act, life.FailProbe):
                    self._probe_fault(s, probes[act.probe_id], act.reason)
            # Read after the probes: a failed one may have taken its job back.
            jobs = {j.id: j for j in s.scalars(select(TrainJob).where(
                TrainJob.state.in_(LIVE_STATES)))}
            for job in jobs.values():
                segs = {g.id: g for g in s.scalars(select(TrainSegment).where(
                    TrainSegment.job_id == job.id,
                    TrainSegment.state.in_(SEGMENT.sources("accepted")),
                    TrainSegment.start_step >= job.verified_step)
                    .order_by(TrainSegment.start_step))}
                audits: dict[str, TrainAudit] = {}  # a segment's audit (one per commit)
                for a in s.scalars(select(TrainAudit).where(
                        TrainAudit.segment_id.in_(list(segs)), TrainAudit.canary.is_(False))
                        .order_by(TrainAudit.created_at)) if segs else ():
                    audits.setdefault(a.segment_id, a)
                view = life.JobSnap(
                    job.id, job.state, job.node_id, job.created_at, job.lease_at,
                    job.verified_step, int(job.spec["steps"]), int(job.spec["price_per_step"]),
                    tuple(life.SegmentSnap(g.id, g.start_step, g.end_step, g.created_at,
                                           a.id if (a := audits.get(g.id)) else None,
                                           a.state if a else None) for g in segs.values()))
                for act in life.decide_job(view, live, now, limits):
                    self._apply_tick(s, job, segs, audits, act, now)

    def _apply_tick(self, s: Session, job: TrainJob, segs: dict[str, TrainSegment],
                    audits: dict[str, TrainAudit], act: life.Action, now: float) -> None:
        """Carry out one of the core's decisions on a job, in the tick's transaction."""
        from idlegrid.core.training import settlement as tset

        if isinstance(act, life.Expire):
            self._close(s, job, "expired", act.cause)
        elif isinstance(act, life.Requeue):
            self._requeue(s, job, act.why, f"node:{act.node_id}")
            self.new_work.set()
        elif isinstance(act, life.Accept):
            seg = segs[act.segment_id]
            audit = audits.get(seg.id)
            self._post_all(s, [tset.pay_segment(job.id, seg.idx, seg.node_id, act.price,
                                                self.ctx.settings.fee_bps,
                                                self._gang_of(s, job, seg.attempt))]
                           if act.price > 0 else [])
            if audit is not None:  # paid after the segment: its fee funds it
                self._pay_verifier(s, audit, act.price)
            seg.state = SEGMENT.move(seg.state, "accepted", key=seg.id, story=(act.cause,))
            seg.done_at, seg.cause = now, act.cause
            job.verified_step = act.end_step
            self._event(s, job.id, "paid", act.cause, segment=seg.id, provider=seg.node_id,
                        amount=act.price, steps=seg.end_step - seg.start_step)
        elif isinstance(act, life.Finish):
            self._close(s, job, "done", "every step verified")

    # ---- operators -----------------------------------------------------------------------

    def audits(self) -> list[dict[str, Any]]:
        """Every training audit with its verdict."""
        with self.store.read() as s:
            return [{"id": a.id, "job_id": a.job_id, "segment": a.segment_id,
                     "node_id": a.node_id, "verifier_id": a.verifier_id, "canary": a.canary,
                     "state": a.state, "verdict": a.verdict}
                    for a in s.scalars(select(TrainAudit).order_by(TrainAudit.created_at))]


def judge(committed: Any, recomputed: Any, exact: bool, weight_distance: float | None,
          checkpoints_match: bool) -> Any:
    """The core's verdict on a replay, failing outright on checkpoints that do not match."""
    from idlegrid.core.training import proof

    if not checkpoints_match:
        return proof.Verdict(False, committed.start_step, "checkpoint does not match the "
                             "committed state hash", {})
    return proof.judge_segment(list(committed.leaves), list(recomputed.leaves), exact=exact,
                               weight_dist=weight_distance)


def out_audits(audits: list[TrainAudit]) -> list[dict[str, Any]]:
    """Audits as the job view shows them."""
    return [{"id": a.id, "segment": a.segment_id, "provider": a.node_id,
             "verifier": a.verifier_id, "canary": a.canary, "state": a.state,
             "verdict": a.verdict} for a in audits]


def bill(entries: list[dict[str, Any]], consumer: str) -> dict[str, int]:
    """The job's money from its ledger entries: what the consumer escrowed, got back and
    was compensated; what providers, verifiers and fees received; what stakes lost."""
    out = {"escrowed": 0, "refunded": 0, "charged": 0, "held": 0, "compensated": 0,
           "to_providers": 0, "fees": 0, "to_verifiers": 0, "slashed": 0}
    for e in entries:
        kind = e["key"].split(":", 1)[0]
        for p in e["postings"]:
            acct, amount = p["account"], p["amount"]
            if kind == "train-escrow" and acct == consumer:
                out["escrowed"] -= amount
            elif kind in ("train-seg", "train-close") and acct == consumer:
                out["refunded"] += amount
            elif kind == "train-seg" and acct.startswith("provider:"):
                out["to_providers"] += amount
            elif kind == "train-seg" and acct == ledger.FEES:
                out["fees"] += amount
            elif kind == "train-slash":
                if acct == consumer:
                    out["compensated"] += amount
                elif acct.startswith("stake:"):
                    out["slashed"] -= amount
            elif kind == "train-vslash" and ":job-" in acct:  # a probe's slash of a job stake
                out["slashed"] -= amount
            elif kind == "reverse":  # a dispute overturned the slash
                if acct == consumer:
                    out["compensated"] += amount
                elif acct.startswith("stake:") and ":job-" in acct and amount > 0:
                    out["slashed"] -= amount
            elif kind == "train-audit-pay" and acct.startswith("provider:"):
                out["to_verifiers"] += amount
    # Paid for verified steps; what is neither paid nor refunded is still in escrow.
    out["charged"] = out["to_providers"] + out["fees"]
    out["held"] = out["escrowed"] - out["refunded"] - out["charged"]
    return out
