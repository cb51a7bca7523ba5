"""Provider controls over leases: what one lease, and all of a provider's leases together,
may take of it. Pure.

One rule, two places: the auction places a lease order only on an offer whose controls allow
it (each control a named filter, so `market explain` says which one stopped an offer), and
the provider's agent refuses a provisioning that exceeds them whatever the coordinator sent
(defence in depth: a coordinator is not trusted with the provider's machine).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from idlegrid.core.lease.spec import DEFAULT_CPUS, DEFAULT_DISK_GB, DEFAULT_RAM_GB
from idlegrid.core.market.spec import LEASE_RUNTIMES, ResourceSpec
from idlegrid.errors import InvalidRequest

# `local` isolates nothing: it is for tests and is never offered for a lease.
RUNTIMES = LEASE_RUNTIMES
AMOUNTS = ("cpus", "ram_gb", "disk_gb")
FIELDS = (
    "devices",
    "max_cpus",
    "max_ram_gb",
    "max_disk_gb",
    "total_cpus",
    "total_ram_gb",
    "total_disk_gb",
    "egress",
    "pip",
    "runtimes",
)


@dataclass(frozen=True)
class LeaseAsk:
    """What one lease takes of its provider: cores, GiB of RAM and disk, network, pip."""

    cpus: float = DEFAULT_CPUS
    ram_gb: float = DEFAULT_RAM_GB
    disk_gb: float = DEFAULT_DISK_GB
    egress: bool = False
    pip: bool = False
    runtime: str = "bwrap"

    def amounts(self) -> tuple[float, float, float]:
        """(cpus, ram_gb, disk_gb), the parts that add up across a provider's leases."""
        return (self.cpus, self.ram_gb, self.disk_gb)


@dataclass(frozen=True)
class LeaseControls:
    """A provider's limits on leases; None is no limit beyond the hardware itself.
    Outbound network is off unless the provider turns it on."""

    devices: frozenset[str] | None = None  # device groups leased; None all, empty none
    max_cpus: float | None = None  # per lease
    max_ram_gb: float | None = None
    max_disk_gb: float | None = None
    total_cpus: float | None = None  # across the provider's running leases
    total_ram_gb: float | None = None
    total_disk_gb: float | None = None
    egress: bool = False
    pip: bool = True
    runtimes: tuple[str, ...] = ("bwrap",)

    def leases(self, model: str) -> bool:
        """Whether devices of `model` are leased at all."""
        return self.devices is None or model in self.devices

    def to_dict(self) -> dict[str, Any]:
        """The controls as `parse_controls` reads them (what offers advertise)."""
        out: dict[str, Any] = {
            "devices": "all" if self.devices is None else sorted(self.devices),
            "egress": self.egress,
            "pip": self.pip,
            "runtimes": list(self.runtimes),
        }
        for name in FIELDS[1:7]:
            out[name] = getattr(self, name)
        return out


def _amount(name: str, raw: Any) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidRequest(f"lease.{name}: expected a number", param=f"lease.{name}")
    if not math.isfinite(raw) or raw <= 0 or raw > 1e6:
        raise InvalidRequest(f"lease.{name}: {raw} is out of range (0, 1e6]", param=f"lease.{name}")
    return float(raw)


def parse_controls(raw: Mapping[str, Any] | None) -> LeaseControls:
    """LeaseControls from JSON-like data; InvalidRequest naming `lease.<field>` otherwise."""
    if raw is None:
        return LeaseControls()
    if not isinstance(raw, Mapping):
        raise InvalidRequest("lease: expected an object", param="lease")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InvalidRequest(f"lease.{unknown[0]}: unknown field", param=f"lease.{unknown[0]}")
    devices = raw.get("devices", "all")
    if devices == "all":
        leased: frozenset[str] | None = None
    elif devices == "none":
        leased = frozenset()
    elif isinstance(devices, Sequence) and not isinstance(devices, str):
        if not all(isinstance(d, str) and d for d in devices):
            raise InvalidRequest("lease.devices: device group names", param="lease.devices")
        leased = frozenset(devices)
    else:
        raise InvalidRequest(
            "lease.devices: 'all', 'none' or a list of device groups", param="lease.devices"
        )
    for flag in ("egress", "pip"):
        if not isinstance(raw.get(flag, False), bool):
            raise InvalidRequest(f"lease.{flag}: true or false", param=f"lease.{flag}")
    runtimes = raw.get("runtimes", ["bwrap"])
    if (
        not isinstance(runtimes, Sequence)
        or isinstance(runtimes, str)
        or not all(r in RUNTIMES for r in runtimes)
    ):
        raise InvalidRequest(
            f"lease.runtimes: a list of {', '.join(RUNTIMES)} ('local' isolates nothing "
            "and is never offered for a lease)",
            param="lease.runtimes",
        )
    amounts = {name: _amount(name, raw.get(name)) for name in FIELDS[1:7]}
    return LeaseControls(
        devices=leased,
        egress=bool(raw.get("egress", False)),
        pip=bool(raw.get("pip", True)),
        runtimes=tuple(dict.fromkeys(runtimes)),
        **amounts,
    )


def ask_of(spec: ResourceSpec) -> LeaseAsk:
    """What a lease order's resources take: the number of each bound, or the default."""
    return LeaseAsk(
        cpus=spec.cpus.limit if spec.cpus is not None else DEFAULT_CPUS,
        ram_gb=spec.ram_gb.limit if spec.ram_gb is not None else DEFAULT_RAM_GB,
        disk_gb=spec.disk_gb.limit if spec.disk_gb is not None else DEFAULT_DISK_GB,
        egress=spec.egress,
        pip=bool(spec.pip),
        runtime=spec.runtime or "bwrap",
    )


def refusal(
    controls: LeaseControls,
    ask: LeaseAsk,
    used: tuple[float, float, float] = (0.0, 0.0, 0.0),
    model: str | None = None,
) -> tuple[str, str] | None:
    """The first control that `ask` exceeds, given what running leases `used`, as
    (control, why); None when every control allows it."""
    if model is not None and not controls.leases(model):
        return ("lease.devices", f"the provider does not lease its {model} devices")
    if ask.runtime not in controls.runtimes:
        offered = ", ".join(controls.runtimes) or "none"
        return ("lease.runtime", f"runtime {ask.runtime!r} is not offered (offered: {offered})")
    for name, want, in_use in zip(AMOUNTS, ask.amounts(), used, strict=True):
        most = getattr(controls, f"max_{name}")
        if most is not None and want > most:
            return (
                f"lease.max_{name}",
                f"{name} {want:g} is over the most one lease may take, {most:g}",
            )
        total = getattr(controls, f"total_{name}")
        if total is not None and in_use + want > total:
            return (
                f"lease.total_{name}",
                f"{name} {want:g} with {in_use:g} already leased is over the total, {total:g}",
            )
    if ask.egress and not controls.egress:
        return ("lease.egress", "the provider gives workspaces no outbound network")
    if ask.pip and not controls.pip:
        return ("lease.pip", "the provider installs no pip requirements")
    return None


@dataclass(frozen=True)
class Columns:
    """A book's lease controls as columns, built once per book: leased device group,
    runtimes offered, per-lease and total limits (inf: none; offers × 3), egress, pip."""

    leased: np.ndarray
    runtimes: dict[str, np.ndarray]
    most: np.ndarray
    total: np.ndarray
    egress: np.ndarray
    pip: np.ndarray


def columns(controls: Sequence[LeaseControls], models: Sequence[str]) -> Columns:
    """The columns of `controls` (one per offer, with the offer's device model)."""
    pairs = list(zip(controls, models, strict=True))

    def amounts(kind: str) -> np.ndarray:
        rows = [[getattr(c, f"{kind}_{a}") or np.inf for a in AMOUNTS] for c in controls]
        return np.array(rows, dtype=np.float64).reshape(len(controls), len(AMOUNTS))

    return Columns(
        leased=np.array([c.leases(m) for c, m in pairs], dtype=bool),
        runtimes={r: np.array([r in c.runtimes for c in controls], dtype=bool) for r in RUNTIMES},
        most=amounts("max"),
        total=amounts("total"),
        egress=np.array([c.egress for c in controls], dtype=bool),
        pip=np.array([c.pip for c in controls], dtype=bool),
    )


def masks(cols: Columns, used: np.ndarray, ask: LeaseAsk) -> list[tuple[str, np.ndarray]]:
    """Per control, which offers allow `ask` (in `refusal`'s order), for the auction's
    named filters; `used` is an (offers × 3) array of what each offer's provider has leased."""
    out = [
        ("lease.devices", cols.leased),
        ("lease.runtime", cols.runtimes.get(ask.runtime, np.zeros_like(cols.leased))),
    ]
    for j, (name, want) in enumerate(zip(AMOUNTS, ask.amounts(), strict=True)):
        out.append((f"lease.max_{name}", cols.most[:, j] >= want))
        out.append((f"lease.total_{name}", cols.total[:, j] >= used[:, j] + want))
    if ask.egress:
        out.append(("lease.egress", cols.egress))
    if ask.pip:
        out.append(("lease.pip", cols.pip))
    return out
