"""Offers: what a provider charges, per model (per 1M tokens) and per device-hour. Pure.

A provider prices its devices either with a linear per-resource scale (Akash's default bid
engine: so much per device of a model, per GB of VRAM, per CPU, per GB of RAM) or with a
plug-in `module:function` that sees the order and answers within 100 ms; the shell runs
the plug-in with that deadline and an offer whose plug-in fails or is late sits the order
out. Prices are integers in µcr, like every amount.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idlegrid.core.lease.controls import LeaseControls
from idlegrid.core.ledger import MICRO, Price
from idlegrid.core.market.hardware import Device, Hardware, canonical_gpu
from idlegrid.errors import InvalidRequest

# Ceilings that catch a misplaced decimal point; nothing real costs this much.
MAX_DEVICE_HOUR = 10_000 * MICRO  # µcr per device-hour
MAX_PER_M_TOKENS = 100_000 * MICRO  # µcr per 1M tokens
PLUGIN_TIMEOUT_S = 0.1


def _price(field_name: str, raw: Any, ceiling: int) -> int:
    """µcr from a number of credits, refusing negative, non-finite and absurd values."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidRequest(f"{field_name}: expected a number of credits", param=field_name)
    if (
        raw != raw
        or not -1e18 < raw < 1e18
        or (value := round(raw * MICRO)) < 0
        or (value > ceiling)
    ):
        raise InvalidRequest(
            f"{field_name}: {raw} credits is out of range [0, {ceiling / MICRO:g}]",
            param=field_name,
        )
    return int(value)


@dataclass(frozen=True)
class LinearScale:
    """Per-resource prices in µcr per hour; a device-hour costs the sum of its parts."""

    per_device: Mapping[str, int] = field(default_factory=dict)  # canonical model -> µcr/h
    default_device: int = 0
    per_vram_gb: int = 0
    per_cpu: int = 0
    per_ram_gb: int = 0

    def device_hour(self, device: Device, cpus_per_device: float, ram_per_device: float) -> int:
        """µcr for one device of `device`'s model for one hour, with its share of the host."""
        return int(
            self.per_device.get(device.model, self.default_device)
            + self.per_vram_gb * device.vram_gb
            + self.per_cpu * cpus_per_device
            + self.per_ram_gb * ram_per_device
        )


def parse_scale(raw: Mapping[str, Any]) -> LinearScale:
    """A LinearScale from credits per hour: `{"per_device": {"RTX-4090": 0.4}, "per_cpu": 0.01}`."""
    known = {"per_device", "default_device", "per_vram_gb", "per_cpu", "per_ram_gb"}
    unknown = set(raw) - known
    if unknown:
        raise InvalidRequest(f"scale.{sorted(unknown)[0]}: unknown field", param="scale")
    per_device = {
        canonical_gpu(k): _price(f"scale.per_device.{k}", v, MAX_DEVICE_HOUR)
        for k, v in dict(raw.get("per_device", {})).items()
    }
    return LinearScale(
        per_device=per_device,
        **{
            k: _price(f"scale.{k}", raw[k], MAX_DEVICE_HOUR)
            for k in known - {"per_device"}
            if k in raw
        },
    )


def parse_model_prices(raw: Mapping[str, Any]) -> dict[str, Price]:
    """`{"gemma3:270m": {"prompt": 5, "output": 20}}` in credits per 1M tokens → µcr Prices."""
    out = {}
    for model, p in raw.items():
        if not isinstance(p, Mapping) or set(p) - {"prompt", "output"} or "output" not in p:
            raise InvalidRequest(f"prices.{model}: expected {{prompt, output}}", param="prices")
        out[model] = Price(
            _price(f"prices.{model}.prompt", p.get("prompt", 0), MAX_PER_M_TOKENS),
            _price(f"prices.{model}.output", p["output"], MAX_PER_M_TOKENS),
        )
    return out


@dataclass(frozen=True)
class Offer:
    """One provider's group of identical devices, on sale."""

    id: str
    hardware: Hardware
    device: Device
    device_hour: int  # µcr per device-hour; the plug-in's quote replaces it per order
    model_prices: Mapping[str, Price] = field(default_factory=dict)
    plugin: str | None = None  # "module:function"
    staked: bool = True  # a stake covers this device class
    lease: LeaseControls = LeaseControls()  # what a lease may take of the provider

    @property
    def provider(self) -> str:
        """The node that owns these devices."""
        return self.hardware.provider


def offers_for(
    hardware: Hardware,
    scale: LinearScale | None,
    model_prices: Mapping[str, Price],
    plugin: str | None = None,
    staked: Mapping[str, bool] | None = None,
    fixed: Mapping[str, int] | None = None,
) -> list[Offer]:
    """One offer per device group of `hardware`, priced by a fixed price or the scale."""
    n_dev = max(1, sum(d.count for d in hardware.devices))
    out = []
    for d in hardware.devices:
        if fixed and d.model in fixed:
            price = fixed[d.model]
        elif scale is not None:
            price = scale.device_hour(d, hardware.cpus / n_dev, hardware.ram_gb / n_dev)
        else:
            price = 0
        out.append(
            Offer(
                f"{hardware.provider}/{d.model}",
                hardware,
                d,
                price,
                model_prices,
                plugin,
                True if staked is None else staked.get(d.model, False),
            )
        )
    return out
