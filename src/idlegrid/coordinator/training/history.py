"""A job as its consumer sees it: the summary, the full view with its segments, audits,
disputes and ledger entries, and the bill."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select

from idlegrid.coordinator.training.audits import out_audits
from idlegrid.coordinator.training.common import TrainingBase
from idlegrid.coordinator.training.placement import live_order, market_view, orders_of
from idlegrid.coordinator.training.tables import (
    TrainAudit,
    TrainEvent,
    TrainJob,
    TrainProbe,
    TrainSegment,
)
from idlegrid.core import ledger

if TYPE_CHECKING:
    from idlegrid.coordinator.training.disputes import TrainDisputes

    pass


class JobHistory(TrainingBase):
    """Read views of training jobs."""

    disputes: TrainDisputes  # set by Jobs

    def jobs(self, key_id: str) -> list[dict[str, Any]]:
        """The key's jobs, newest first, without their history."""
        with self.store.read() as s:
            rows = list(
                s.scalars(
                    select(TrainJob)
                    .where(TrainJob.key_id == key_id)
                    .order_by(TrainJob.created_at.desc())
                )
            )
            return [self._summary(j) for j in rows]

    @staticmethod
    def _summary(j: TrainJob) -> dict[str, Any]:
        spec = j.spec
        return {
            "id": j.id,
            "state": j.state,
            "steps": spec["steps"],
            "committed_step": j.committed_step,
            "verified_step": j.verified_step,
            "price_per_step": spec["price_per_step"],
            "escrow": j.escrow,
            "provider": j.node_id,
            "progress": j.progress,
            "error": j.error or None,
            "created_at": j.created_at,
        }

    def view(self, key_id: str, job_id: str) -> dict[str, Any]:
        """One job with its history: segments, audits, events and ledger entries."""
        with self.store.read() as s:
            job = self._own(s, key_id, job_id)
            segs = list(
                s.scalars(
                    select(TrainSegment)
                    .where(TrainSegment.job_id == job_id)
                    .order_by(TrainSegment.created_at)
                )
            )
            audits = list(
                s.scalars(
                    select(TrainAudit)
                    .where(TrainAudit.job_id == job_id)
                    .order_by(TrainAudit.created_at)
                )
            )
            events = list(
                s.scalars(
                    select(TrainEvent).where(TrainEvent.job_id == job_id).order_by(TrainEvent.id)
                )
            )
            out = self._summary(job)
            out["spec"] = job.spec
            # Its placement by the market: where it runs, or why it waits.
            orders = orders_of(s, job_id)
            out["market"] = market_view(live_order(s, job_id) or (orders[-1] if orders else None))
            disputes = self.disputes.of_job(s, job_id)
        losses: list[list[float]] = []
        for g in segs:
            if g.state in ("committed", "accepted"):
                losses += [[leaf.step, leaf.loss] for leaf in self._leaves(g.blob)]
        with self.store.read() as s:
            probes = [
                p.id for p in s.scalars(select(TrainProbe).where(TrainProbe.job_id == job_id))
            ]
        causes = (
            [a.id for a in audits] + [f"probe:{p}" for p in probes] + [d["id"] for d in disputes]
        )
        entries = self._entries(job_id, causes, [a.id for a in audits if a.canary])
        paid = bill(entries, ledger.consumer_account(key_id))
        out.update(
            {
                "losses": sorted(losses),
                "segments": [
                    {
                        "id": g.id,
                        "index": g.idx,
                        "start_step": g.start_step,
                        "end_step": g.end_step,
                        "provider": g.node_id,
                        "attempt": g.attempt,
                        "root": g.root,
                        "det_class": g.det_class,
                        "state": g.state,
                        "cause": g.cause,
                    }
                    for g in segs
                ],
                "audits": out_audits(audits),
                "disputes": disputes,
                "events": [
                    {"at": e.at, "kind": e.kind, "cause": e.cause, **e.detail} for e in events
                ],
                "ledger": entries,
                "bill": paid,
            }
        )
        return out

    def _entries(
        self, job_id: str, causes: list[str], per_account: list[str]
    ) -> list[dict[str, Any]]:
        """Ledger entries caused by the job, its segments, audits and probes, oldest first
        (`per_account`: causes whose entries are keyed per slashed account)."""
        from idlegrid.coordinator.db.tables import LedgerEntry, LedgerPosting

        with self.store.read() as s:
            rows = list(
                s.scalars(
                    select(LedgerEntry)
                    .where(
                        or_(
                            LedgerEntry.cause_id == job_id,
                            LedgerEntry.cause_id.like(f"{job_id}:%"),
                            LedgerEntry.cause_id.in_(causes),
                            *(LedgerEntry.cause_id.like(f"{c}:%") for c in per_account),
                        )
                    )
                    .order_by(LedgerEntry.seq)
                )
            )
            seqs = [e.seq for e in rows]
            postings: dict[int, list[dict[str, Any]]] = {}
            for seq, acct, amount in s.execute(
                select(LedgerPosting.entry_seq, LedgerPosting.account, LedgerPosting.amount).where(
                    LedgerPosting.entry_seq.in_(seqs)
                )
            ):
                postings.setdefault(seq, []).append({"account": acct, "amount": amount})
            return [
                {
                    "key": e.key,
                    "cause": {"kind": e.cause_kind, "id": e.cause_id},
                    "memo": e.memo,
                    "at": e.created_at,
                    "postings": postings.get(e.seq, []),
                }
                for e in rows
            ]

    @staticmethod
    def _leaves(blob: bytes) -> list[Any]:
        from idlegrid.core.training.proof import TrainingCommitment

        return list(TrainingCommitment.from_bytes(blob).leaves)


def bill(entries: list[dict[str, Any]], consumer: str) -> dict[str, int]:
    """The job's money from its ledger entries: what the consumer escrowed, got back and
    was compensated; what providers, verifiers and fees received; what stakes lost."""
    out = {
        "escrowed": 0,
        "refunded": 0,
        "charged": 0,
        "held": 0,
        "compensated": 0,
        "to_providers": 0,
        "fees": 0,
        "to_verifiers": 0,
        "slashed": 0,
    }
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
