"""Orders as the market's callers see them, and the errors about them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from idlegrid.coordinator.db.tables import (
    MarketOrder,
)
from idlegrid.core.market.orders import Order, OrderKind, OrderState, order_transition
from idlegrid.errors import Conflict, NotFound

# Outcomes that are not the provider's fault: they do not lower its reliability.
# ("handed back" is what attempts were recorded with before the two names agreed.)
_BLAMELESS = ("done", "handback", "handed back", "cancelled", "consumer left")


class DuplicateOrder(Conflict):
    """An order id that was already submitted."""

    code = "duplicate_order"

    def __init__(self, order_id: str, state: str | None) -> None:
        # Order ids are global: another consumer's order is named "taken", its state kept
        # from whoever submitted the same id.
        super().__init__(
            f"order {order_id} was already submitted (now {state})"
            if state
            else f"order id {order_id} is taken; choose another",
            order_id=order_id,
            state=state,
        )


class OrderNotFound(NotFound):
    """No order with this id for this consumer."""

    code = "order_not_found"

    def __init__(self, order_id: str) -> None:
        super().__init__(f"no order {order_id}", order_id=order_id)


@dataclass(frozen=True)
class OrderView:
    """An order as the API shows it."""

    id: str
    key_id: str
    kind: str
    body: dict[str, Any]
    state: str
    budget: int
    spent: int
    refunded: int
    placement: dict[str, Any] | None
    reasons: dict[str, Any] | None
    created_at: float
    started_at: float | None
    ends_at: float | None
    accrued_until: float | None
    tokens_done: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)


def order_view(o: MarketOrder) -> OrderView:
    return OrderView(
        o.id,
        o.key_id,
        o.kind,
        dict(o.body),
        o.state,
        o.budget,
        o.spent,
        o.refunded,
        o.placement,
        o.reasons,
        o.created_at,
        o.started_at,
        o.ends_at,
        o.accrued_until,
        o.tokens_done,
    )


def start_fields(order: Order, placement: dict[str, Any], now: float) -> dict[str, Any]:
    """Columns of an order that was just matched and starts at once."""
    state = order_transition(order_transition(OrderState.OPEN, "match"), "start")
    return {
        "state": state.value,
        "placement": placement,
        "reasons": None,
        "started_at": now,
        "accrued_until": now,
        "updated_at": now,
        "ends_at": None if order.kind is OrderKind.BATCH else now + order.hours * 3600,
    }


def view_of_row(r: dict[str, Any], key_id: str, now: float) -> OrderView:
    return OrderView(
        r["id"],
        key_id,
        r["kind"],
        r["body"],
        r["state"],
        r["budget"],
        0,
        0,
        r["placement"],
        r["reasons"],
        now,
        r["started_at"],
        r["ends_at"],
        r["accrued_until"],
        0,
    )


def body_hash(body: dict[str, Any]) -> str:
    """Hash of an order's canonical JSON, to tell a replay from a different order."""
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
