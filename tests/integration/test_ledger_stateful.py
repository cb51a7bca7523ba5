"""Ledger invariants under random market histories, on SQLite and PostgreSQL (Hypothesis).

A state machine drives deposits, orders, matches, accruals, token reports, payouts, SLO
refunds, slashes, cancels and crashes (the store reopened from its database, and a
transaction that dies half-way) through the real Store and MarketStore. After every step:
the accounts sum to zero, nothing but the issuer is negative, the new entries chain onto
the old ones and explain every cached balance, and replaying a posted entry changes nothing.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from idlegrid.coordinator.db.store import Store, migrate
from idlegrid.coordinator.market.store import MarketStore
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Cause, Entry
from idlegrid.core.market import settlement
from idlegrid.core.market.orders import OrderKind, OrderState, parse_order
from idlegrid.errors import Conflict, InsufficientCredits

FEE_BPS = 200
NODES = ("n1", "n2")
_ids = itertools.count()


class Clock:
    """A clock the machine moves by hand, monotonic across examples."""

    now = 1_000_000.0

    def __call__(self) -> float:
        return Clock.now


class Crash(Exception):
    """Raised inside a transaction to kill it half-way."""


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    migrate(url)

    class LedgerMachine(RuleBasedStateMachine):
        @initialize()
        def open_store(self) -> None:
            self.clock = Clock()
            self.store = Store(url, self.clock)
            self.market = MarketStore(self.store)
            self.keys: list[str] = []
            self.orders: list[tuple[str, Any]] = []  # (id, Order)
            self.posted: list[Entry] = []
            self.tag = f"e{next(_ids)}"
            # Per-example providers: a replayed example must meet the same balances.
            self.nodes = [f"{n}-{self.tag}" for n in NODES]
            with self.store.tx() as s:
                from idlegrid.coordinator.db.tables import LedgerHead

                head = s.get(LedgerHead, 1)
                self.seen_seq = head.seq if head else 0
                self.prev_hash = head.hash if head else ledger.GENESIS_HASH
            self.sums = self.store.balances()
            for n in self.nodes:
                self._post(
                    ledger.mint(
                        f"fund:{self.tag}:{n}",
                        ledger.provider_account(n),
                        100 * MICRO,
                        Cause("deposit", self.tag),
                    )
                )
            for credits in (5, 40):
                self.deposit(credits)

        def teardown(self) -> None:
            self.store.close()

        def _post(self, entry: Entry) -> bool:
            posted = self.store.post(entry)
            if posted:
                self.posted.append(entry)
            return posted

        @rule(credits=st.integers(1, 50))
        def deposit(self, credits: int) -> None:
            key, _ = self.store.create_api_key(f"k{len(self.keys)}")
            self.keys.append(key)
            self._post(
                ledger.mint(
                    f"dep:{key}",
                    ledger.consumer_account(key),
                    credits * MICRO,
                    Cause("deposit", key),
                )
            )

        @precondition(lambda self: self.keys)
        @rule(
            data=st.data(),
            hours=st.sampled_from([0.5, 1, 4]),
            price=st.sampled_from([0.1, 1.0, 30.0]),
            batch=st.booleans(),
            placed=st.booleans(),
        )
        def order(
            self, data: st.DataObject, hours: float, price: float, batch: bool, placed: bool
        ) -> None:
            key = data.draw(st.sampled_from(self.keys))
            node = self.nodes[data.draw(st.integers(0, len(NODES) - 1))]
            oid = f"o{next(_ids)}"
            raw: dict[str, Any] = {
                "id": oid,
                "kind": "batch" if batch else "lease",
                "resources": {"max_price": price},
            }
            if batch:
                raw |= {"model": "m", "tokens": 100_000}
            else:
                raw |= {"hours": hours}
            order = parse_order(raw)
            unit = round(price * MICRO * 0.8)
            placement = (
                {
                    "legs": [
                        {
                            "offer_id": f"{node}/RTX-4090",
                            "provider": node,
                            "devices": 1,
                            "unit_price": unit,
                        }
                    ]
                }
                if placed
                else None
            )
            try:
                self.market.create_order(order, key, order.to_dict(), placement, None)
            except InsufficientCredits:
                return  # refused whole: the invariants below show nothing was posted
            self.orders.append((oid, order))

        def _in(self, *states: str) -> list[tuple[str, Any]]:
            ids = {v.id for v in self.market.orders(states=states)}
            return [(i, o) for i, o in self.orders if i in ids]

        @precondition(lambda self: self.orders)
        @rule(data=st.data(), n=st.integers(0, len(NODES) - 1))
        def match(self, data: st.DataObject, n: int) -> None:
            node = self.nodes[n]
            open_ = self._in(OrderState.OPEN.value)
            if not open_:
                return
            oid, order = data.draw(st.sampled_from(open_))
            self.market.place(
                oid,
                order,
                {
                    "legs": [
                        {
                            "offer_id": f"{node}/RTX-4090",
                            "provider": node,
                            "devices": 1,
                            "unit_price": order.max_price // 2,
                        }
                    ]
                },
            )

        @rule(seconds=st.sampled_from([1.0, 60.0, 1800.0, 7200.0]))
        def time_passes_and_orders_accrue(self, seconds: float) -> None:
            Clock.now += seconds
            for oid, order in self._in(OrderState.ACTIVE.value):
                if order.kind is not OrderKind.BATCH:
                    self.market.accrue(oid, FEE_BPS)

        @precondition(lambda self: self.orders)
        @rule(data=st.data(), tokens=st.integers(1, 120_000))
        def tokens_reported(self, data: st.DataObject, tokens: int) -> None:
            batch = [
                (i, o) for i, o in self._in(OrderState.ACTIVE.value) if o.kind is OrderKind.BATCH
            ]
            if not batch:
                return
            oid, _ = data.draw(st.sampled_from(batch))
            node = self.market.get_order(oid).placement["legs"][0]["provider"]  # type: ignore[index]
            self.market.add_tokens(oid, node, tokens, FEE_BPS)

        @precondition(lambda self: self.orders)
        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            oid, _ = data.draw(st.sampled_from(self.orders))
            with contextlib.suppress(Conflict):  # already over: refused, nothing posted
                self.market.cancel(oid, None, FEE_BPS)

        @rule()
        def payout(self) -> None:
            self.market.payout(f"{self.tag}-{next(_ids)}", Clock.now - 60)

        @precondition(lambda self: self.orders)
        @rule(data=st.data(), credits=st.integers(1, 20))
        def slo_refund(self, data: st.DataObject, credits: int) -> None:
            active = self._in(OrderState.ACTIVE.value)
            if not active:
                return
            oid, _ = data.draw(st.sampled_from(active))
            node = self.market.get_order(oid).placement["legs"][0]["provider"]  # type: ignore[index]
            self.market.slo_refund(
                oid, f"{oid}:{next(_ids)}", node, "RTX-4090", credits * MICRO // 10
            )

        @rule(n=st.integers(0, len(NODES) - 1), credits=st.integers(1, 30))
        def stake(self, n: int, credits: int) -> None:
            node = self.nodes[n]
            with contextlib.suppress(InsufficientCredits):
                self.market.stake(f"{self.tag}-{next(_ids)}", node, "RTX-4090", credits * MICRO)

        @rule(n=st.integers(0, len(NODES) - 1), credits=st.integers(1, 10))
        def slash(self, n: int, credits: int) -> None:
            node = self.nodes[n]
            staked = self.store.balance(ledger.stake_account(node, "RTX-4090"))
            amount = min(staked, credits * MICRO)
            if amount <= 0:
                return
            victim = self.keys[0] if self.keys else None
            shares = {ledger.consumer_account(victim): amount // 2} if victim else {}
            self._post(
                settlement.slash(f"{self.tag}-{next(_ids)}", node, "RTX-4090", amount, shares)
            )

        @rule()
        def crash_and_restart(self) -> None:
            self.store.close()
            self.store = Store(url, self.clock)
            self.market = MarketStore(self.store)

        @precondition(lambda self: self.keys)
        @rule(data=st.data())
        def crash_mid_transaction(self, data: st.DataObject) -> None:
            key = data.draw(st.sampled_from(self.keys))
            before = self.store.balances()
            with pytest.raises(Crash), self.store.tx() as s:
                self.store._post(
                    s,
                    ledger.mint(
                        f"half:{next(_ids)}",
                        ledger.consumer_account(key),
                        MICRO,
                        Cause("deposit", "crash"),
                    ),
                )
                raise Crash
            assert self.store.balances() == before

        @precondition(lambda self: self.posted)
        @rule(data=st.data())
        def replay(self, data: st.DataObject) -> None:
            entry = data.draw(st.sampled_from(self.posted))
            before = self.store.balances()
            assert self.store.post(entry) is False
            assert self.store.balances() == before

        @invariant()
        def books_balance_and_chain_holds(self) -> None:
            balances = self.store.balances()
            assert sum(balances.values()) == 0
            assert all(v >= 0 for a, v in balances.items() if not ledger.may_go_negative(a))
            for e in self.store.entries(after_seq=self.seen_seq):
                entry = Entry(
                    e["key"],
                    Cause(e["cause"]["kind"], e["cause"]["id"]),
                    tuple(ledger.Posting(p["account"], p["amount"]) for p in e["postings"]),
                    e["memo"],
                )
                assert e["prev_hash"] == self.prev_hash
                assert ledger.chain_hash(self.prev_hash, entry) == e["hash"]
                for p in entry.postings:
                    self.sums[p.account] = self.sums.get(p.account, 0) + p.amount
                self.prev_hash, self.seen_seq = e["hash"], e["seq"]
            assert {a: v for a, v in self.sums.items() if v} == {
                a: v for a, v in balances.items() if v
            }
            mine = {i for i, _ in self.orders}
            for v in self.market.orders():
                if v.id not in mine:
                    continue
                escrow = balances.get(ledger.order_escrow_account(v.id), 0)
                open_ = v.state in (OrderState.OPEN.value, OrderState.ACTIVE.value)
                assert escrow == (v.budget - v.spent if open_ else 0)

    return LedgerMachine


def test_ledger_invariants_hold_under_random_market_histories(database_url: str) -> None:
    machine = make_machine(database_url)
    machine.TestCase.settings = settings(
        max_examples=25,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    machine.TestCase().runTest()
    assert Store(database_url, Clock()).verify_ledger() == []
