"""Durable market state: device offers, node regions and links, orders, stakes, payouts.

Beside `Store` (tasks and the ledger), sharing its transactions and its ledger append, so
an order row and its prepayment, or an accrual and the order's `spent`, commit together or
not at all: a refused order leaves no posting behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from idlegrid.coordinator.db.store import Store
from idlegrid.coordinator.db.tables import (
    Account,
    Attempt,
    DeviceOffer,
    LedgerEntry,
    LedgerPosting,
    MarketOrder,
    NodeMarket,
    table,
)
from idlegrid.coordinator.leases.tables import Lease, LeaseTransition
from idlegrid.coordinator.market.views import (
    DuplicateOrder,
    OrderNotFound,
    OrderView,
    body_hash,
    order_view,
    start_fields,
    view_of_row,
)
from idlegrid.core import ledger
from idlegrid.core.lease.loss import lease_trials
from idlegrid.core.market import settlement
from idlegrid.core.market.orders import (
    TERMINAL,
    Order,
    OrderKind,
    OrderState,
    order_transition,
)
from idlegrid.errors import Conflict, IdlegridError

# Outcomes that are not the provider's fault: they do not lower its reliability.
# ("handed back" is what attempts were recorded with before the two names agreed.)
_BLAMELESS = ("done", "handback", "handed back", "cancelled", "consumer left")
# Prior for the success ratio: a newcomer starts at 0.95, as if 19 of 20 went well.
_PRIOR_OK, _PRIOR_N = 19, 20


_INSERT_ORDER = insert(table(MarketOrder))


class MarketStore:
    """Market tables and market money, in the same database as `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.clock = store.clock

    # ---- supply ------------------------------------------------------------------------

    def set_supply(
        self,
        node_id: str,
        region: str,
        links: dict[str, float],
        devices: Sequence[dict[str, Any]],
        latency_ms: dict[str, float] | None = None,
        lease: dict[str, Any] | None = None,
    ) -> None:
        """Replace a node's region, links (Gbit/s and latency), device offers and lease
        controls (at registration)."""
        with self.store.tx() as s:
            s.execute(delete(DeviceOffer).where(DeviceOffer.node_id == node_id))
            s.execute(delete(NodeMarket).where(NodeMarket.node_id == node_id))
            s.flush()
            s.add(
                NodeMarket(
                    node_id=node_id,
                    region=region,
                    links=dict(links),
                    link_latency_ms=dict(latency_ms or {}),
                    lease=lease,
                )
            )
            for d in devices:
                s.add(
                    DeviceOffer(
                        node_id=node_id,
                        device_model=d["model"],
                        count=d["count"],
                        vram_gb=d["vram_gb"],
                        price_h=d["price_h"],
                        plugin=d.get("plugin"),
                    )
                )

    def supply(self) -> dict[str, dict[str, Any]]:
        """Per node: region, links, device offers, stakes and measured reliability."""
        with self.store.read() as s:
            out: dict[str, dict[str, Any]] = {}
            for m in s.scalars(select(NodeMarket)):
                out[m.node_id] = {
                    "region": m.region,
                    "links": dict(m.links),
                    "latency_ms": dict(m.link_latency_ms or {}),
                    "devices": [],
                    "stakes": {},
                    "reliability": _PRIOR_OK / _PRIOR_N,
                    "lease": m.lease,
                }
            for d in s.scalars(select(DeviceOffer)):
                out.setdefault(
                    d.node_id,
                    {
                        "region": "local",
                        "links": {},
                        "latency_ms": {},
                        "devices": [],
                        "stakes": {},
                        "reliability": 0.95,
                    },
                )["devices"].append(
                    {
                        "model": d.device_model,
                        "count": d.count,
                        "vram_gb": d.vram_gb,
                        "price_h": d.price_h,
                        "plugin": d.plugin,
                    }
                )
            for acct, bal in s.execute(
                select(Account.id, Account.balance).where(Account.id.like("stake:%"))
            ):
                _, node, cls = acct.split(":", 2)
                if node in out:
                    out[node]["stakes"][cls] = bal
            for node, value in self._reliability(s).items():
                if node in out:
                    out[node]["reliability"] = value
            return out

    def reliability(self) -> dict[str, float]:
        """Success ratio per node that has ended attempts (others keep the prior, 0.95)."""
        with self.store.read() as s:
            return self._reliability(s)

    @staticmethod
    def _reliability(s: Session) -> dict[str, float]:
        """Per node: (good + 19) / (trials + 20) over ended inference attempts and finished
        leases (`core/lease/loss.lease_trials`: a leased hour is a good trial, a lost lease
        LOSS_WEIGHT failed ones)."""
        ok = func.sum(case((Attempt.outcome.in_(_BLAMELESS), 1), else_=0))
        trials: dict[str, list[int]] = {}
        for node, good, ended in s.execute(
            select(Attempt.node_id, ok, func.count())
            .where(Attempt.outcome.is_not(None))
            .group_by(Attempt.node_id)
        ):
            trials[node] = [int(good or 0), int(ended)]
        lost = select(LeaseTransition.lease_id).where(LeaseTransition.cause == "provider-lost")
        for node, billed, was_lost in s.execute(
            select(Lease.node_id, Lease.billed_s, Lease.id.in_(lost)).where(
                Lease.state.in_(("ended", "failed")), Lease.node_id != ""
            )
        ):
            good, total = lease_trials(float(billed), bool(was_lost))
            t = trials.setdefault(node, [0, 0])
            t[0] += good
            t[1] += total
        return {n: (g + _PRIOR_OK) / (n_ + _PRIOR_N) for n, (g, n_) in trials.items() if n_}

    # ---- orders ------------------------------------------------------------------------

    def create_order(
        self,
        order: Order,
        key_id: str,
        body: dict[str, Any],
        placement: dict[str, Any] | None,
        reasons: dict[str, Any] | None,
    ) -> OrderView:
        """Insert an order and prepay its budget in one transaction; duplicates are refused."""
        return self.create_orders([(order, body, placement, reasons)], key_id)[0]

    def create_orders(
        self,
        items: Sequence[tuple[Order, dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]],
        key_id: str,
    ) -> list[OrderView]:
        """Insert orders and their prepayments all together, or none of them."""
        now = self.clock()
        rows = [
            self._row_for(order, key_id, body, placement, reasons, now)
            for order, body, placement, reasons in items
        ]
        try:
            with self.store.tx() as s:
                # A prebuilt Core insert: on the order path, ORM flushes cost more than SQLite.
                s.execute(_INSERT_ORDER, rows)
                for order, *_ in items:
                    if order.job is None:  # a job's placement is paid per step, not here
                        self.store._post(
                            s, settlement.prepay(order.id, key_id, order.budget()), fresh=True
                        )
        except IntegrityError:
            with self.store.read() as s:
                for order, *_ in items:
                    if (
                        row := s.execute(
                            select(MarketOrder.state, MarketOrder.key_id).where(
                                MarketOrder.id == order.id
                            )
                        ).first()
                    ) is not None:
                        raise DuplicateOrder(
                            order.id, row[0] if row[1] == key_id else None
                        ) from None
            raise
        return [view_of_row(r, key_id, now) for r in rows]

    def create_orders_each(
        self, items: Sequence[tuple[Order, str, dict[str, Any] | None, dict[str, Any] | None]]
    ) -> list[OrderView | Exception]:
        """Several consumers' orders in one transaction, each in its own savepoint.

        One commit for many orders (group commit), yet one consumer's 402 or duplicate id
        does not touch another's order: a failed item's savepoint rolls back alone.
        """
        now = self.clock()
        out: list[OrderView | Exception] = []
        with self.store.tx() as s:
            for order, key_id, placement, reasons in items:
                row = self._row_for(order, key_id, order.to_dict(), placement, reasons, now)
                try:
                    # A savepoint per order only when others share the transaction.
                    with s.begin_nested() if len(items) > 1 else contextlib.nullcontext():
                        s.execute(_INSERT_ORDER, [row])
                        if order.job is None:  # a job's placement is paid per step
                            self.store._post(
                                s, settlement.prepay(order.id, key_id, order.budget()), fresh=True
                            )
                except IntegrityError:
                    if len(items) == 1:
                        raise
                    got = s.execute(
                        select(MarketOrder.state, MarketOrder.key_id).where(
                            MarketOrder.id == order.id
                        )
                    ).first()
                    out.append(
                        DuplicateOrder(order.id, got[0] if got and got[1] == key_id else None)
                    )
                except IdlegridError as exc:
                    if len(items) == 1:
                        raise
                    out.append(exc)
                else:
                    out.append(view_of_row(row, key_id, now))
        return out

    @staticmethod
    def _row_for(
        order: Order,
        key_id: str,
        body: dict[str, Any],
        placement: dict[str, Any] | None,
        reasons: dict[str, Any] | None,
        now: float,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": order.id,
            "key_id": key_id,
            "kind": order.kind.value,
            "body": body,
            "body_hash": body_hash(body),
            "state": OrderState.OPEN.value,
            "budget": order.budget(),
            "spent": 0,
            "refunded": 0,
            "placement": None,
            "reasons": reasons,
            "created_at": now,
            "updated_at": now,
            "started_at": None,
            "ends_at": None,
            "accrued_until": None,
            "accrual_seq": 0,
            "tokens_done": 0,
        }
        if placement is not None:
            row |= start_fields(order, placement, now)
        return row

    @staticmethod
    def _start(row: MarketOrder, order: Order, placement: dict[str, Any], now: float) -> None:
        for k, v in start_fields(order, placement, now).items():
            setattr(row, k, v)

    def place(self, order_id: str, order: Order, placement: dict[str, Any]) -> OrderView:
        """Place an open order (re-matched later, or after its provider was lost)."""
        with self.store.tx() as s:
            row = self._row(s, order_id)
            if row.state != OrderState.OPEN.value:
                raise Conflict(f"order {order_id} is {row.state}, not open", order_id=order_id)
            self._start(row, order, placement, self.clock())
            if order.kind is not OrderKind.BATCH and row.spent:
                # Re-placed after a loss: the hours left, not the hours bought.
                done_h = row.spent / max(1, order.max_price * order.devices)
                row.ends_at = self.clock() + max(0.0, order.hours - done_h) * 3600
            return order_view(row)

    def set_reasons(self, order_id: str, reasons: dict[str, Any]) -> None:
        """Record why an open order is still unmatched."""
        with self.store.tx() as s:
            s.execute(
                update(MarketOrder)
                .where(MarketOrder.id == order_id)
                .values(reasons=reasons, updated_at=self.clock())
            )

    def _row(self, s: Session, order_id: str, key_id: str | None = None) -> MarketOrder:
        row = s.get(MarketOrder, order_id)
        if row is None or (key_id is not None and row.key_id != key_id):
            raise OrderNotFound(order_id)
        return row

    def get_order(self, order_id: str, key_id: str | None = None) -> OrderView:
        """One order (only the consumer's own when `key_id` is given)."""
        with self.store.read() as s:
            return order_view(self._row(s, order_id, key_id))

    def orders(
        self, key_id: str | None = None, states: Sequence[str] | None = None
    ) -> list[OrderView]:
        """Orders, newest first, optionally one consumer's or in some states."""
        with self.store.read() as s:
            q = select(MarketOrder).order_by(MarketOrder.created_at.desc())
            if key_id is not None:
                q = q.where(MarketOrder.key_id == key_id)
            if states:
                q = q.where(MarketOrder.state.in_(list(states)))
            return [order_view(o) for o in s.scalars(q)]

    def orders_due(self, accrued_before: float, now: float) -> list[OrderView]:
        """Active orders last accrued before `accrued_before`, or past their end."""
        with self.store.read() as s:
            q = select(MarketOrder).where(
                MarketOrder.state == OrderState.ACTIVE.value,
                # Leases are billed by the leases domain, per running second (bill_lease).
                MarketOrder.kind != OrderKind.LEASE.value,
                (MarketOrder.accrued_until <= accrued_before) | (MarketOrder.ends_at <= now),
            )
            return [order_view(o) for o in s.scalars(q)]

    def accrue(self, order_id: str, fee_bps: int, until: float | None = None) -> OrderView:
        """Pay providers for the time served since the last accrual; complete at the end."""
        with self.store.tx() as s:
            row = self._row(s, order_id)
            self._accrue_time(s, row, fee_bps, until if until is not None else self.clock())
            if (
                row.state == OrderState.ACTIVE.value
                and row.ends_at is not None
                and (row.accrued_until or 0) >= row.ends_at
            ):
                self._finish(s, row, "complete")
            return order_view(row)

    def _accrue_time(self, s: Session, row: MarketOrder, fee_bps: int, now: float) -> None:
        if (
            row.state != OrderState.ACTIVE.value
            or row.kind
            in (
                OrderKind.BATCH.value,
                OrderKind.LEASE.value,  # paid per running second: bill_lease
            )
            or row.body.get("job")  # a training job's placement: paid per verified step
        ):
            return
        start = row.accrued_until or now
        end = min(now, row.ends_at or now)
        if end <= start or not row.placement:
            return
        legs = row.placement["legs"]
        due = [
            settlement.accrual_due(leg["unit_price"], leg["devices"], end - start) for leg in legs
        ]
        # The escrow is the hard ceiling: rounding never lets an order pay more than it holds.
        # (SLO refunds come from the provider's accrual and stake, not from this escrow.)
        room = row.budget - row.spent
        for leg, amount in zip(legs, due, strict=True):
            amount = min(amount, room)
            if amount > 0:
                row.accrual_seq += 1
                self.store._post(
                    s, settlement.accrue(row.id, leg["provider"], row.accrual_seq, amount, fee_bps)
                )
                row.spent += amount
                room -= amount
        row.accrued_until = end
        row.updated_at = self.clock()

    def add_tokens(self, order_id: str, node_id: str, tokens: int, fee_bps: int) -> OrderView:
        """A provider reports batch output tokens; pay them, complete when all are done."""
        with self.store.tx() as s:
            row = self._row(s, order_id)
            if row.kind != OrderKind.BATCH.value or row.state != OrderState.ACTIVE.value:
                raise Conflict(
                    f"order {order_id} takes no token reports now ({row.state})", order_id=order_id
                )
            legs = [
                leg for leg in (row.placement or {}).get("legs", []) if leg["provider"] == node_id
            ]
            if not legs:
                raise Conflict(f"node {node_id} does not serve order {order_id}", order_id=order_id)
            wanted = int(row.body["tokens"])
            take = max(0, min(tokens, wanted - row.tokens_done))
            before = ledger.token_cost(row.tokens_done, legs[0]["unit_price"])
            after = ledger.token_cost(row.tokens_done + take, legs[0]["unit_price"])
            amount = min(after - before, row.budget - row.spent)
            row.tokens_done += take
            if amount > 0:
                row.accrual_seq += 1
                self.store._post(
                    s, settlement.accrue(row.id, node_id, row.accrual_seq, amount, fee_bps)
                )
                row.spent += amount
            if row.tokens_done >= wanted:
                self._finish(s, row, "complete")
            return order_view(row)

    def _finish(self, s: Session, row: MarketOrder, move: str) -> None:
        row.state = order_transition(OrderState(row.state), move).value
        remaining = row.budget - row.spent
        if remaining > 0:
            self.store._post(s, settlement.close(row.id, row.key_id, remaining))
        row.updated_at = self.clock()

    def cancel(self, order_id: str, key_id: str | None, fee_bps: int) -> OrderView:
        """Stop an order: pay for time served so far, return the rest of the escrow."""
        with self.store.tx() as s:
            row = self._row(s, order_id, key_id)
            self._accrue_time(s, row, fee_bps, self.clock())
            self._finish(s, row, "cancel")
            return order_view(row)

    def expire(self, order_id: str) -> OrderView:
        """An open order nobody could take in time: its whole escrow goes back."""
        with self.store.tx() as s:
            row = self._row(s, order_id)
            self._finish(s, row, "expire")
            return order_view(row)

    def requeue(self, order_id: str, fee_bps: int, served_until: float) -> OrderView:
        """The provider was lost: pay it up to `served_until`, reopen the order to re-place."""
        with self.store.tx() as s:
            row = self._row(s, order_id)
            self._accrue_time(s, row, fee_bps, served_until)
            row.state = order_transition(OrderState(row.state), "requeue").value
            row.placement = None
            row.updated_at = self.clock()
            return order_view(row)

    def slo_refund(
        self, order_id: str, ref: str, node_id: str, device_class: str, amount: int
    ) -> bool:
        """Refund a missed SLO window from the provider's accrual, then its stake."""
        with self.store.tx() as s:
            row = self._row(s, order_id)
            accrued = (
                s.scalar(
                    select(Account.balance).where(Account.id == ledger.accrual_account(node_id))
                )
                or 0
            )
            staked = (
                s.scalar(
                    select(Account.balance).where(
                        Account.id == ledger.stake_account(node_id, device_class)
                    )
                )
                or 0
            )
            amount = min(amount, accrued + staked)
            if amount <= 0:
                return False
            posted = self.store._post(
                s,
                settlement.slo_refund(
                    ref, order_id, node_id, row.key_id, amount, accrued, device_class
                ),
            )
            if posted:
                row.refunded += amount
            return posted

    # ---- stakes and payouts --------------------------------------------------------------

    def stake(self, ref: str, node_id: str, device_class: str, amount: int) -> bool:
        """Lock provider credits as stake for a device class (idempotent on `ref`)."""
        return self.store.post(settlement.stake(ref, node_id, device_class, amount))

    def unstake(self, ref: str, node_id: str, device_class: str, amount: int) -> bool:
        """Return stake to the provider, unless an active order still relies on it."""
        with self.store.tx() as s:
            for o in s.scalars(
                select(MarketOrder).where(MarketOrder.state == OrderState.ACTIVE.value)
            ):
                if any(leg["provider"] == node_id for leg in (o.placement or {}).get("legs", [])):
                    raise Conflict(
                        f"order {o.id} is active on this node; stake stays", order_id=o.id
                    )
            return self.store._post(s, settlement.unstake(ref, node_id, device_class, amount))

    def payout(
        self, batch_id: str, settled_before: float, hold: frozenset[str] = frozenset()
    ) -> dict[str, int]:
        """Pay out accruals earned before `settled_before` (the audit window), in one entry;
        nodes in `hold` (work nobody could check yet) are not paid.

        Due = credits that reached the accrual account before the cutoff, less everything
        that has left it since (payouts, refunds, forfeits), never more than its balance.
        """
        with self.store.tx() as s:
            rows = s.execute(
                select(
                    LedgerPosting.account,
                    func.sum(
                        case(
                            (LedgerPosting.amount < 0, LedgerPosting.amount),
                            (LedgerEntry.created_at <= settled_before, LedgerPosting.amount),
                            else_=0,
                        )
                    ),
                    func.sum(LedgerPosting.amount),
                )
                .join(LedgerEntry, LedgerEntry.seq == LedgerPosting.entry_seq)
                .where(LedgerPosting.account.like("accrual:%"))
                .group_by(LedgerPosting.account)
            ).all()
            due = {acct.split(":", 1)[1]: int(min(old or 0, bal or 0)) for acct, old, bal in rows}
            due = {n: v for n, v in due.items() if v > 0 and n not in hold}
            if due:
                self.store._post(s, settlement.payout(batch_id, due))
            return due


def open_or_active(views: Sequence[OrderView]) -> list[OrderView]:
    """Orders that still hold capacity or wait for it."""
    return [v for v in views if OrderState(v.state) not in TERMINAL]


__all__ = [
    "DuplicateOrder",
    "IdlegridError",
    "MarketStore",
    "OrderNotFound",
    "OrderView",
    "body_hash",
    "open_or_active",
]
