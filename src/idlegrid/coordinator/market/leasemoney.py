"""Lease money, in the lease's own transaction: per-second billing, extensions, and the
close of a lease's order (leases domain, through `Market`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from idlegrid.coordinator.db.store import Store
from idlegrid.coordinator.db.tables import Account, LedgerEntry, MarketOrder
from idlegrid.coordinator.market.views import OrderNotFound, body_hash
from idlegrid.core import ledger
from idlegrid.core.market import settlement
from idlegrid.core.market.orders import (
    TERMINAL,
    OrderKind,
    OrderState,
    order_transition,
    parse_order,
)
from idlegrid.errors import Conflict


def _row(s: Session, order_id: str) -> MarketOrder:
    row = s.get(MarketOrder, order_id)
    if row is None:
        raise OrderNotFound(order_id)
    return row


def _finish(store: Store, s: Session, row: MarketOrder, move: str, now: float) -> None:
    row.state = order_transition(OrderState(row.state), move).value
    remaining = row.budget - row.spent
    if remaining > 0:
        store._post(s, settlement.close(row.id, row.key_id, remaining))
    row.updated_at = now


TERMINAL_STATES = frozenset(s.value for s in TERMINAL)


class LeaseMoney:
    """A lease order's money: what `Market.bill_lease` and `extend_lease` do."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.clock = store.clock

    def extend_lease(self, s: Session, order_id: str, hours: float) -> int:
        """Escrow `hours` more of a lease order's worst case, in the caller's transaction
        (InsufficientCredits, and nothing changed, if the consumer cannot cover it); returns
        the µcr escrowed."""
        row = _row(s, order_id)
        if row.state != OrderState.ACTIVE.value or row.kind != OrderKind.LEASE.value:
            raise Conflict(f"order {order_id} is {row.state}: nothing to extend", state=row.state)
        body = {**row.body, "hours": float(row.body["hours"]) + hours}
        extra = parse_order({**row.body, "hours": hours}, internal=True).budget()
        done = (LedgerEntry.cause_id == order_id) & (LedgerEntry.memo == "lease-extend")
        seq = int(s.scalar(select(func.count()).where(done)) or 0)
        self.store._post(s, settlement.top_up(order_id, row.key_id, seq, extra))
        row.budget += extra
        row.body = body
        if row.ends_at is not None:
            row.ends_at += hours * 3600
        row.updated_at = self.clock()
        return extra

    def bill_lease(
        self,
        s: Session,
        order_id: str,
        before_s: int,
        now_s: int,
        fee_bps: int,
        close: str | None,
        carry: dict[str, Any] | None = None,
    ) -> None:
        """Pay a lease's providers for its running seconds (before_s, now_s], in the caller's
        transaction (the lease's move); then close the order with `close`, refunding the rest
        (after carrying the escrow of `carry`, a new order body, into that new order).
        Amounts are cumulative differences, so rounding never drifts however often it bills."""
        row = _row(s, order_id)
        if row.state == OrderState.ACTIVE.value and now_s > before_s and row.placement:
            room = row.budget - row.spent
            for leg in row.placement["legs"]:
                due = settlement.accrual_due(leg["unit_price"], leg["devices"], now_s)
                due -= settlement.accrual_due(leg["unit_price"], leg["devices"], before_s)
                amount = min(due, room)
                if amount > 0:
                    row.accrual_seq += 1
                    self.store._post(
                        s,
                        settlement.accrue(
                            row.id, leg["provider"], row.accrual_seq, amount, fee_bps
                        ),
                    )
                    row.spent += amount
                    room -= amount
            row.accrued_until = (row.started_at or 0.0) + now_s
            row.updated_at = self.clock()
        elif row.state == OrderState.ACTIVE.value and now_s < before_s and row.placement:
            self._unaccrue(s, row, before_s, now_s)
        if close is not None and row.state not in TERMINAL_STATES:
            if row.state == OrderState.OPEN.value and close == "fail":
                close = "expire"  # a restarted lease that never found a provider
            if carry is not None:
                self._carry(s, row, carry)
            _finish(self.store, s, row, close, self.clock())

    def _unaccrue(self, s: Session, row: MarketOrder, before_s: int, now_s: int) -> None:
        """Take back what seconds (now_s, before_s] paid (a lease billed only to its last
        proof): from the provider's accrual, then its account, then fees (where the failed
        proof's slash went), never more than those hold; into the escrow, refunded at close."""
        for leg in row.placement["legs"] if row.placement else []:
            due = settlement.accrual_due(leg["unit_price"], leg["devices"], before_s)
            due -= settlement.accrual_due(leg["unit_price"], leg["devices"], now_s)
            want = min(due, row.spent)
            sources: dict[str, int] = {}
            node = leg["provider"]
            for acct in (ledger.accrual_account(node), ledger.provider_account(node), ledger.FEES):
                if want <= 0:
                    break
                held = int(s.scalar(select(Account.balance).where(Account.id == acct)) or 0)
                take = min(want, max(0, held))
                if take:
                    sources[acct] = take
                    want -= take
            if sources:
                row.accrual_seq += 1
                self.store._post(s, settlement.unaccrue(row.id, node, row.accrual_seq, sources))
                row.spent -= sum(sources.values())
        row.updated_at = self.clock()

    def _carry(self, s: Session, row: MarketOrder, body: dict[str, Any]) -> None:
        """Open the order `body` for a lost lease's unused hours, its escrow taken from
        what `row` still holds (at most its worst case); what is left is refunded after."""
        order = parse_order(body, internal=True)
        amount = min(order.budget(), row.budget - row.spent)
        now = self.clock()
        s.add(
            MarketOrder(
                id=order.id, key_id=row.key_id, kind=order.kind.value, body=body,
                body_hash=body_hash(body), state=OrderState.OPEN.value, budget=amount,
                spent=0, refunded=0, placement=None, reasons=None, created_at=now,
                updated_at=now, started_at=None, ends_at=None, accrued_until=None,
                accrual_seq=0, tokens_done=0,
            )
        )  # fmt: skip
        s.flush()
        if amount > 0:
            self.store._post(s, settlement.carry(row.id, order.id, amount))
            row.budget -= amount
