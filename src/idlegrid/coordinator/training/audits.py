"""Training audits: the beacon draws segments to audit (and canaries), verifiers replay them,
their reports are judged, verifiers are paid, and a proven fault rewinds the job."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from idlegrid.coordinator.training.probes import Probes
from idlegrid.coordinator.training.tables import (
    TrainAudit,
    TrainCheckpoint,
    TrainJob,
    TrainSegment,
)
from idlegrid.coordinator.trust.tables import TrustNode
from idlegrid.core import b64, ledger
from idlegrid.core.training.lifecycle import JOB, SEGMENT, TRAIN_AUDIT
from idlegrid.core.trust import beacon
from idlegrid.errors import AuthError, Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class TrainAudits(Probes):
    """Audit draws, claims and judgements for training segments."""

    def _draw(
        self, s: Session, job: TrainJob, seg_id: str, node_id: str, digest: bytes, c: Any
    ) -> bool:
        from idlegrid.core.training import proof

        now = self.ctx.clock()
        passed = (
            s.scalar(
                select(func.count())
                .select_from(TrainAudit)
                .where(
                    TrainAudit.node_id == node_id,
                    TrainAudit.state == "passed",
                    TrainAudit.canary.is_(False),
                )
            )
            or 0
        )
        st = self.settings
        spec = job.spec
        steady = proof.audit_rate(
            int(spec["price_per_step"]),
            int(spec["checkpoint_interval"]),
            int(spec["stake_required"]),
        )
        rate = 1.0 if passed < st.probation_segments else max(st.audit_rate, steady)
        if c.start_step == 0:
            # Only a replay of the first segment checks the initial weights against the
            # job seed (later segments chain from it), so it is always audited.
            rate = 1.0
        verifiers = [
            v
            for v in s.scalars(
                select(TrustNode.node_id).where(
                    TrustNode.verifier.is_(True), TrustNode.ejected.is_(False)
                )
            )
            if v != node_id
        ]
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
            s.add(
                TrainAudit(
                    id=audit_id,
                    job_id=job.id,
                    segment_id=seg_id,
                    node_id=node_id,
                    designated=designated,
                    verifier_id=None,
                    canary=is_canary,
                    blob=blob,
                    state=TRAIN_AUDIT.begin("pending", key=audit_id),
                    verdict={},
                    created_at=now,
                    assigned_at=0.0,
                    done_at=0.0,
                )
            )
            if not is_canary:
                self._event(
                    s,
                    job.id,
                    "audit-selected",
                    f"beacon:{digest.hex()[:16]}",
                    audit=audit_id,
                    segment=seg_id,
                    rate=rate,
                )
        if beacon.selected(self.secret, digest, st.probe_rate, domain=b"train-probe"):
            self._probe(s, job, node_id, digest, uid)
        return bool(made)

    async def poll_audit(self, node_id: str, wait_s: float = 5.0) -> dict[str, Any] | None:
        """A segment audit for this verifier (never its own segments), or None."""
        return await self.ctx.long_poll(self.new_audit, lambda: self._claim_audit(node_id), wait_s)

    def _claim_audit(self, node_id: str) -> dict[str, Any] | None:
        now = self.ctx.clock()
        with self.store.tx() as s:
            me = s.get(TrustNode, node_id)
            if me is None or not me.verifier or me.ejected:
                raise AuthError("this node is not an active verifier")
            rows = s.scalars(
                select(TrainAudit)
                .where(TrainAudit.state == "pending", TrainAudit.node_id != node_id)
                .order_by(TrainAudit.created_at)
                .limit(20)
            )
            for a in rows:
                if (
                    a.designated not in (None, node_id)
                    and now - a.created_at < self.settings.reassign_after_s
                ):
                    continue
                seg = s.get(TrainSegment, a.segment_id)
                job = s.get(TrainJob, a.job_id)
                assert seg is not None and job is not None
                if node_id in self._gang_of(s, job, seg.attempt):
                    continue  # a rank of the gang that trained it: its own work
                res = s.execute(
                    update(TrainAudit)
                    .where(TrainAudit.id == a.id, TrainAudit.state == a.state)
                    .values(
                        state=TRAIN_AUDIT.move(a.state, "assigned", key=a.id),
                        verifier_id=node_id,
                        assigned_at=now,
                    )
                )
                if res.rowcount != 1:
                    continue
                start = s.get(TrainCheckpoint, (job.id, seg.start_step))
                end = s.get(TrainCheckpoint, (job.id, seg.end_step))
                if end is None or (seg.start_step > 0 and start is None):
                    # Rewound past it meanwhile.
                    a.state, a.done_at = TRAIN_AUDIT.move(a.state, "dropped", key=a.id), now
                    continue
                return {
                    "audit_id": a.id,
                    "job_id": job.id,
                    "spec": job.spec,
                    "start_step": seg.start_step,
                    "end_step": seg.end_step,
                    "start_checkpoint": b64.encode(start.blob) if start else None,
                    "end_checkpoint": b64.encode(end.blob),
                    "commitment": b64.encode(a.blob),
                }
        return None

    def report(
        self,
        node_id: str,
        audit_id: str,
        leaves: bytes,
        weight_distance: float | None,
        det_class: str,
        checkpoints_match: bool,
    ) -> dict[str, Any]:
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
            verdict = {
                "passed": v.ok,
                "first_bad_step": v.first_bad_step,
                "reason": v.reason,
                "detail": v.detail,
                "exact": exact,
                "provider_class": seg.det_class,
                "verifier_class": det_class,
                "weight_distance": weight_distance,
                "canary": a.canary,
            }
            a.state = TRAIN_AUDIT.move(
                a.state, "passed" if v.ok else "failed", key=a.id, story=(f"verifier:{node_id}",)
            )
            a.done_at, a.verdict = now, verdict
            price = int(job.spec["price_per_step"]) * (seg.end_step - seg.start_step)
            consumer = ledger.consumer_account(job.key_id)
            verifier = s.get(TrustNode, node_id)
            assert verifier is not None
            if a.canary:
                if v.ok:  # approved a planted wrong commitment: lazy or colluding
                    verifier.verifier_failed += 1
                    verifier.ejected = True
                    self.ctx.ejected.refresh_after(s)
                    self._post_all(
                        s,
                        [
                            tset.verifier_slash(
                                f"{audit_id}:{acct}", acct, bal, bal, "train canary approved"
                            )
                            for acct, bal in self._accounts(s, f"stake:{node_id}:%").items()
                        ],
                    )
                    self._event(s, job.id, "canary-failed", f"audit:{audit_id}", verifier=node_id)
                else:
                    verifier.verifier_passed += 1
                return {"audit_id": audit_id, **verdict}
            verifier.verifier_passed += 1
            if not v.ok:  # a passed audit's fee is paid with the segment (see tick)
                self._pay_verifier(s, a, price)
            self._event(
                s,
                job.id,
                "audit-passed" if v.ok else "audit-failed",
                f"audit:{audit_id}",
                segment=seg.id,
                verifier=node_id,
                reason=v.reason,
                first_bad_step=v.first_bad_step,
            )
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
        self._post_all(s, [tset.audit_fee(a.id, a.verifier_id, fee, self._balance(s, ledger.FEES))])

    def _fault(
        self,
        s: Session,
        job: TrainJob,
        seg: TrainSegment,
        audit_id: str,
        verifier_id: str,
        consumer: str,
        price: int,
    ) -> None:
        """A proven fault: slash, refund, exclude the provider and rewind to the segment."""
        from idlegrid.core.training import settlement as tset

        provider = seg.node_id
        stake = self._balance(s, tset.job_stake_account(job.id, provider))
        # The whole job stake: the consumer's compensation (the segment's price) first.
        self._post_all(
            s, [tset.slash(job.id, seg.idx, provider, stake, stake, job.key_id, price, verifier_id)]
        )
        seg.state = SEGMENT.move(seg.state, "failed", key=seg.id, story=(f"audit:{audit_id}",))
        seg.done_at, seg.cause = self.ctx.clock(), f"audit:{audit_id}"
        node = s.get(TrustNode, provider)
        if node is not None:
            node.failed += 1
        job.excluded = sorted({*job.excluded, provider})
        self._event(
            s,
            job.id,
            "slashed",
            f"audit:{audit_id}",
            provider=provider,
            stake=stake,
            compensation=min(price, stake),
        )
        self._discard_after(s, job, seg.start_step, f"built on failed segment {seg.id}")
        if JOB.allowed(job.state, "queued"):  # running or trained: taken back, rewound
            holder = job.node_id
            job.state = JOB.move(job.state, "queued", key=job.id, story=(f"audit:{audit_id}",))
            job.node_id, job.progress = None, {}
            self._event(
                s,
                job.id,
                "rewound",
                f"audit:{audit_id}",
                resume_step=seg.start_step,
                taken_from=holder,
            )

    def audits(self) -> list[dict[str, Any]]:
        """Every training audit with its verdict."""
        with self.store.read() as s:
            return [
                {
                    "id": a.id,
                    "job_id": a.job_id,
                    "segment": a.segment_id,
                    "node_id": a.node_id,
                    "verifier_id": a.verifier_id,
                    "canary": a.canary,
                    "state": a.state,
                    "verdict": a.verdict,
                }
                for a in s.scalars(select(TrainAudit).order_by(TrainAudit.created_at))
            ]


def judge(
    committed: Any,
    recomputed: Any,
    exact: bool,
    weight_distance: float | None,
    checkpoints_match: bool,
) -> Any:
    """The core's verdict on a replay, failing outright on checkpoints that do not match."""
    from idlegrid.core.training import proof

    if not checkpoints_match:
        return proof.Verdict(
            False, committed.start_step, "checkpoint does not match the committed state hash", {}
        )
    return proof.judge_segment(
        list(committed.leaves), list(recomputed.leaves), exact=exact, weight_dist=weight_distance
    )


def out_audits(audits: list[TrainAudit]) -> list[dict[str, Any]]:
    """Audits as the job view shows them."""
    return [
        {
            "id": a.id,
            "segment": a.segment_id,
            "provider": a.node_id,
            "verifier": a.verifier_id,
            "canary": a.canary,
            "state": a.state,
            "verdict": a.verdict,
        }
        for a in audits
    ]
