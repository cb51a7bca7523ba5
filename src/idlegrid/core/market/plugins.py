"""What may run as a pricing plug-in: only functions their author marked as one.

The operator allows whole modules (IDLEGRID_PRICING_PLUGINS); a provider names
`module:function`. Without the mark, a provider could name any callable an allowed module
happens to import (`os:system` in a module that imports os), so the coordinator calls only
functions decorated with `@pricing_plugin`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
MARK = "__idlegrid_pricing_plugin__"


def pricing_plugin(fn: F) -> F:
    """Mark `fn(order, offer) -> credits` as callable by the market."""
    setattr(fn, MARK, True)
    return fn


def is_pricing_plugin(obj: Any) -> bool:
    """Whether `obj` was marked with `@pricing_plugin`."""
    return callable(obj) and getattr(obj, MARK, False) is True
