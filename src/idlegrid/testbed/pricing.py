"""Pricing plug-ins: examples to copy, and the misbehaving ones the market must survive.

A plug-in is `module:function`, called as `fn(order, offer) -> credits per device-hour`
(per 1M output tokens for batch orders), within 100 ms; raising, hanging or answering
nonsense sits the offer out of that order. The coordinator runs only modules listed in
IDLEGRID_PRICING_PLUGINS, and in them only functions marked `@pricing_plugin`
(`not_marked` shows one that is refused).
"""

from __future__ import annotations

import threading
from typing import Any

from idlegrid.core.market.plugins import pricing_plugin

_never = threading.Event()


@pricing_plugin
def long_lease_discount(order: dict[str, Any], offer: dict[str, Any]) -> float:
    """10% off for leases of a day or more, 20% off for a week or more."""
    hours = float(order.get("hours", 0))
    factor = 0.8 if hours >= 168 else 0.9 if hours >= 24 else 1.0
    return float(offer["price_h"]) * factor


@pricing_plugin
def fixed_cheap(order: dict[str, Any], offer: dict[str, Any]) -> float:
    """Always 0.01 credits: undercuts any linear price in tests."""
    return 0.01


@pricing_plugin
def raises(order: dict[str, Any], offer: dict[str, Any]) -> float:
    """A plug-in with a bug."""
    raise RuntimeError("pricing backend unavailable")


@pricing_plugin
def hangs(order: dict[str, Any], offer: dict[str, Any]) -> float:
    """A plug-in that never answers (bounded, so the test process can exit)."""
    _never.wait(2.0)
    return 0.01


@pricing_plugin
def nonsense(order: dict[str, Any], offer: dict[str, Any]) -> Any:
    """A plug-in that answers something that is not a price."""
    return "cheap"


def not_marked(order: dict[str, Any], offer: dict[str, Any]) -> float:
    """Cheap, but not marked as a plug-in: the market must not call it."""
    return 0.01
