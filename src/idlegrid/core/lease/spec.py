"""What a lease's workspace gets, read from its market order. Pure.

The order's `resources.cpus` and `resources.ram_gb` (or `memory_gb`) are bounds the
auction matched on ("4+", ">=16"); the workspace gets their number as its limit, or a
modest default when the order did not ask. `/work` is `resources.disk_gb` if given; `pip`,
`egress`, `runtime` and `image` pass through (the auction checked them against the provider's
lease controls, and the agent checks again).
"""

from __future__ import annotations

import re
from typing import Any

from idlegrid.errors import InvalidRequest

DEFAULT_CPUS = 1.0
DEFAULT_RAM_GB = 2.0
DEFAULT_DISK_GB = 4.0
PIDS = 1024
_NUMBER = re.compile(r"\s*(?:>=|==|>|<=|<)?\s*([0-9]*\.?[0-9]+)\s*\+?\s*$")


def _amount(raw: Any, name: str, default: float) -> float:
    if raw is None:
        return default
    m = _NUMBER.match(str(raw))
    if m is None or float(m.group(1)) <= 0:
        raise InvalidRequest(f"resources.{name}: a positive amount, not {raw!r}", param=name)
    return float(m.group(1))


def workspace_spec(resources: dict[str, Any]) -> dict[str, Any]:
    """The limits and GPUs of the workspace an order's resources ask for (a LeaseSpecMsg)."""
    ram = resources.get("ram_gb", resources.get("memory_gb"))
    # Only when asked: an agent from before the provider controls refuses a spec naming
    # them (its frame schema forbids unknown fields), so it never runs one without them.
    extra: dict[str, Any] = {"egress": True} if resources.get("egress") is True else {}
    if resources.get("runtime"):
        extra["runtime"] = str(resources["runtime"])
    if resources.get("image"):  # an image runs on podman (market/spec.py checked the pair)
        extra["image"] = str(resources["image"])
        extra.setdefault("runtime", "podman")
    return {
        **extra,
        "cpus": _amount(resources.get("cpus"), "cpus", DEFAULT_CPUS),
        "memory_bytes": int(_amount(ram, "ram_gb", DEFAULT_RAM_GB) * (1 << 30)),
        "pids": PIDS,
        "disk_bytes": int(
            _amount(resources.get("disk_gb"), "disk_gb", DEFAULT_DISK_GB) * (1 << 30)
        ),
        "gpus": [],
        "pip": [str(p) for p in resources.get("pip") or []],
    }
