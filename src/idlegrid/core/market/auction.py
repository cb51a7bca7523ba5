"""The reverse auction: filter the book with reasons, fit, score, place (gangs too). Pure.

The book keeps its offers as numpy columns, so one order filters 10,000 offers with a dozen
vector comparisons instead of 10,000 Python calls; each comparison also counts the offers
it eliminated, which is the "why no match" answer for free.

Score = expected cost ÷ reliability: price × expected runtime (runtime from the offer's
measured speed, discounted while unverified), divided by the chance the work finishes
without being redone. Fit comes first: an order whose model fits a consumer card never
lands on a datacenter or workstation card while a fitting consumer card is free, however
the prices compare (VRAM, not raw speed, decides what a card can do; an H100 serving a
270M model is capacity the market loses for the jobs that need it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from idlegrid.core.assignment import linear_sum_assignment
from idlegrid.core.lease.controls import Columns as LeaseColumns
from idlegrid.core.lease.controls import LeaseAsk, ask_of
from idlegrid.core.lease.controls import columns as lease_columns
from idlegrid.core.lease.controls import masks as lease_masks
from idlegrid.core.ledger import TOKENS_PER_PRICE_UNIT
from idlegrid.core.market.gangs import NO_STAGES, gang_record, one_per_provider, shortfall
from idlegrid.core.market.hardware import BY_NAME, GPUS
from idlegrid.core.market.offers import Offer
from idlegrid.core.market.orders import Order, OrderKind
from idlegrid.core.planner.gang import GangPlan, NoLayout, plan_gang

CONSUMER_MAX_VRAM_GB = 32.0  # the largest consumer card (RTX 5090)
BIG_TIERS = frozenset({"datacenter", "workstation"})
UNVERIFIED_SPEED = 0.8  # claimed speed counts at 80% until a hardware proof backs it
TRAINING_MFU = 0.35  # share of datasheet FLOP/s a training job gets, for runtime estimates
GANG_STARTS = 8  # first choices tried when assembling a multi-provider gang
GANG_PARTNERS = 8  # per first choice, second members tried for a planned (training) gang
OVERSIZE = 1e15  # µcr: more than any real score, so fit always decides before price
INFEASIBLE = 1e30

Quote = Callable[[Offer, Order], "int | None"]
_MODEL_IDX = {g.name: i for i, g in enumerate(GPUS)}


@dataclass(frozen=True)
class Leg:
    """Devices of one offer that an order holds."""

    offer_id: str
    provider: str
    devices: int
    unit_price: int  # µcr per device-hour, or per 1M output tokens (batch)


@dataclass(frozen=True)
class Placement:
    """Where an order runs, what it is expected to cost and why it won."""

    order_id: str
    legs: tuple[Leg, ...]
    cost: int  # µcr, expected, at the quoted prices
    score: float  # cost ÷ reliability: what the auction minimised
    runtime_h: float
    oversized: bool  # a big card, because no fitting consumer card was free
    candidates: int  # offers that passed every filter
    gang: dict[str, Any] | None = None  # a planned gang's layout and members (gangs.py)

    @property
    def providers(self) -> list[str]:
        """Distinct providers of the placement."""
        return sorted({leg.provider for leg in self.legs})

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as the API and `idlegrid explain` show it."""
        out = {
            "legs": [leg.__dict__ for leg in self.legs],
            "cost": self.cost,
            "score": self.score,
            "runtime_h": self.runtime_h,
            "oversized": self.oversized,
            "candidates": self.candidates,
        }
        if self.gang is not None:
            out["gang"] = self.gang
        return out


@dataclass(frozen=True)
class Elimination:
    """One constraint's effect: how many offers it removed, how many were left."""

    constraint: str
    eliminated: int
    remaining: int


@dataclass(frozen=True)
class Unmatched:
    """An order that found no placement, with every constraint that narrowed the book."""

    order_id: str
    reasons: tuple[Elimination, ...]

    @property
    def decisive(self) -> str:
        """The constraint that removed the last offers."""
        last = [r for r in self.reasons if r.remaining == 0]
        return (
            last[0].constraint
            if last
            else (self.reasons[-1].constraint if self.reasons else "empty book")
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form: machine-readable reasons."""
        return {"decisive": self.decisive, "reasons": [r.__dict__ for r in self.reasons]}


@dataclass(frozen=True)
class _Eval:
    """The offers left for one order, with their unit price, runtime, score and fit."""

    ids: np.ndarray
    unit: np.ndarray
    runtime: np.ndarray
    score: np.ndarray
    oversized: np.ndarray
    reasons: tuple[Elimination, ...]
    before_price: int = 0  # a gang's distinct providers that passed all but max_price


class Book:
    """Offers as columns, with the free device count of each, matched one order at a time."""

    def __init__(
        self,
        offers: Sequence[Offer],
        links: Mapping[frozenset[str], float] | None = None,
        latency: Mapping[frozenset[str], float] | None = None,
    ) -> None:
        self.offers = list(offers)
        self.links = dict(links or {})  # {provider a, provider b} -> measured Gbit/s
        self.latency = dict(latency or {})  # {provider a, provider b} -> ms (absent: 0)
        self.index = {o.id: i for i, o in enumerate(self.offers)}
        n = len(self.offers)
        self.regions = sorted({o.hardware.region for o in self.offers})
        region_idx = {r: i for i, r in enumerate(self.regions)}
        col = np.array
        self.model = col([_MODEL_IDX[o.device.model] for o in self.offers], dtype=np.int32)
        self.vram = col(
            [o.device.vram_gb or BY_NAME[o.device.model].vram_gb for o in self.offers],
            dtype=np.float64,
        )
        self.big = col([BY_NAME[o.device.model].tier in BIG_TIERS for o in self.offers], dtype=bool)
        self.free = col([o.device.count for o in self.offers], dtype=np.int64)
        self.cpus = col([o.hardware.cpus for o in self.offers], dtype=np.float64)
        self.ram = col([o.hardware.ram_gb for o in self.offers], dtype=np.float64)
        self.reliability = col([o.hardware.reliability for o in self.offers], dtype=np.float64)
        self.verified = col([o.hardware.verified for o in self.offers], dtype=bool)
        self.region = col([region_idx[o.hardware.region] for o in self.offers], dtype=np.int32)
        self.price_h = col([o.device_hour for o in self.offers], dtype=np.int64)
        self.plugin = col([o.plugin is not None for o in self.offers], dtype=bool)
        self.staked = col([o.staked for o in self.offers], dtype=bool)
        self.provider = col([o.provider for o in self.offers], dtype=object)
        # What each offer's provider has leased (cpus, ram_gb, disk_gb): its total controls.
        self.leased = np.zeros((n, 3), dtype=np.float64)
        self._lease_cols: LeaseColumns | None = None
        speed = [
            o.hardware.matmul_tflops or BY_NAME[o.device.model].fp16_tflops for o in self.offers
        ]
        self.tflops = col(speed, dtype=np.float64) * np.where(self.verified, 1.0, UNVERIFIED_SPEED)
        # Per model, full-length columns: token prices and measured speed (0 = not served).
        self._by_model: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for i, o in enumerate(self.offers):
            for m, p in o.model_prices.items():
                if m not in self._by_model:
                    self._by_model[m] = (
                        np.zeros(n, dtype=bool),
                        np.zeros(n, dtype=np.int64),
                        np.zeros(n, dtype=np.float64),
                    )
                served, out, tps = self._by_model[m]
                served[i], out[i] = True, p.output
                tps[i] = o.hardware.tokens_per_s.get(m, 0.0)
        discount = np.where(self.verified, 1.0, UNVERIFIED_SPEED)
        for _, _, tps in self._by_model.values():
            tps *= discount
        self._none = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.offers)

    # ---- matching -------------------------------------------------------------------

    def match(self, order: Order, quote: Quote | None = None) -> Placement | Unmatched:
        """The best placement for `order` on the free capacity, or the reasons there is none."""
        ev = self._evaluate(order, quote)
        if isinstance(ev, Unmatched):
            return ev
        count = 1 if order.kind is OrderKind.BATCH else order.devices
        whole = self.free[ev.ids] >= count
        if whole.any() and not one_per_provider(order):
            # Fit first, then the score.
            fitting = whole & ~ev.oversized
            pool = fitting if fitting.any() else whole
            best = int(np.argmin(np.where(pool, ev.score, np.inf)))
            return self._placement(
                order,
                [(int(ev.ids[best]), count, int(ev.unit[best]))],
                float(ev.runtime[best]),
                bool(ev.oversized[best]),
                float(ev.score[best]) * count,
                len(ev.ids),
            )
        return self._gang(order, ev)

    def costs(self, order: Order, quote: Quote | None = None) -> np.ndarray:
        """Per offer, what one device of it costs `order` in the auction's terms; inf if unfit.

        Fit is lexicographic: an oversized card costs OVERSIZE more than any fitting one.
        Capacity is ignored, so this is the row of the offline assignment problem.
        """
        out = np.full(len(self), np.inf)
        ev = self._evaluate(order, quote, capacity=False)
        if not isinstance(ev, Unmatched):
            out[ev.ids] = ev.score + OVERSIZE * ev.oversized
        return out

    def clear(
        self, orders: Sequence[Order], quote: Quote | None = None
    ) -> list[Placement | Unmatched]:
        """Place a batch of orders together: gangs first, then one exact assignment.

        Greedy one-at-a-time placement hands the cheapest card to whoever comes first; a
        batch solved as an assignment (`core/assignment.py`) gives it to the order that
        saves most. Only each order's k cheapest free devices can be in an optimal answer
        for k orders, so the problem stays small.
        """
        results: dict[str, Placement | Unmatched] = {}
        singles: list[tuple[Order, _Eval]] = []
        for o in orders:
            if o.devices > 1 and o.kind is not OrderKind.BATCH:
                r = self.match(o, quote)
                if isinstance(r, Placement):
                    self.take(r, lease_of(o))
                results[o.id] = r
                continue
            ev = self._evaluate(o, quote)
            if isinstance(ev, Unmatched):
                results[o.id] = ev
            else:
                singles.append((o, ev))
        k = len(singles)
        if k:
            slot_of: dict[int, list[int]] = {}
            for _, ev in singles:
                c = ev.score + OVERSIZE * ev.oversized
                top = ev.ids[np.argsort(c)[:k]] if len(c) > k else ev.ids
                for row in top:
                    slot_of.setdefault(int(row), [])
            slots: list[int] = []
            for row in slot_of:
                n = int(min(self.free[row], k))
                slot_of[row] = list(range(len(slots), len(slots) + n))
                slots += [row] * n
            cost = np.full((k, len(slots)), INFEASIBLE)
            for i, (_, ev) in enumerate(singles):
                c = ev.score + OVERSIZE * ev.oversized
                for j, row in enumerate(ev.ids):
                    cols = slot_of.get(int(row))
                    if cols:
                        cost[i, cols] = c[j]
            rows, assigned = linear_sum_assignment(cost)
            chosen = dict(zip(rows.tolist(), assigned.tolist(), strict=True))
            for i, (o, ev) in enumerate(singles):
                col = chosen.get(i)
                if col is None or cost[i, col] >= INFEASIBLE:
                    results[o.id] = Unmatched(
                        o.id,
                        (
                            *ev.reasons,
                            Elimination("capacity (taken by this batch)", len(ev.ids), 0),
                        ),
                    )
                    continue
                j = int(np.flatnonzero(ev.ids == slots[col])[0])
                p = self._placement(
                    o,
                    [(slots[col], 1, int(ev.unit[j]))],
                    float(ev.runtime[j]),
                    bool(ev.oversized[j]),
                    float(ev.score[j]),
                    len(ev.ids),
                )
                self.take(p, lease_of(o))
                results[o.id] = p
        return [results[o.id] for o in orders]

    def _evaluate(
        self, order: Order, quote: Quote | None, capacity: bool = True
    ) -> _Eval | Unmatched:
        """Filter the book for `order`, then price, time and score what is left."""
        spec = order.spec
        reasons: list[Elimination] = []
        # One boolean mask over the whole book, narrowed constraint by constraint; full-length
        # columns avoid a gather per step, which is most of the cost at 10,000 offers.
        tps = out_price = None
        if order.model is not None and order.kind in (OrderKind.INFERENCE, OrderKind.BATCH):
            served, out_price, tps = self._by_model.get(order.model, (self._none, None, None))
            mask = served.copy()
        else:
            mask = np.ones(len(self), dtype=bool)
        left = [len(self)]

        def keep(name: str, cond: np.ndarray) -> bool:
            mask[...] &= cond
            kept = int(np.count_nonzero(mask))
            if kept < left[0]:
                reasons.append(Elimination(name, left[0] - kept, kept))
                left[0] = kept
            return kept > 0

        ok = keep("model", mask)
        if ok and spec.accelerators is not None:
            lookup = np.zeros(len(GPUS), dtype=bool)
            lookup[[_MODEL_IDX[a] for a in spec.accelerators]] = True
            ok = keep("accelerators", lookup[self.model])
        if ok and order.vram_need_gb:
            ok = keep("vram_gb", self.vram >= order.vram_need_gb)
        if ok and spec.vram_gb is not None:
            ok = keep("vram_gb", spec.vram_gb.test(self.vram))
        if not ok and order.job is not None and reasons and reasons[-1].constraint == "vram_gb":
            reasons.append(Elimination(NO_STAGES, 0, 0))
        if ok and spec.cpus is not None:
            ok = keep("cpus", spec.cpus.test(self.cpus))
        if ok and spec.ram_gb is not None:
            ok = keep("ram_gb", spec.ram_gb.test(self.ram))
        if ok and spec.reliability is not None:
            ok = keep("reliability", spec.reliability.test(self.reliability))
        if ok and (spec.region.only is not None or spec.region.exclude):
            lookup = np.array([spec.region.allows(r) for r in self.regions], dtype=bool)
            ok = keep("region", lookup[self.region])
        if ok and spec.verified:
            ok = keep("verified", self.verified)
        if ok and spec.min_tokens_per_s is not None:
            ok = keep(
                "min_tokens_per_s", tps >= spec.min_tokens_per_s if tps is not None else self._none
            )
        if ok and order.kind is OrderKind.LEASE:
            if self._lease_cols is None:  # built on the first lease order only
                models = [o.device.model for o in self.offers]
                self._lease_cols = lease_columns([o.lease for o in self.offers], models)
            for name, allowed in lease_masks(self._lease_cols, self.leased, ask_of(spec)):
                if ok:
                    ok = keep(name, allowed)
        if ok and order.avoid:
            ok = keep("excluded from the job", ~np.isin(self.provider, sorted(order.avoid)))
        if ok:
            ok = keep("stake", self.staked)
        if ok and capacity:
            ok = keep("capacity", self.free > 0)
        if not ok:
            return Unmatched(order.id, tuple(reasons))
        batch = order.kind is OrderKind.BATCH
        unit_all = out_price if batch else self.price_h
        plug_rows = np.flatnonzero(mask & self.plugin)
        if len(plug_rows):
            unit_all = unit_all.copy()  # type: ignore[union-attr]
            sits_out = np.zeros(len(self), dtype=bool)
            for row in plug_rows:
                quoted = quote(self.offers[int(row)], order) if quote else None
                if quoted is None or quoted < 0:
                    sits_out[row] = True
                else:
                    unit_all[row] = quoted
            if not keep("pricing plug-in", ~sits_out):
                return Unmatched(order.id, tuple(reasons))
        before_price = len(set(self.provider[mask].tolist())) if one_per_provider(order) else 0
        if not keep("max_price", np.asarray(unit_all <= order.max_price)):  # type: ignore[operator]
            if before_price >= order.devices:  # enough providers, all over the ceiling
                reasons.append(
                    Elimination(
                        f"gang: over the ceiling: {order.devices} providers needed, 0 of "
                        f"{before_price} fitting ones within max_price",
                        0,
                        0,
                    )
                )
            return Unmatched(order.id, tuple(reasons))
        ids = np.flatnonzero(mask)
        unit = unit_all[ids]  # type: ignore[index]
        runtime = self._runtime(order, ids, tps[ids] if tps is not None else None)
        per_device_cost = unit * (order.tokens / TOKENS_PER_PRICE_UNIT) if batch else unit * runtime
        score = per_device_cost / np.maximum(self.reliability[ids], 0.01)
        oversized = self.big[ids] & (order.vram_need_gb <= CONSUMER_MAX_VRAM_GB)
        return _Eval(ids, unit, runtime, score, oversized, tuple(reasons), before_price)

    def _runtime(self, order: Order, ids: np.ndarray, tps: np.ndarray | None) -> np.ndarray:
        if order.kind is OrderKind.BATCH and tps is not None:
            out: np.ndarray = order.tokens / np.maximum(tps, 1e-9) / 3600.0
            return out
        if order.kind is OrderKind.TRAINING and order.work_pflop:
            rate = self.tflops[ids] * order.devices * TRAINING_MFU * 3600.0 / 1000.0  # PFLOP/h
            needed: np.ndarray = order.work_pflop / np.maximum(rate, 1e-9)
            return needed
        return np.full(len(ids), order.hours)

    def _gang(self, order: Order, ev: _Eval) -> Placement | Unmatched:
        """Devices from several providers, every pair linked at `min_link_gbps` or better.

        Each of the best few offers starts a gang, filled greedily. An order without a
        `gang_shape` takes the first gang found (from the best start); a training job's
        gang also tries each start with each of its best few linked partners, and takes
        the gang the planner's cost model finds cheapest over its links (for two members
        and a book of at most GANG_STARTS offers that is every pair)."""
        ids, runtime, score, oversized = ev.ids, ev.runtime, ev.score, ev.oversized
        order_ix = np.lexsort((score, oversized))
        need = order.devices
        spread = one_per_provider(order)
        found: list[tuple[bool, float, float, list[tuple[int, int, int]], GangPlan]] = []
        no_layout = ""
        seen: set[frozenset[int]] = set()
        for seed in self._seeds(order, ev, order_ix):
            legs = self._fill(order, ev, np.concatenate((seed, order_ix)), spread)
            if legs is None or (key := frozenset(leg[0] for leg in legs)) in seen:
                continue
            seen.add(key)
            at = [int(np.flatnonzero(ids == leg[0])[0]) for leg in legs]
            big = bool(any(oversized[k] for k in at))
            if not order.gang_shape:
                rt = float(max(runtime[k] for k in at))
                sc = float(sum(score[k] * leg[1] for k, leg in zip(at, legs, strict=True)))
                return self._placement(order, legs, rt, big, sc, len(ids))
            planned = self._planned(order, legs)
            if isinstance(planned, NoLayout):
                no_layout = f"gang: {planned.reason}"
                continue
            found.append((big, planned[1], planned[0], legs, planned[2]))
        if found:  # fit first, then the planned cost
            big, sc, rt, legs, plan = min(found, key=lambda f: (f[0], f[1]))
            ranks = [leg[0] for leg in legs for _ in range(leg[1])]
            record = gang_record(
                plan,
                [self.offers[r].provider for r in ranks],
                [self.offers[r].id for r in ranks],
                [u for _, n, u in legs for _ in range(n)],
            )
            return self._placement(order, legs, rt, big, sc, len(ids), record)
        why = no_layout or shortfall(
            need,
            spread,
            order.spec.min_link_gbps,
            sorted(set(self.provider[ids].tolist())),
            int(self.free[ids].sum()),
            ev.before_price,
            lambda a, b: self.links.get(frozenset((a, b))),
        )
        return Unmatched(order.id, (*ev.reasons, Elimination(why, len(ids), 0)))

    def _seeds(self, order: Order, ev: _Eval, order_ix: np.ndarray) -> list[np.ndarray]:
        """First members to grow gangs from: each of the best offers, and for a planned
        gang each of those with each of its best linked partners."""
        out: list[np.ndarray] = []
        for start in order_ix[:GANG_STARTS]:
            mine = self.offers[int(ev.ids[start])].provider
            partners = 0
            if order.gang_shape:
                for j in order_ix:
                    prov = self.offers[int(ev.ids[j])].provider
                    if prov != mine and self._linked(mine, prov, order.spec.min_link_gbps):
                        out.append(np.array([start, j]))
                        partners += 1
                        if partners == GANG_PARTNERS:
                            break
            if not partners:
                out.append(np.array([start]))
        return out

    def _fill(
        self, order: Order, ev: _Eval, candidates: np.ndarray, spread: bool
    ) -> list[tuple[int, int, int]] | None:
        """Legs of a gang taken greedily from `candidates` (positions in `ev`, best first),
        every pair of providers linked; None if it cannot be completed."""
        legs: list[tuple[int, int, int]] = []
        chosen: list[str] = []
        left = order.devices
        for j in candidates:
            row = int(ev.ids[j])
            if any(leg[0] == row for leg in legs):
                continue
            prov = self.offers[row].provider
            if spread and prov in chosen:
                continue
            if not all(self._linked(prov, p, order.spec.min_link_gbps) for p in chosen):
                continue
            take = int(min(self.free[row], left, 1 if spread else left))
            legs.append((row, take, int(ev.unit[j])))
            chosen.append(prov)
            left -= take
            if left == 0:
                return legs
        return None

    def _planned(
        self, order: Order, legs: list[tuple[int, int, int]]
    ) -> tuple[float, float, GangPlan] | NoLayout:
        """(runtime h, score, plan) of a gang, one member per leg device, by the planner's
        cost model over the gang's links: the layout (stages × replicas, up to the order's
        `max_stages`) with the lowest step time."""
        shape = dict(order.gang_shape)
        ranks = [leg[0] for leg in legs for _ in range(leg[1])]
        provs = [self.offers[r].provider for r in ranks]
        bw = [
            [self.links.get(frozenset((a, b)), 0.0) if a != b else 1e6 for b in provs]
            for a in provs
        ]
        lat = [[self.latency.get(frozenset((a, b)), 0.0) for b in provs] for a in provs]
        stages = int(shape.get("max_stages", 1))
        plan = plan_gang(
            shape,
            [float(self.tflops[r]) for r in ranks],
            bw,
            lat,
            [float(self.vram[r]) for r in ranks] if stages > 1 else None,
            stages,
        )
        if isinstance(plan, NoLayout):
            return plan
        rt = plan.step_s * float(shape["steps"]) / 3600.0
        sc = sum(rt * u * n / max(float(self.reliability[r]), 0.01) for r, n, u in legs)
        return rt, float(sc), plan

    def _linked(self, a: str, b: str, gbps: float) -> bool:
        return a == b or self.links.get(frozenset((a, b)), 0.0) >= gbps

    def _placement(
        self,
        order: Order,
        legs: list[tuple[int, int, int]],
        runtime: float,
        oversized: bool,
        score: float,
        candidates: int,
        gang: dict[str, Any] | None = None,
    ) -> Placement:
        if order.kind is OrderKind.BATCH:
            cost = sum(u * order.tokens // TOKENS_PER_PRICE_UNIT for _, _, u in legs)
        else:
            cost = sum(round(u * n * runtime) for _, n, u in legs)
        return Placement(
            order.id,
            tuple(Leg(self.offers[r].id, self.offers[r].provider, n, u) for r, n, u in legs),
            int(cost),
            score,
            runtime,
            oversized,
            candidates,
            gang,
        )

    # ---- capacity -------------------------------------------------------------------

    def take(self, placement: Placement, lease: LeaseAsk | None = None) -> None:
        """Mark a placement's devices busy (offers no longer in the book are skipped), and
        what a `lease` takes as leased on its providers."""
        for leg in placement.legs:
            i = self.index.get(leg.offer_id)
            if i is not None:
                self.free[i] = max(0, self.free[i] - leg.devices)
        self._lease(placement, lease, 1.0)

    def release(self, placement: Placement, lease: LeaseAsk | None = None) -> None:
        """Give a placement's devices (and a `lease`'s share of its providers) back."""
        for leg in placement.legs:
            i = self.index.get(leg.offer_id)
            if i is not None:
                self.free[i] = min(self.free[i] + leg.devices, self.offers[i].device.count)
        self._lease(placement, lease, -1.0)

    def _lease(self, placement: Placement, lease: LeaseAsk | None, sign: float) -> None:
        if lease is None or not len(self):
            return
        rows = np.isin(self.provider, placement.providers)
        self.leased[rows] = np.maximum(self.leased[rows] + sign * np.array(lease.amounts()), 0.0)


def lease_of(order: Order) -> LeaseAsk | None:
    """What a lease order takes of its provider (its total controls); None for other kinds."""
    return ask_of(order.spec) if order.kind is OrderKind.LEASE else None
