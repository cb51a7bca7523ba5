"""The market in the coordinator: the live book, order submission, ticks that settle.

The book is rebuilt from the store when supply changes (a node registers, stakes, dies)
and kept in memory otherwise; placements take capacity from it at once, so matching an
order costs microseconds plus one transaction (the order row and its prepayment).
"""

from __future__ import annotations

import importlib
import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.events import AnswerFinished, LiveNodesChanged, NodeRegistered
from idlegrid.coordinator.market.leasemoney import LeaseMoney
from idlegrid.coordinator.market.slo import Slos
from idlegrid.coordinator.market.store import MarketStore
from idlegrid.coordinator.market.views import OrderView
from idlegrid.coordinator.views import NodeView
from idlegrid.core.lease.controls import LeaseAsk, ask_of, parse_controls
from idlegrid.core.ledger import MICRO
from idlegrid.core.market.auction import Book, Placement, Unmatched, lease_of
from idlegrid.core.market.hardware import BY_NAME, Device, Hardware
from idlegrid.core.market.offers import PLUGIN_TIMEOUT_S, Offer
from idlegrid.core.market.orders import Order, OrderKind, OrderState, parse_order
from idlegrid.core.market.plugins import is_pricing_plugin
from idlegrid.core.market.spec import parse_spec
from idlegrid.core.reservations import Reservation, of_order
from idlegrid.errors import Conflict, InvalidRequest

log = logging.getLogger(__name__)
ACTIVE = (OrderState.ACTIVE.value,)
MAX_BATCH = 1000
RELIABILITY_REFRESH_S = 30.0


class Market:
    """Order book, matching and settlement ticks for one coordinator."""

    def __init__(
        self,
        ctx: Context,
        nodes: Callable[[], Mapping[str, NodeView]],
        verified: Callable[[], dict[str, set[str]]],
        held: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = MarketStore(ctx.store)
        self.leasemoney = LeaseMoney(ctx.store)
        # The node cache (nodes domain) and the device classes whose hardware proofs passed
        # (trust): what the book is built from besides this domain's own rows.
        self._nodes = nodes
        self._verified = verified
        # Providers whose work no independent verifier has checked for a whole audit
        # window (trust): their accruals are not paid out.
        self._held = held
        self.book = Book([])
        self._dirty = True
        self._building = False
        self._lock = threading.Lock()  # the book is used from request threads and the tick
        self._plugins: dict[str, Callable[..., Any]] = {}
        self._plugins_stuck: set[str] = set()  # plug-ins with a timed-out call still running
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pricing")
        self._pending: list[Any] = []  # orders waiting for the next group commit
        self._pending_lock = threading.Lock()
        self._commit_turn = threading.Lock()
        self.slos = Slos(self.store, ctx.settings, ctx.clock)
        self._last_payout = ctx.clock()
        # Measured reliability per node, shared with the gateway's per-request routing.
        self.reliability: dict[str, float] = {}
        # Nodes with any stake posted: only they set a request's escrow price (routing).
        self.staked_nodes: frozenset[str] = frozenset()
        # Nodes whose stake reaches `inference_stake`: only they serve paid inference.
        self.inference_staked: frozenset[str] = frozenset()
        # Node -> stake posted per device class, µcr (heartbeats tell agents, to top up).
        self.stakes: dict[str, dict[str, int]] = {}
        # Active inference orders, for per-request routing (core/reservations.py).
        self.reservations: tuple[Reservation, ...] = ()
        self._reliability_at = 0.0
        self._lost: set[str] = set()
        self._first_tick = True
        # Set by compose(): whether an order is a running lease's, and how to end that lease
        # (its cancel goes through the leases domain, which bills the running seconds).
        self.lease_of: Callable[[str, str | None], bool] = lambda order_id, key_id: False
        self.end_lease: Callable[[str, str | None], object] = lambda order_id, key_id: None
        self.lease_ordered: Callable[[], None] = lambda: None

    # ---- supply --------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Supply changed: rebuild the book before the next match."""
        self._dirty = True

    def _rebuild(self) -> None:
        self._building = True  # routing that looks meanwhile waits for these sets
        try:
            self._rebuild_sets()
        finally:
            self._building = False

    def _rebuild_sets(self) -> None:
        # Cleared first: a change that lands while we read (a stake, a registration) marks
        # the book dirty again instead of being lost when this rebuild finishes.
        self._dirty = False
        now = self.ctx.clock()
        supply = self.store.supply()
        self.reliability = {n: s["reliability"] for n, s in supply.items()}
        self._reliability_at = now
        nodes = self._nodes()
        verified = self._verified()
        offers: list[Offer] = []
        links: dict[frozenset[str], float] = {}
        latency: dict[frozenset[str], float] = {}
        self.staked_nodes = frozenset(
            n for n, sup in supply.items() if any(v > 0 for v in sup["stakes"].values())
        )
        self.inference_staked = frozenset(
            n
            for n, sup in supply.items()
            if sum(sup["stakes"].values()) >= self.settings.inference_stake
        )
        self.stakes = {n: dict(sup["stakes"]) for n, sup in supply.items()}
        for node_id, sup in supply.items():
            node = nodes.get(node_id)
            if (
                node is None
                or not node.live_since(now - self.settings.node_timeout_s)
                or (node_id in self.ctx.ejected)
            ):
                continue
            for peer, gbps in sup["links"].items():
                key = frozenset((node_id, peer))
                links[key] = max(links.get(key, 0.0), float(gbps))
            for peer, ms in sup.get("latency_ms", {}).items():
                # Both ends may report: the slower figure, so a plan is never optimistic.
                key = frozenset((node_id, peer))
                latency[key] = max(latency.get(key, 0.0), float(ms))
            for d in sup["devices"]:
                dev = Device(
                    d["model"], d["count"], d["vram_gb"], vendor=BY_NAME[d["model"]].vendor
                )
                hw = Hardware(
                    provider=node_id,
                    region=sup["region"],
                    devices=(dev,),
                    cpus=int(node.hardware.get("cpu_logical") or 1),
                    ram_gb=(node.hardware.get("ram_bytes") or 0) / 1e9,
                    tokens_per_s={m: node.decode_tps for m in node.offers},
                    reliability=sup["reliability"],
                    verified=d["model"] in verified.get(node_id, ()),
                )
                staked = sup["stakes"].get(d["model"], 0) >= (
                    self.settings.stake_per_device * d["count"]
                )
                offers.append(
                    Offer(
                        f"{node_id}/{d['model']}",
                        hw,
                        dev,
                        d["price_h"],
                        dict(node.offers),
                        d.get("plugin"),
                        staked,
                        parse_controls(sup.get("lease")),
                    )
                )
        book = Book(offers, links, latency)
        for view in self.store.orders(states=ACTIVE):
            if view.placement:
                book.take(_placement(view), _ask(view))
        self.book = book

    def nodes_lost(self, node_ids: frozenset[str]) -> None:
        """Providers that stopped answering: their orders are placed again on the next tick."""
        self._lost |= node_ids

    def on_register(self, event: NodeRegistered) -> None:
        """A node (re)registered: record where it is and the devices it sells."""
        body = event.body
        self.store.set_supply(
            event.node_id,
            body.get("region", "local"),
            body.get("links") or {},
            body.get("devices") or [],
            body.get("link_latency_ms") or {},
            body.get("lease"),
        )
        self.invalidate()

    def on_live_change(self, event: LiveNodesChanged) -> None:
        """Live nodes changed: rebuild the book; orders on lost ones are placed again."""
        self.invalidate()
        self.nodes_lost(event.lost)

    def on_answer(self, event: AnswerFinished) -> None:
        """What the consumer saw of an answer, for the SLO of the reservation that covered
        it: only the order owner's own requests served under it count (docs/market.md)."""
        tag = event.task.payload.get("reservation")
        if not event.part and tag and event.node_id in tag.get("nodes", ()):
            self.slos.observe(
                event.node_id, str(tag["order"]), event.task.key_id, event.ttft_s, event.tps
            )

    def _refresh_reliability(self, now: float) -> None:
        """Re-read success ratios into the gateway's map and the book, without a rebuild."""
        self.reliability = self.store.reliability()
        self._reliability_at = now
        with self._lock:
            book = self.book
            for i, offer in enumerate(book.offers):
                book.reliability[i] = self.reliability.get(offer.provider, book.reliability[i])

    @property
    def stale(self) -> bool:
        """Whether supply or stakes changed since the book and routing sets were built, or
        a rebuild is under way (its sets are not assigned yet: `current_book` waits for it)."""
        return self._dirty or self._building

    def current_book(self) -> Book:
        """The book, rebuilt first if supply changed."""
        with self._lock:
            if self._dirty:
                self._rebuild()
            return self.book

    # ---- pricing plug-ins ------------------------------------------------------------------

    def _plugin(self, path: str) -> Callable[..., Any] | None:
        allowed = [p for p in self.settings.pricing_plugins.split(",") if p]
        module, _, fn = path.partition(":")
        if not fn or not any(module == a or module.startswith(a + ".") for a in allowed):
            return None  # only modules the operator allowed run inside the coordinator
        if path not in self._plugins:
            obj = getattr(importlib.import_module(module), fn, None)
            if obj is None or not is_pricing_plugin(obj):
                return None  # and in them only functions marked @pricing_plugin
            self._plugins[path] = obj
        return self._plugins[path]

    def quote(self, offer: Offer, order: Order) -> int | None:
        """Ask an offer's plug-in for a price within 100 ms; None sits the offer out."""
        try:
            path = offer.plugin or ""
            fn = self._plugin(path)
            if fn is None:
                return None
            with self._pending_lock:
                if path in self._plugins_stuck:
                    # Its last call has not returned: threads cannot be stopped, so a hung
                    # plug-in holds one pool thread at most, and sits out until it returns.
                    return None
            future = self._pool.submit(
                fn,
                order.to_dict(),
                {
                    "offer": offer.id,
                    "device": offer.device.model,
                    "count": offer.device.count,
                    "region": offer.hardware.region,
                    "price_h": offer.device_hour / MICRO,
                },
            )
            try:
                credits = future.result(timeout=PLUGIN_TIMEOUT_S)
            except FutureTimeout:
                with self._pending_lock:
                    self._plugins_stuck.add(path)
                future.add_done_callback(lambda _f: self._unstick(path))
                raise
            if (
                isinstance(credits, bool)
                or not isinstance(credits, int | float)
                or not (0 <= credits <= 10_000)
            ):
                return None
            return round(credits * MICRO)
        except FutureTimeout:
            log.warning("pricing plug-in %s timed out; offer %s sits out", offer.plugin, offer.id)
            return None
        except Exception:
            log.warning(
                "pricing plug-in %s failed; offer %s sits out",
                offer.plugin,
                offer.id,
                exc_info=True,
            )
            return None

    def _unstick(self, path: str) -> None:
        with self._pending_lock:
            self._plugins_stuck.discard(path)

    # ---- orders ----------------------------------------------------------------------------

    def parse(self, raw: Any, order_id: str | None = None, internal: bool = False) -> Order:
        """An order from a request body, with the model's memory need from the catalog;
        `internal` for bodies the coordinator wrote (a training job's placement)."""
        from idlegrid.engines.models import memory_gb

        model = raw.get("model") if isinstance(raw, dict) else None
        return parse_order(
            raw,
            order_id=order_id,
            vram_need_gb=memory_gb(model) if isinstance(model, str) else 0.0,
            internal=internal,
        )

    def submit(self, key_id: str, raw: Any, internal: bool = False) -> OrderView:
        """Match an order and record it with its prepayment; unmatched orders wait, prepaid.
        `internal`: the training domain placing a job (its order names the job)."""
        if isinstance(raw, dict) and "id" not in raw:
            raw = {**raw, "id": "ord_" + secrets.token_hex(8)}
        order = self.parse(raw, internal=internal)
        with self._lock:
            if self._dirty:
                self._rebuild()
            result = self.book.match(order, self.quote)
            if isinstance(result, Placement):
                self.book.take(result, lease_of(order))  # held; given back if recording fails
        placement = result.to_dict() if isinstance(result, Placement) else None
        reasons = result.to_dict() if isinstance(result, Unmatched) else None
        try:
            view = self._record(order, key_id, placement, reasons)
        except Exception:
            if isinstance(result, Placement):
                with self._lock:
                    self.book.release(result, lease_of(order))
            raise
        self.ctx.metrics.orders.labels(order.kind.value, "matched" if placement else "open").inc()
        self._reserve([view])
        if order.kind.value == "lease":
            self.lease_ordered()  # the leases domain adopts it on the next pass: make it now
        return view

    def _record(
        self,
        order: Order,
        key_id: str,
        placement: dict[str, Any] | None,
        reasons: dict[str, Any] | None,
    ) -> OrderView:
        """Write one order, riding along with whatever other orders are waiting (group commit).

        Whoever takes the commit turn writes every pending order in one transaction; the
        others find theirs done. Under load that is one commit per batch, not per order.
        """
        done: Future[OrderView] = Future()
        with self._pending_lock:
            self._pending.append((order, key_id, placement, reasons, done))
        with self._commit_turn:
            with self._pending_lock:
                batch, self._pending = self._pending, []
            results: list[OrderView | Exception]
            if len(batch) == 1:
                order1, key1, placement1, reasons1, _ = batch[0]
                try:  # alone: a plain transaction, no savepoint
                    results = [
                        self.store.create_order(
                            order1, key1, order1.to_dict(), placement1, reasons1
                        )
                    ]
                except Exception as exc:
                    results = [exc]
            elif batch:
                try:
                    results = list(self.store.create_orders_each([b[:4] for b in batch]))
                except Exception as exc:
                    results = [exc] * len(batch)
            else:
                results = []
            for (*_, fut), res in zip(batch, results, strict=True):
                if isinstance(res, Exception):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
        return done.result()

    def submit_many(self, key_id: str, raws: list[Any]) -> list[OrderView]:
        """Clear a batch of orders together (one exact assignment), all recorded or none."""
        if not isinstance(raws, list) or not 1 <= len(raws) <= MAX_BATCH:
            raise InvalidRequest(f"orders: a list of 1 to {MAX_BATCH} orders", param="orders")
        orders = []
        for i, raw in enumerate(raws):
            if isinstance(raw, dict) and "id" not in raw:
                raw = {**raw, "id": "ord_" + secrets.token_hex(8)}
            try:
                orders.append(self.parse(raw))
            except InvalidRequest as exc:
                raise InvalidRequest(
                    f"orders[{i}].{exc.message}", param=f"orders[{i}].{exc.param}"
                ) from exc
        if len({o.id for o in orders}) < len(orders):
            raise InvalidRequest("orders: ids repeat within the batch", param="orders")
        with self._lock:
            if self._dirty:
                self._rebuild()
            results = self.book.clear(orders, self.quote)
            try:
                views = self.store.create_orders(
                    [
                        (
                            o,
                            o.to_dict(),
                            r.to_dict() if isinstance(r, Placement) else None,
                            r.to_dict() if isinstance(r, Unmatched) else None,
                        )
                        for o, r in zip(orders, results, strict=True)
                    ],
                    key_id,
                )
            except Exception:
                for o, r in zip(orders, results, strict=True):  # clear() took them; not recorded
                    if isinstance(r, Placement):
                        self.book.release(r, lease_of(o))
                raise
        for o, r in zip(orders, results, strict=True):
            self.ctx.metrics.orders.labels(
                o.kind.value, "matched" if isinstance(r, Placement) else "open"
            ).inc()
        self._reserve(views)
        return views

    def explain(self, order_id: str, key_id: str | None) -> dict[str, Any]:
        """Why an order sits where it does, or why it does not match (tried again now)."""
        view = self.store.get_order(order_id, key_id)
        out: dict[str, Any] = {"order": view.id, "state": view.state}
        if view.placement:
            out["placement"] = view.placement
        if view.state == OrderState.OPEN.value or not view.placement:
            order = self.parse(view.body, internal=True)
            result = self.current_book().match(order, self.quote)
            out["now"] = result.to_dict()
            out["matches_now"] = isinstance(result, Placement)
        if view.reasons:
            out["reasons_at_submission"] = view.reasons
        legs = (view.placement or {}).get("legs", [])
        held = sorted({leg["provider"] for leg in legs} & self._held())
        if held:
            out["payout_held"] = {
                "providers": held,
                "why": "no independent verifier of their kernel family has been live for a "
                f"whole audit window ({self.settings.payout_delay_s:g} s): their accruals "
                "are held, not paid out",
            }
        return out

    def cancel(self, order_id: str, key_id: str | None) -> OrderView:
        """Cancel an order: pay for service so far, refund the rest, free the devices."""
        if self.lease_of(order_id, key_id):
            self.end_lease(order_id, key_id)
            self.invalidate()
            return self.store.get_order(order_id, key_id)
        view = self.store.cancel(order_id, key_id, self.settings.fee_bps)
        self.reservations = tuple(r for r in self.reservations if r.order_id != view.id)
        if view.placement:
            with self._lock:
                self.book.release(_placement(view), _ask(view))
        return view

    def orders_for_node(self, node_id: str) -> list[OrderView]:
        """Active orders that hold a node's devices."""
        return [
            v
            for v in self.store.orders(states=ACTIVE)
            if any(leg["provider"] == node_id for leg in (v.placement or {}).get("legs", []))
        ]

    # ---- the tick --------------------------------------------------------------------------

    def tick(self) -> None:
        """Accrue, complete, re-place orders of lost providers, re-match, expire, pay out."""
        now = self.ctx.clock()
        timeout = self.settings.node_timeout_s
        nodes = self._nodes()
        if self._dirty:
            with self._lock:
                self._rebuild()
        elif now - self._reliability_at > RELIABILITY_REFRESH_S:
            self._refresh_reliability(now)
        lost, self._lost = self._lost, set()
        if lost or self._first_tick:
            # Only when providers went missing (or after a restart): orders on them move.
            self._first_tick = False
            for view in self.store.orders(states=ACTIVE):
                if view.kind == OrderKind.LEASE.value:
                    continue  # a lost lease fails (its files are gone): the leases domain
                legs = (view.placement or {}).get("legs", [])
                gone = [
                    leg["provider"]
                    for leg in legs
                    if (
                        (n := nodes.get(leg["provider"])) is None
                        or not n.present_since(now - timeout)
                    )
                ]
                if gone:
                    served = min(nodes[p].last_seen if p in nodes else now for p in gone)
                    self.store.requeue(view.id, self.settings.fee_bps, served)
                    self.invalidate()
        for view in self.store.orders_due(now - self.settings.accrual_interval_s, now):
            after = self.store.accrue(view.id, self.settings.fee_bps)
            self.slos.refund(after)
            if after.state != OrderState.ACTIVE.value:
                with self._lock:
                    self.book.release(_placement(view), _ask(view))
        waiting = []
        for view in self.store.orders(states=(OrderState.OPEN.value,)):
            if now - view.created_at > self.settings.order_ttl_s:
                self.store.expire(view.id)
            else:
                waiting.append((view, self.parse(view.body, internal=True)))
        if waiting:
            with self._lock:
                if self._dirty:
                    self._rebuild()
                # Oldest first into one assignment: waiting orders compete fairly for what
                # freed up, instead of the first in the list taking the cheapest card.
                results = self.book.clear([o for _, o in waiting], self.quote)
                for (view, order), result in zip(waiting, results, strict=True):
                    if isinstance(result, Placement):
                        try:
                            self.store.place(view.id, order, result.to_dict())
                        except Conflict:
                            self.book.release(result, lease_of(order))  # cancelled meanwhile
                    else:
                        self.store.set_reasons(view.id, result.to_dict())
        self._reserve(self.store.orders(states=ACTIVE), fresh=True)
        if now - self._last_payout >= self.settings.payout_interval_s:
            self.payout()

    def _reserve(self, views: list[OrderView], fresh: bool = False) -> None:
        """Add the reservations these orders make (active, placed inference orders), or
        with `fresh` replace them all (the tick: orders ended, moved or were placed)."""
        new = (
            of_order(v.id, v.key_id, {**v.body, "kind": v.kind}, v.placement, v.ends_at)
            for v in views
            if v.state == OrderState.ACTIVE.value
        )
        made = tuple(r for r in new if r is not None)
        self.reservations = made if fresh else (*self.reservations, *made)

    def extend_lease(self, s: Any, order_id: str, hours: float) -> int:
        """Escrow `hours` more of a lease's worst case, in the lease's transaction."""
        return self.leasemoney.extend_lease(s, order_id, hours)

    def bill_lease(
        self,
        s: Any,
        order_id: str,
        before_s: int,
        now_s: int,
        close: str | None,
        carry: dict[str, Any] | None = None,
    ) -> None:
        """A lease's running seconds, paid in its own transaction (leases domain); `carry`:
        the order of the lease that replaces a lost one, its escrow carried over."""
        self.leasemoney.bill_lease(
            s, order_id, before_s, now_s, self.settings.fee_bps, close, carry
        )
        if close is not None:
            self.invalidate()  # its devices are free again from the next match on

    def payout(self) -> dict[str, int]:
        """Pay out every accrual older than the audit window, as one batch."""
        now = self.ctx.clock()
        self._last_payout = now
        batch = f"{int(now)}-{secrets.token_hex(4)}"
        return self.store.payout(batch, now - self.settings.payout_delay_s, self._held())


def _ask(view: OrderView) -> LeaseAsk | None:
    """What a stored lease order takes of its provider, for the lease total controls."""
    return ask_of(parse_spec(view.body.get("resources"))) if view.kind == "lease" else None


def _placement(view: OrderView) -> Placement:
    """A stored placement back as the core's type (for releasing its capacity)."""
    from idlegrid.core.market.auction import Leg

    p = view.placement or {}
    return Placement(
        view.id,
        tuple(Leg(**leg) for leg in p.get("legs", [])),
        p.get("cost", 0),
        p.get("score", 0.0),
        p.get("runtime_h", 0.0),
        p.get("oversized", False),
        p.get("candidates", 0),
    )
