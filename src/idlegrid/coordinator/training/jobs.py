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

import hashlib
import secrets
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.training.audits import TrainAudits
from idlegrid.coordinator.training.common import LIVE_STATES
from idlegrid.coordinator.training.disputes import TrainDisputes
from idlegrid.coordinator.training.gangs import Gangs
from idlegrid.coordinator.training.history import JobHistory
from idlegrid.coordinator.training.placement import (
    JobMarket,
    NoMarket,
    Placing,
    gang_ranks,
    live_order,
    placed_on,
)
from idlegrid.coordinator.training.tables import (
    TrainAudit,
    TrainCheckpoint,
    TrainJob,
    TrainProbe,
    TrainSegment,
)
from idlegrid.core import b64, ledger
from idlegrid.core.training import lifecycle as life
from idlegrid.core.training.lifecycle import JOB, PROBE, SEGMENT, TRAIN_AUDIT
from idlegrid.errors import AuthError, Conflict, InvalidRequest

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class Jobs(JobHistory, TrainAudits, Gangs, Placing):
    """Training jobs for one coordinator."""

    def __init__(self, ctx: Context, market: JobMarket | None = None) -> None:
        super().__init__(ctx)
        self.disputes = TrainDisputes(self)
        # The market places each job (placement.py); without one no job is ever placed.
        self.market = market if market is not None else NoMarket()
        self._place_lock = threading.Lock()

    def submit(self, key_id: str, body: Any) -> dict[str, Any]:
        """Validate a spec, escrow its full price, queue it and ask the market to place it
        (400 bad spec or resources, 402 short)."""
        from idlegrid.core.training import settlement as tset
        from idlegrid.core.training.placement import job_order
        from idlegrid.core.training.spec import JobSpec
        from idlegrid.core.training.spec import job_id as make_job_id

        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object with a 'spec'", param="spec")
        unknown = set(body) - {"spec", "ref", "resources"}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidRequest(f"unknown field '{name}'", param=name)
        ref = body.get("ref") or secrets.token_hex(8)
        if not isinstance(ref, str) or not 1 <= len(ref) <= 64:
            raise InvalidRequest("ref must be a string of 1 to 64 characters", param="ref")
        spec = JobSpec.parse(body.get("spec"))
        job_id = make_job_id(spec, ledger.consumer_account(key_id), ref)
        resources = body.get("resources") or {}
        # Checked as the market will check it, before anything is posted.
        job_order(job_id, 0, spec, resources, self.settings.max_price)
        amount = spec.escrow_total
        now = self.ctx.clock()
        with self.store.tx() as s:
            if s.get(TrainJob, job_id) is not None:
                raise Conflict(f"job {job_id} exists already (ref '{ref}' was used)", job_id=job_id)
            live = (
                s.scalar(
                    select(func.count())
                    .select_from(TrainJob)
                    .where(TrainJob.key_id == key_id, TrainJob.state.in_(LIVE_STATES))
                )
                or 0
            )
            if live >= self.settings.max_jobs_per_key:
                raise Conflict(
                    f"this key holds {live} live jobs already", limit=self.settings.max_jobs_per_key
                )
            s.add(
                TrainJob(
                    id=job_id,
                    key_id=key_id,
                    spec=spec.to_dict(),
                    state=JOB.begin("queued", key=job_id),
                    node_id=None,
                    attempt=0,
                    committed_step=0,
                    verified_step=0,
                    escrow=amount,
                    progress={},
                    excluded=[],
                    error="",
                    created_at=now,
                    lease_at=now,
                )
            )
            if amount > 0:
                self._post_all(s, [tset.escrow(job_id, key_id, amount)])
            self._event(
                s,
                job_id,
                "submitted",
                f"key:{key_id}",
                escrow=amount,
                steps=spec.steps,
                price_per_step=spec.price_per_step,
                resources=resources,
            )
        self.place_jobs([job_id])
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
        self.place_jobs([job_id])  # its providers are free again
        self.ctx.changes.bump()
        return self.view(key_id, job_id)

    async def poll(
        self, node_id: str, det_class: str, wait_s: float, gang_addr: str = ""
    ) -> dict[str, Any] | None:
        """A job for this provider, or None after `wait_s`. A node that names a
        `gang_addr` may also join a data-parallel job's gang (its work comes once the gang
        is complete)."""
        if node_id in self.ctx.ejected:
            raise AuthError("this node was ejected after failed audits")
        return await self.ctx.long_poll(
            self.new_work, lambda: self._claim(node_id, gang_addr), wait_s
        )

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
                if job is not None and job.state == "running" and job.attempt == handed["attempt"]:
                    return handed  # its gang formed while it was between polls
            free = self._balance(s, ledger.provider_account(node_id))
            rows = s.scalars(
                select(TrainJob)
                .where(TrainJob.state == "queued")
                .order_by(TrainJob.created_at)
                .limit(50)
            )
            for job in rows:
                if node_id not in placed_on(live_order(s, job.id)):
                    continue  # the market placed this job elsewhere, or not yet
                need = int(job.spec["stake_required"])
                held = self._balance(s, tset.job_stake_account(job.id, node_id))
                if node_id in job.excluded or (held < need and free < need):
                    continue
                world = int(job.spec.get("parallel", 1))
                if world > 1:
                    if not gang_addr:
                        continue  # this node cannot serve a gang's rendezvous
                    ranks = gang_ranks(live_order(s, job.id))
                    # Stakes are locked when the gang forms (gangs.py), returned at the end
                    # of the job like a single provider's.
                    return self._gather(s, job, node_id, gang_addr, world, now, ranks)
                res = s.execute(
                    update(TrainJob)
                    .where(TrainJob.id == job.id, TrainJob.state == job.state)
                    .values(
                        state=JOB.move(job.state, "running", key=job.id),
                        node_id=node_id,
                        attempt=TrainJob.attempt + 1,
                        lease_at=now,
                    )
                )
                if res.rowcount != 1:
                    continue
                s.refresh(job)
                if need > 0 and held < need:
                    # The job's stake is locked as the job is taken: slashed on a proven
                    # fault in it, returned when the job ends.
                    self._post_all(s, [tset.stake(job.id, node_id, need)])
                start = job.committed_step
                kind = "resumed" if start > 0 else "assigned"
                self._event(
                    s, job.id, kind, f"node:{node_id}", attempt=job.attempt, start_step=start
                )
                ckpt = s.get(TrainCheckpoint, (job.id, start)) if start > 0 else None
                return {
                    "job_id": job.id,
                    "attempt": job.attempt,
                    "spec": job.spec,
                    "start_step": start,
                    "checkpoint": b64.encode(ckpt.blob) if ckpt else None,
                }
        return None

    def progress(
        self, node_id: str, job_id: str, attempt: int, step: int, loss: float, tokens_per_s: float
    ) -> None:
        """The holder's live progress (not settled on: commitments are)."""
        now = self.ctx.clock()
        with self.store.tx() as s:
            job = self._held(s, node_id, job_id, attempt)
            if step > int(job.spec["steps"]):
                raise InvalidRequest("step is past the job's end", param="step")
            job.progress = {"step": step, "loss": loss, "tokens_per_s": tokens_per_s, "at": now}
            job.lease_at = now
        self.ctx.changes.bump()

    def commit(
        self,
        node_id: str,
        job_id: str,
        attempt: int,
        index: int,
        commitment: bytes,
        checkpoint: bytes,
        det_class: str,
    ) -> dict[str, Any]:
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
                raise Conflict(
                    f"segment {index} starts at {start}; the job is at step {job.committed_step}",
                    expected_step=job.committed_step,
                )
            steps = [leaf.step for leaf in c.leaves]
            if c.job_id != job_id or c.start_step != start or steps != list(range(start, end)):
                raise InvalidRequest(
                    f"commitment must cover steps {start}..{end - 1} of {job_id}",
                    param="commitment",
                )
            if start > 0:
                prev = s.scalars(
                    select(TrainSegment).where(
                        TrainSegment.job_id == job_id,
                        TrainSegment.end_step == start,
                        TrainSegment.state.in_(("committed", "accepted")),
                    )
                ).first()
                if prev is None or not c.follows(proof.TrainingCommitment.from_bytes(prev.blob)):
                    raise InvalidRequest(
                        "commitment does not start from the state the previous segment committed",
                        param="commitment",
                    )
            if hashlib.sha256(checkpoint).digest() != c.end_hash:
                # Checkpoints are their state's canonical bytes (training/verified.py): the
                # one a provider leaves must be the state its last leaf commits to.
                raise InvalidRequest(
                    "checkpoint does not hash to the last committed leaf", param="checkpoint"
                )
            digest = c.digest()
            seg_id = f"{job_id}:{index}:{attempt}"
            s.add(
                TrainSegment(
                    id=seg_id,
                    job_id=job_id,
                    idx=index,
                    start_step=start,
                    end_step=end,
                    node_id=node_id,
                    attempt=attempt,
                    blob=commitment,
                    digest=digest.hex(),
                    root=c.root.hex(),
                    det_class=det_class,
                    state=SEGMENT.begin("committed", key=seg_id),
                    cause=f"commit by node:{node_id}",
                    created_at=now,
                    done_at=0.0,
                )
            )
            s.merge(
                TrainCheckpoint(
                    job_id=job_id,
                    step=end,
                    node_id=node_id,
                    sha256=hashlib.sha256(checkpoint).hexdigest(),
                    blob=checkpoint,
                    created_at=now,
                )
            )
            job.committed_step = end
            job.lease_at = now
            last = end >= int(job.spec["steps"])
            if last:
                job.state = JOB.move(job.state, "trained", key=job_id, story=(seg_id,))
                job.node_id = None
            self._event(
                s,
                job_id,
                "committed",
                f"node:{node_id}",
                segment=seg_id,
                start_step=start,
                end_step=end,
                root=c.root.hex(),
                loss=c.leaves[-1].loss,
            )
            # Stored above, drawn only now: the provider committed before selection.
            audited = self._draw(s, job, seg_id, node_id, digest, c)
        if audited:
            self.new_audit.set()
        self.new_probe.set()
        self.ctx.changes.bump()
        return {"ok": True, "continue": not last}

    def release(
        self, node_id: str, job_id: str, attempt: int, reason: str, kind: str
    ) -> dict[str, Any]:
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
        self.place_jobs([job_id])  # a declining provider is avoided from now on
        self.new_work.set()
        self.ctx.changes.bump()
        return {"ok": True}

    def tick(self, live: frozenset[str]) -> None:
        """Accept final segments in order, pay them, finish jobs; take jobs from lost
        providers; hand silent verifiers' audits to others. The decisions are the core's
        (`core/training/lifecycle.py`): load a snapshot, decide, apply. Then bring the
        jobs' market orders in step with what the tick decided."""
        self._tick(live)
        self.place_jobs()

    def _tick(self, live: frozenset[str]) -> None:
        now = self.ctx.clock()
        st = self.settings
        with self.store.read() as r:  # most ticks find nothing: no write lock for that
            busy = any(
                r.scalars(q.limit(1)).first() is not None
                for q in (
                    select(TrainJob.id).where(TrainJob.state.in_(LIVE_STATES)),
                    select(TrainProbe.id).where(TrainProbe.state == "pending"),
                    select(TrainAudit.id).where(TrainAudit.state == "assigned"),
                )
            )
        if not busy:
            return
        limits = life.TickLimits(
            st.queue_ttl_s,
            st.lease_timeout_s,
            st.challenge_s,
            st.audit_timeout_s,
            st.probe_timeout_s,
        )
        with self.store.tx() as s:
            assigned = [
                life.AssignedAudit(i, at)
                for i, at in s.execute(
                    select(TrainAudit.id, TrainAudit.assigned_at).where(
                        TrainAudit.state.in_(TRAIN_AUDIT.sources("pending"))
                    )
                )
            ]
            probes = {
                p.id: p
                for p in s.scalars(
                    select(TrainProbe).where(TrainProbe.state.in_(PROBE.sources("failed")))
                )
            }
            snap = [life.PendingProbe(p.id, p.created_at) for p in probes.values()]
            for act in life.decide_timeouts(assigned, snap, now, limits):
                if isinstance(act, life.Reassign):
                    s.execute(
                        update(TrainAudit)
                        .where(TrainAudit.id == act.audit_id, TrainAudit.state == "assigned")
                        .values(
                            state=TRAIN_AUDIT.move(
                                "assigned", "pending", key=act.audit_id, story=("verifier silent",)
                            ),
                            verifier_id=None,
                            designated=None,
                        )
                    )
                elif isinstance(act, life.FailProbe):
                    self._probe_fault(s, probes[act.probe_id], act.reason)
            # Read after the probes: a failed one may have taken its job back.
            jobs = {
                j.id: j for j in s.scalars(select(TrainJob).where(TrainJob.state.in_(LIVE_STATES)))
            }
            for job in jobs.values():
                segs = {
                    g.id: g
                    for g in s.scalars(
                        select(TrainSegment)
                        .where(
                            TrainSegment.job_id == job.id,
                            TrainSegment.state.in_(SEGMENT.sources("accepted")),
                            TrainSegment.start_step >= job.verified_step,
                        )
                        .order_by(TrainSegment.start_step)
                    )
                }
                audits: dict[str, TrainAudit] = {}  # a segment's audit (one per commit)
                for a in (
                    s.scalars(
                        select(TrainAudit)
                        .where(TrainAudit.segment_id.in_(list(segs)), TrainAudit.canary.is_(False))
                        .order_by(TrainAudit.created_at)
                    )
                    if segs
                    else ()
                ):
                    audits.setdefault(a.segment_id, a)
                view = life.JobSnap(
                    job.id,
                    job.state,
                    job.node_id,
                    job.created_at,
                    job.lease_at,
                    job.verified_step,
                    int(job.spec["steps"]),
                    int(job.spec["price_per_step"]),
                    tuple(
                        life.SegmentSnap(
                            g.id,
                            g.start_step,
                            g.end_step,
                            g.created_at,
                            a.id if (a := audits.get(g.id)) else None,
                            a.state if a else None,
                        )
                        for g in segs.values()
                    ),
                )
                for act in life.decide_job(view, live, now, limits):
                    self._apply_tick(s, job, segs, audits, act, now)

    def _apply_tick(
        self,
        s: Session,
        job: TrainJob,
        segs: dict[str, TrainSegment],
        audits: dict[str, TrainAudit],
        act: life.Action,
        now: float,
    ) -> None:
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
            self._post_all(
                s,
                [
                    tset.pay_segment(
                        job.id,
                        seg.idx,
                        seg.node_id,
                        act.price,
                        self.ctx.settings.fee_bps,
                        self._gang_of(s, job, seg.attempt),
                    )
                ]
                if act.price > 0
                else [],
            )
            if audit is not None:  # paid after the segment: its fee funds it
                self._pay_verifier(s, audit, act.price)
            seg.state = SEGMENT.move(seg.state, "accepted", key=seg.id, story=(act.cause,))
            seg.done_at, seg.cause = now, act.cause
            job.verified_step = act.end_step
            self._event(
                s,
                job.id,
                "paid",
                act.cause,
                segment=seg.id,
                provider=seg.node_id,
                amount=act.price,
                steps=seg.end_step - seg.start_step,
            )
        elif isinstance(act, life.Finish):
            self._close(s, job, "done", "every step verified")
