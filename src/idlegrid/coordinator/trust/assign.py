"""Who takes which audit: the stake-weighted beacon draw (`core/trust/selection.py`), the
designated verifier's claim, and deadlines (a lapse costs stake and skips the verifier).

Only the drawn verifier may take an audit. A draw that finds nobody (no eligible verifier
online) is made again when a verifier polls; an audit whose verifier went away, was ejected
or is held is drawn again without it; one that lapses is drawn again excluding the late
verifier, which loses `hold_slash_bps` of each stake account in the same transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from idlegrid.coordinator.db.tables import Account, Node
from idlegrid.coordinator.trust.tables import TrustAudit, TrustCommitment, TrustNode
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import entries, peek, selection
from idlegrid.core.trust.lifecycle import AUDIT
from idlegrid.errors import AuthError

if TYPE_CHECKING:
    from idlegrid.coordinator.trust.audits import Trust


def stakes(s: Session, node_id: str | None = None) -> dict[str, int]:
    """Posted stake by stake account (every node's, or one node's), read in `s`."""
    prefix = f"stake:{node_id}:" if node_id else "stake:"
    return {
        a: b
        for a, b in s.execute(
            select(Account.id, Account.balance).where(Account.id.startswith(prefix))
        )
    }


def candidates(trust: Trust, s: Session, grammar: str | None = None) -> list[selection.Candidate]:
    """Every active verifier, live (once the supervisor has said who is), with its stake;
    for a constrained answer (structured outputs) only those that can replay its grammar:
    their engine facts name the same grammar engine and version (another version may mask
    differently, and an honest answer would fail)."""
    by_node: dict[str, int] = {}
    for acct, bal in stakes(s).items():
        node = acct.split(":")[1]
        by_node[node] = by_node.get(node, 0) + max(bal, 0)
    live = trust.live
    return [
        selection.Candidate(
            v.node_id, cm.kernel_family(v.det_class), v.address, by_node.get(v.node_id, 0), v.held
        )
        for v in s.scalars(
            select(TrustNode).where(TrustNode.verifier.is_(True), TrustNode.ejected.is_(False))
        )
        if (live is None or v.node_id in live)
        and (grammar is None or _masks(s, v.node_id, grammar))
    ]


def draw(
    trust: Trust,
    s: Session,
    provider_id: str,
    digest: bytes,
    det_class: str,
    kind: str,
    exclude: list[str],
    pool: list[selection.Candidate] | None = None,
    grammar: str | None = None,
) -> str | None:
    """The verifier the beacon designates for one audit (None: nobody can take it now)."""
    provider = s.get(TrustNode, provider_id)
    eligible = selection.eligible(
        candidates(trust, s, grammar) if pool is None else pool,
        provider_id,
        cm.kernel_family(det_class),
        provider.address if provider else "",
        exclude,
        trust.settings.exempt_loopback,
    )
    return selection.pick(trust.secret, digest, eligible, kind, len(exclude))


def redraw(trust: Trust, s: Session, a: TrustAudit, exclude: list[str]) -> str | None:
    """Draw an existing audit's verifier again, without the verifiers in `exclude`."""
    com = s.get(TrustCommitment, (a.task_id, a.attempt))
    assert com is not None
    kind = "canary" if a.canary else "audit"
    return draw(
        trust,
        s,
        a.node_id,
        bytes.fromhex(com.digest),
        peek.peek_class(a.blob),
        kind,
        exclude,
        grammar=peek.peek_grammar_engine(a.blob),
    )


def _masks(s: Session, node_id: str, grammar: str) -> bool:
    node = s.get(Node, node_id)
    return node is not None and (node.engine or {}).get("grammar") == grammar


def claim(trust: Trust, node_id: str, models: list[str]) -> dict[str, Any] | None:
    """The oldest audit drawn for this verifier, now assigned to it (None if there is none)."""
    now = trust.ctx.clock()
    with trust.store.tx() as s:
        me = s.get(TrustNode, node_id)
        if me is None or not me.verifier or me.ejected:
            raise AuthError("this node is not an active verifier")
        rows = s.scalars(
            select(TrustAudit)
            .where(
                TrustAudit.state == "pending",
                TrustAudit.node_id != node_id,
                TrustAudit.model_id.in_(models),
                (TrustAudit.designated == node_id) | TrustAudit.designated.is_(None),
            )
            .order_by(TrustAudit.created_at)
            .limit(20)
        )
        for a in list(rows):
            if a.designated is None:
                # Nobody could take it when it was drawn: draw now, among who can.
                if me.held or node_id in (a.expired or []):
                    continue
                a.designated = redraw(trust, s, a, list(a.expired or []))
                s.flush()
                if a.designated != node_id:
                    continue
            if cm.kernel_family(peek.peek_class(a.blob)) != cm.kernel_family(me.det_class):
                continue  # another engine's or build's answers: see docs/trust.md
            res = s.execute(
                update(TrustAudit)
                .where(
                    TrustAudit.id == a.id,
                    TrustAudit.state == "pending",
                    TrustAudit.designated == node_id,
                )
                .values(
                    state=AUDIT.move(a.state, "assigned", key=a.id),
                    verifier_id=node_id,
                    assigned_at=now,
                )
            )
            if res.rowcount != 1:
                continue
            com = s.get(TrustCommitment, (a.task_id, a.attempt))
            assert com is not None
            break
        else:
            return None
    # The task is read after the write transaction: a nested one would wait on itself.
    return {"audit_id": a.id, **trust.audit_task(a, com)}


def expire(trust: Trust, live: frozenset[str] | None = None) -> list[str]:
    """Deadlines, once per supervisor pass: audits taken and not reported within
    `audit_expiry_s` cost their verifier a slice of stake and go to a new draw without it;
    pending audits whose designated verifier can no longer take them are drawn again.
    Returns the ids of the lapsed audits."""
    if live is not None:
        trust.live = live
    now = trust.ctx.clock()
    cutoff = now - trust.settings.audit_expiry_s
    with trust.store.read() as s:
        late = list(
            s.scalars(
                select(TrustAudit.id).where(
                    TrustAudit.state == "assigned", TrustAudit.assigned_at < cutoff
                )
            )
        )
        pool = {c.node_id for c in candidates(trust, s) if not c.held}
        stale = list(
            s.scalars(
                select(TrustAudit.id).where(
                    TrustAudit.state == "pending",
                    TrustAudit.designated.is_not(None),
                    TrustAudit.designated.not_in(pool),
                )
            )
        )
    if not late and not stale:
        return []
    back: list[str] = []
    with trust.store.tx() as s:
        for audit_id in late:
            a = s.get(TrustAudit, audit_id)
            if a is None or a.state != "assigned" or a.assigned_at >= cutoff:
                continue
            if _lapse(trust, s, a, now):
                back.append(a.id)
        for audit_id in stale:
            a = s.get(TrustAudit, audit_id)
            if a is not None and a.state == "pending" and a.designated not in pool:
                a.designated = redraw(trust, s, a, list(a.expired or []))
    if back or stale:
        trust.new_audit.set()
    return back


def _lapse(trust: Trust, s: Session, a: TrustAudit, now: float) -> bool:
    """One lapsed audit: back to pending for a new draw, the late verifier held and slashed,
    all in the caller's transaction."""
    late_id = a.verifier_id
    assert late_id is not None
    lapsed = [*(a.expired or []), late_id]
    res = s.execute(
        update(TrustAudit)
        .where(TrustAudit.id == a.id, TrustAudit.state == "assigned")
        .values(
            state=AUDIT.move(a.state, "pending", key=a.id, story=(f"lapsed by node:{late_id}",)),
            verifier_id=None,
            assigned_at=0.0,
            expired=lapsed,
        )
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return False
    node = s.get(TrustNode, late_id)
    if node is not None:
        node.verifier_expired += 1
        node.held = True  # skipped by every draw until it reports again
    a.designated = redraw(trust, s, a, lapsed)
    bps = trust.settings.hold_slash_bps
    for acct, bal in stakes(s, late_id).items():
        e = entries.lapse_slash(a.id, late_id, acct, bal, selection.hold_slash(bal, bps))
        if e is not None:
            trust.store._post(s, e)
    return True
