"""The dashboard's analytics queries: energy, latency, prices, income and fees over time.

Read-only, one transaction each; the dashboard is their only reader.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, func, select

from idlegrid.coordinator.db.store import Store
from idlegrid.coordinator.db.tables import Attempt, LedgerEntry, LedgerPosting, Task
from idlegrid.core import ledger


def attempt_energy(store: Store, since: float) -> list[dict[str, Any]]:
    """Per node and model: output tokens, joules, and whether any joule was estimated."""
    with store.read() as s:
        rows = s.execute(
            select(
                Attempt.node_id,
                Task.model_id,
                func.sum(Attempt.output_tokens),
                func.sum(Attempt.energy_j),
                func.count(),
                func.max(func.coalesce(Attempt.energy_estimated, False).cast(Integer)),
            )
            .join(Task, Task.id == Attempt.task_id)
            .where(Attempt.ended_at >= since, Attempt.energy_j.is_not(None))
            .group_by(Attempt.node_id, Task.model_id)
        ).all()
    return [
        {
            "node_id": n,
            "model": m,
            "output_tokens": int(tok or 0),
            "energy_j": float(j or 0.0),
            "requests": c,
            "estimated": bool(est),
        }
        for n, m, tok, j, c, est in rows
    ]


def finished_tasks(store: Store, since: float, limit: int = 10_000) -> list[dict[str, Any]]:
    """Tasks that ended (done or failed) since `since`, newest first."""
    with store.read() as s:
        rows = s.execute(
            select(
                Task.id,
                Task.model_id,
                Task.state,
                Task.attempt,
                Task.prompt_tokens,
                Task.output_tokens,
                Task.created_at,
                Task.updated_at,
                Task.error,
            )
            .where(Task.state.in_(["done", "failed"]), Task.updated_at >= since)
            .order_by(Task.updated_at.desc())
            .limit(limit)
        ).all()
        ids = [r[0] for r in rows]
        nodes: dict[str, str] = {}
        if ids:
            for task_id, node_id in s.execute(
                select(Attempt.task_id, Attempt.node_id)
                .where(Attempt.task_id.in_(ids))
                .order_by(Attempt.attempt)
            ):
                nodes[task_id] = node_id  # the last attempt's provider
    return [
        {
            "id": i,
            "model": m,
            "state": st,
            "attempts": a,
            "prompt_tokens": pt,
            "output_tokens": ot,
            "created_at": c,
            "ended_at": u,
            "latency_s": u - c,
            "node_id": nodes.get(i),
            "error": e,
        }
        for i, m, st, a, pt, ot, c, u, e in rows
    ]


def attempt_prices(store: Store, since: float) -> list[tuple[float, str, int, int]]:
    """(started_at, model, prompt price, output price) of attempts since `since`."""
    with store.read() as s:
        rows = s.execute(
            select(Attempt.started_at, Task.model_id, Attempt.prompt_price, Attempt.output_price)
            .join(Task, Task.id == Attempt.task_id)
            .where(Attempt.started_at >= since)
            .order_by(Attempt.started_at)
        ).all()
    return [(t, m, int(p), int(o)) for t, m, p, o in rows]


def recent_entries(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ledger entries with their postings, newest first."""
    with store.read() as s:
        entries = s.scalars(select(LedgerEntry).order_by(LedgerEntry.seq.desc()).limit(limit)).all()
        seqs = [e.seq for e in entries]
        postings: dict[int, list[dict[str, Any]]] = {}
        if seqs:
            for seq, account, amount in s.execute(
                select(LedgerPosting.entry_seq, LedgerPosting.account, LedgerPosting.amount)
                .where(LedgerPosting.entry_seq.in_(seqs))
                .order_by(LedgerPosting.account)
            ):
                postings.setdefault(seq, []).append({"account": account, "amount": amount})
        return [
            {
                "seq": e.seq,
                "cause": {"kind": e.cause_kind, "id": e.cause_id},
                "memo": e.memo,
                "created_at": e.created_at,
                "postings": postings.get(e.seq, []),
            }
            for e in entries
        ]


def fee_income(store: Store, since: float) -> int:
    """µcr taken as protocol fees since `since`."""
    with store.read() as s:
        return int(
            s.scalar(
                select(func.coalesce(func.sum(LedgerPosting.amount), 0))
                .join(LedgerEntry, LedgerEntry.seq == LedgerPosting.entry_seq)
                .where(LedgerEntry.created_at >= since, LedgerPosting.account == ledger.FEES)
            )
            or 0
        )
