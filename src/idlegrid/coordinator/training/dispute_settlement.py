"""A training dispute's ruling in the ledger: the reversal or the slash, the panel's pay
from the loser, and the job's rewind or resumption, in one savepoint with the state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select, update

from idlegrid.coordinator.db.tables import Account, LedgerEntry, LedgerPosting
from idlegrid.coordinator.training.tables import (
    TrainAudit,
    TrainDispute,
    TrainJob,
    TrainSegment,
)
from idlegrid.coordinator.trust.tables import TrustNode
from idlegrid.core import disputes as seats
from idlegrid.core import ledger
from idlegrid.core.ledger import Cause, Entry, Posting
from idlegrid.core.training import dispute as game
from idlegrid.core.training.lifecycle import JOB, TRAIN_AUDIT
from idlegrid.core.training.proof import TrainingCommitment
from idlegrid.core.trust import dispute as money
from idlegrid.core.trust.lifecycle import TRAIN_DISPUTE
from idlegrid.errors import Conflict

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from idlegrid.coordinator.training.common import TrainingBase


class DisputeSettlement:
    """Settling a ruled training dispute (a part of `TrainDisputes`)."""

    jobs: TrainingBase

    def _settle(
        self,
        s: Session,
        row: TrainDispute,
        c: TrainingCommitment,
        d: game.Dispute,
        verdict: seats.PanelRuling | None = None,
    ) -> None:
        """Record the outcome and post its consequences, in the caller's transaction.

        Only a panel's majority (`verdict`) slashes the challenger; a challenger that went
        silent forfeits only what the slash it caused paid out (recipients give it back as
        far as they hold it). The panel is paid by the loser, the fee pool covering only
        what the loser lacks (`UnpayableRuling` if even that falls short)."""
        from idlegrid.core.training import settlement as tset

        out = d.outcome
        assert out is not None
        now = float(self.jobs.ctx.clock())
        provider_right = out.winner == game.PROVIDER
        end = "won" if provider_right else "lost"
        res = s.execute(
            update(TrainDispute)
            .where(TrainDispute.id == row.id, TrainDispute.state.in_(TRAIN_DISPUTE.sources(end)))
            .values(state=TRAIN_DISPUTE.move(row.state, end, key=row.id, story=(out.reason,)))
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"dispute {row.id} was settled already")
        s.refresh(row)
        row.done_at = now
        row.ruling = {
            "provider_right": provider_right,
            "reason": out.reason,
            "step": out.step,
            "op_index": out.op_index,
            "rounds": out.rounds,
            "panel": dict(row.votes),
            "paid": list(verdict.paid) if verdict else [],
            "slashed": seats.slashed(out.winner, verdict is not None),
        }
        a = s.get(TrainAudit, row.audit_id)
        seg = s.get(TrainSegment, row.segment_id)
        job = s.get(TrainJob, row.job_id)
        assert a is not None and seg is not None and job is not None
        price = int(job.spec["price_per_step"]) * (seg.end_step - seg.start_step)
        fee = price * self.jobs.settings.verifier_fee_bps // 10_000
        balances = {k: int(v) for k, v in s.execute(select(Account.id, Account.balance))}
        posts: list[Entry | None] = []
        if provider_right:
            originals = self._entries(
                s, [f"train-slash:{job.id}:{seg.idx}:{row.provider_id}", f"train-audit-pay:{a.id}"]
            )
            # Only a panel's majority takes the challenger's stakes.
            stakes = self.jobs._accounts(s, f"stake:{row.verifier_id}:%") if verdict else {}
            entry, used = money.reversal(row.id, originals, balances, stakes)
            posts.append(entry)
            if verdict is not None:
                balances = money.apply(balances, posts)
                left = {k: balances.get(k, 0) for k in stakes}
                posts.append(
                    money.panel_pay(
                        row.id,
                        verdict.paid,
                        fee,
                        {**left, ledger.FEES: balances.get(ledger.FEES, 0)},
                    )
                )
                balances = money.apply(balances, posts[-1:])
                posts.extend(
                    money.penalty(row.id, {k: balances.get(k, 0) for k in stakes}, row.provider_id)
                )
            a.state = TRAIN_AUDIT.move(
                a.state, "overturned", key=a.id, story=(f"dispute:{row.id}",)
            )
            a.verdict = {**a.verdict, "overturned_by": row.id}
            seg.cause = f"{seg.cause}; overturned by dispute:{row.id}"
            job.excluded = [n for n in job.excluded if n != row.provider_id]
            node = s.get(TrustNode, row.provider_id)
            if node is not None:
                node.failed = max(node.failed - 1, 0)
            verifier = s.get(TrustNode, row.verifier_id)
            if verifier is not None and verdict is not None:  # a panel showed it was false
                verifier.verifier_failed += 1
                verifier.verifier_passed = max(verifier.verifier_passed - 1, 0)
                verifier.ejected = True
                # The cache of ejected nodes is re-read from the store once this commits.
                self.jobs.ctx.ejected.refresh_after(s)
        elif verdict is not None:
            acct = ledger.provider_account(row.provider_id)
            funders = {
                acct: balances.get(acct, 0),
                **{k: v for k, v in balances.items() if k.startswith(f"stake:{row.provider_id}:")},
                ledger.FEES: balances.get(ledger.FEES, 0),
            }
            posts.append(money.panel_pay(row.id, verdict.paid, fee, funders))
        self.jobs._post_all(s, posts)
        if provider_right and job.state in JOB.terminal:
            s.flush()  # the job ended meanwhile: the restored stake goes back now
            stake = int(
                s.scalar(
                    select(Account.balance).where(
                        Account.id == tset.job_stake_account(job.id, row.provider_id)
                    )
                )
                or 0
            )
            if stake > 0:
                self.jobs._post_all(
                    s,
                    [
                        ledger.make_entry(
                            f"train-unstake:{job.id}:{row.provider_id}:{row.id}",
                            Cause("dispute", row.id),
                            [
                                Posting(tset.job_stake_account(job.id, row.provider_id), -stake),
                                Posting(ledger.provider_account(row.provider_id), stake),
                            ],
                            "train unstake after dispute",
                        )
                    ],
                )
        self.jobs._event(
            s,
            job.id,
            "dispute-won" if provider_right else "dispute-lost",
            f"dispute:{row.id}",
            audit=a.id,
            provider=row.provider_id,
            challenger=row.verifier_id,
            reason=out.reason,
            step=out.step,
            op_index=out.op_index,
            rounds=out.rounds,
        )
        self.jobs.new_work.set()

    @staticmethod
    def _entries(s: Session, keys: list[str]) -> list[Entry]:
        rows = list(s.scalars(select(LedgerEntry).where(LedgerEntry.key.in_(keys))))
        postings: dict[int, list[Posting]] = {}
        for seq, acct, amount in s.execute(
            select(LedgerPosting.entry_seq, LedgerPosting.account, LedgerPosting.amount).where(
                LedgerPosting.entry_seq.in_([r.seq for r in rows])
            )
        ):
            postings.setdefault(seq, []).append(Posting(acct, amount))
        return [
            Entry(r.key, Cause(r.cause_kind, r.cause_id), tuple(postings.get(r.seq, [])), r.memo)
            for r in rows
        ]
