"""Whether a provider's work can be checked, and what follows: no payout and a small
probation budget of paid requests until an independent verifier of its kernel family
(`commitment.kernel_family`, a live verifier-mode node other than itself) has been there
for a whole audit window (`payout_delay_s`).

Verifiability is recomputed every supervisor pass from the live nodes; it is kept in
memory, so after a restart every provider starts unverifiable and waits one window again
(the safe side).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from idlegrid.coordinator.db.tables import Account
from idlegrid.coordinator.trust.tables import TrustAudit, TrustNode
from idlegrid.core import ledger
from idlegrid.core.trust import commitment as cm

if TYPE_CHECKING:
    from idlegrid.coordinator.trust.audits import Trust


def record(s: Any, node: TrustNode | None) -> tuple[int, int]:
    """(clean audits since the node's last failed one, its failed audits)."""
    if node is None:
        return 0, 0
    if not node.failed:
        return int(node.passed), 0
    last = s.scalar(
        select(func.max(TrustAudit.done_at)).where(
            TrustAudit.node_id == node.node_id,
            TrustAudit.state == "failed",
            TrustAudit.canary.is_(False),
        )
    )
    clean = s.scalar(
        select(func.count()).where(
            TrustAudit.node_id == node.node_id,
            TrustAudit.state == "passed",
            TrustAudit.canary.is_(False),
            TrustAudit.done_at > (last or 0.0),
        )
    )
    return int(clean or 0), int(node.failed)


class Payability:
    """Verifiable-since per provider; payout holds; the probation budget."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self.since: dict[str, float] = {}  # node id -> verifiable continuously since

    def refresh(self, live: frozenset[str]) -> None:
        """Recompute who has an independent live verifier of its kernel family."""
        now = self.trust.ctx.clock()
        with self.trust.store.read() as s:
            rows = [
                (
                    r.node_id,
                    r.det_class,
                    r.verifier,
                    r.ejected,
                    r.verifier_expired,
                    r.verifier_passed,
                )
                for r in s.scalars(select(TrustNode))
            ]
        verifiers: dict[str, set[str]] = {}
        for node_id, det, is_v, ejected, expired, passed in rows:
            if is_v and not ejected and node_id in live and expired <= passed:
                verifiers.setdefault(cm.kernel_family(det), set()).add(node_id)
        for node_id, det, *_ in rows:
            if verifiers.get(cm.kernel_family(det), set()) - {node_id}:
                self.since.setdefault(node_id, now)
            else:
                self.since.pop(node_id, None)

    def verifiable(self, node_id: str) -> bool:
        """An independent verifier can check this provider now."""
        return node_id in self.since

    def held(self) -> frozenset[str]:
        """Providers whose accruals are not paid out: not verifiable for a whole window, or
        ejected (what they earned before a failed audit caught them was never checked, and
        an audit may have been drawn for it that nobody will now take up)."""
        now = self.trust.ctx.clock()
        window = self.trust.ctx.settings.payout_delay_s
        with self.trust.store.read() as s:
            nodes = s.execute(select(TrustNode.node_id, TrustNode.ejected)).all()
        return frozenset(
            n for n, ejected in nodes if ejected or now - self.since.get(n, now + 1.0) < window
        )

    @property
    def budget_ucr(self) -> int:
        """The probation budget (µcr of held accrual); -1: not limited."""
        return self.trust.settings.probation_budget_ucr

    def budget_left(self, node_id: str, accrued: int) -> int | None:
        """Probation budget (µcr) an unverifiable provider has left; None: not limited."""
        budget = self.trust.settings.probation_budget_ucr
        if budget < 0 or self.verifiable(node_id):
            return None
        return max(0, budget - accrued)

    def to_check(self, node_ids: Iterable[str]) -> list[str]:
        """Of these providers, those the probation budget may block (no store read)."""
        if self.trust.settings.probation_budget_ucr < 0:
            return []
        return sorted(n for n in node_ids if not self.verifiable(n))

    def paid_blocked(self, node_ids: Iterable[str]) -> frozenset[str]:
        """Of these providers, those that may not take paid work now: unverifiable with
        their probation budget spent (their held accrual reached it)."""
        check = self.to_check(node_ids)
        if not check:
            return frozenset()
        accts = {ledger.accrual_account(n): n for n in check}
        with self.trust.store.read() as s:
            # Not dict(result): a Result has keys(), so dict() would index it as a mapping.
            rows = s.execute(select(Account.id, Account.balance).where(Account.id.in_(list(accts))))
            bal = {a: b for a, b in rows}
        return frozenset(
            n for a, n in accts.items() if self.budget_left(n, int(bal.get(a, 0))) == 0
        )


async def trust_status(trust: Trust) -> dict[str, Any]:
    """Audit rate p, p*, and each node's probation, audit record and payability."""
    rows = await trust.ctx.db(_nodes, trust)
    disputes = await trust.ctx.db(trust.disputes.listing)
    balances = await trust.ctx.db(trust.store.balances)
    held = await trust.ctx.db(trust.payability.held)
    pol, pay = trust.policy, trust.payability
    nodes = {}
    for r, clean in rows:
        accrued = balances.get(ledger.accrual_account(r.node_id), 0)
        nodes[r.node_id] = {
            "audit_rate": pol.rate(clean, r.failed),
            "probation": pol.on_probation(clean, r.failed),
            "passed": r.passed,
            "failed": r.failed,
            "verifier": r.verifier,
            "verifier_passed": r.verifier_passed,
            "verifier_failed": r.verifier_failed,
            "spoofer_probability": trust.reputation.posterior(r.passed, r.failed),
            "verifier_expired": r.verifier_expired,
            "ejected": r.ejected,
            "det_class": r.det_class,
            "verifiable": pay.verifiable(r.node_id),
            "held_accrual": accrued if r.node_id in held else 0,
            "probation_budget_left": pay.budget_left(r.node_id, accrued),
        }
    return {
        "disputes": [
            {
                k: d[k]
                for k in (
                    "id",
                    "audit_id",
                    "provider_id",
                    "challenger_id",
                    "referee_id",
                    "state",
                    "round",
                    "waiting_for",
                )
            }
            | {"provider_right": d["ruling"].get("provider_right")}
            for d in disputes[:50]
        ],
        "pending_audits": await trust.ctx.db(_pending_audits, trust),
        "p_star": pol.p_star,
        "p_steady": pol.steady,
        "canary_rate": trust.settings.canary_rate,
        "probation_budget_ucr": trust.settings.probation_budget_ucr,
        "beacon_commitment": trust.epoch_commitment,
        "nodes": nodes,
    }


def _pending_audits(trust: Trust) -> dict[str, int]:
    """Audits not judged yet, by state: never silently passed or failed."""
    with trust.store.read() as s:
        return {
            st: n
            for st, n in s.execute(
                select(TrustAudit.state, func.count())
                .where(TrustAudit.state.in_(("pending", "assigned")))
                .group_by(TrustAudit.state)
            )
        }


def _nodes(trust: Trust) -> list[tuple[TrustNode, int]]:
    with trust.store.tx() as s:
        rows = [(r, record(s, r)[0]) for r in s.scalars(select(TrustNode))]
        s.expunge_all()
        return rows


def audit_summary(trust: Trust) -> dict[str, dict[str, Any]]:
    """Per provider, what the dashboard shows of its audits: passed, failed, open (pending
    or assigned, canaries left out), whether any verifier can check it now, its engine."""
    with trust.store.read() as s:
        nodes = list(s.scalars(select(TrustNode)))
        open_by_node = dict(
            s.execute(
                select(TrustAudit.node_id, func.count())
                .where(TrustAudit.state.in_(("pending", "assigned")), TrustAudit.canary.is_(False))
                .group_by(TrustAudit.node_id)
            ).all()
        )
    return {
        n.node_id: {
            "passed": n.passed,
            "failed": n.failed,
            "open": int(open_by_node.get(n.node_id, 0)),
            "verifiable": trust.payability.verifiable(n.node_id),
            "engine": cm.engine_of(n.det_class),
            "ejected": n.ejected,
            "spoofer_probability": trust.reputation.posterior(n.passed, n.failed),
        }
        for n in nodes
    }
