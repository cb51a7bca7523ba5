"""SLOs of inference orders (split from service.py): misses noted per accrual window from
the owner's covered requests (docs/market.md, "Reservations"), refunded once settled."""

from __future__ import annotations

from collections.abc import Callable

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.market.store import MarketStore
from idlegrid.coordinator.market.views import OrderView
from idlegrid.core.market.orders import OrderKind, OrderState

ACTIVE = (OrderState.ACTIVE.value,)


class Slos:
    """Accrual windows of inference orders in which a covered request missed the SLO."""

    def __init__(
        self, store: MarketStore, settings: CoordinatorSettings, clock: Callable[[], float]
    ) -> None:
        self.store, self.settings, self.clock = store, settings, clock
        self._misses: dict[str, set[int]] = {}  # order id -> accrual windows with a miss

    def observe(
        self,
        node_id: str,
        order_id: str,
        key_id: str,
        ttft_s: float | None,
        tokens_per_s: float | None,
    ) -> None:
        """One covered request's speed, served by `node_id` for the owner of inference order
        `order_id`: a miss of the order's SLO notes its accrual window for a refund."""
        now = self.clock()
        for view in self.store.orders(key_id=key_id, states=ACTIVE):
            if view.id != order_id or view.kind != OrderKind.INFERENCE.value:
                continue
            if not any(leg["provider"] == node_id for leg in (view.placement or {})["legs"]):
                continue
            res = view.body.get("resources", {})
            slow = (
                ttft_s is not None
                and res.get("max_ttft_ms") is not None
                and (ttft_s * 1000 > res["max_ttft_ms"])
            )
            slow |= (
                tokens_per_s is not None
                and res.get("min_tokens_per_s") is not None
                and (tokens_per_s < res["min_tokens_per_s"])
            )
            if slow:
                window = int((now - (view.started_at or now)) // self.settings.accrual_interval_s)
                self._misses.setdefault(view.id, set()).add(window)

    def refund(self, view: OrderView) -> None:
        """Refund the consumer for every settled accrual window of `view` with a miss."""
        misses = self._misses.get(view.id)
        if not misses or not view.placement or view.started_at is None:
            return
        width = self.settings.accrual_interval_s
        done = int(((view.accrued_until or view.started_at) - view.started_at) // width)
        for window in sorted(w for w in misses if w < done):
            for leg in view.placement["legs"]:
                amount = leg["unit_price"] * leg["devices"] * width // 3600
                cls = leg["offer_id"].split("/", 1)[1]
                self.store.slo_refund(
                    view.id,
                    f"{view.id}:{window}:{leg['provider']}",
                    leg["provider"],
                    cls,
                    int(amount),
                )
            misses.discard(window)
