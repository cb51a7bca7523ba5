"""`idlegrid provide`'s option values parsed before anything loads: a bad one exits 2
naming its flag (split from serve_cmd.py to keep that module readable)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from idlegrid.core.lease.controls import LeaseControls


def parse_links(values: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """`--link NODE=GBPS[@MS]` values as the agent's links (Gbit/s) and latencies (ms)."""
    links: dict[str, float] = {}
    latency: dict[str, float] = {}
    for raw in values:
        node, sep, rest = raw.partition("=")
        gbps, at, ms = rest.partition("@")
        try:
            bw, lat = float(gbps), float(ms) if at else 0.0
        except ValueError:
            bw = lat = -1.0
        if not node or not sep or not (0 < bw < 1e7) or not (0 <= lat <= 1e5):
            raise typer.BadParameter(
                f"{raw!r}: expected NODE_ID=GBPS or NODE_ID=GBPS@MS (GBPS > 0, MS >= 0)",
                param_hint="--link",
            )
        links[node] = bw
        if at:
            latency[node] = lat
    return links, latency


def lease_controls(
    devices: str, most: str | None, total: str | None, egress: bool, pip: bool, runtimes: str
) -> LeaseControls:
    """The provider's lease controls from `provide`'s flags; a bad one exits naming it."""
    from idlegrid.core.lease.controls import parse_controls
    from idlegrid.errors import InvalidRequest

    raw: dict[str, Any] = {
        "devices": devices if devices in ("all", "none") else devices.split(","),
        "egress": egress,
        "pip": pip,
        "runtimes": [r for r in runtimes.split(",") if r],
    }
    try:
        for prefix, flag in (("max", most), ("total", total)):
            for part in (flag or "").split(","):
                if part:
                    what, _, amount = part.partition("=")
                    if what not in ("cpus", "ram_gb", "disk_gb"):
                        raise InvalidRequest(
                            f"--lease-{prefix}: {what!r} is not cpus, ram_gb or disk_gb",
                            param=f"lease.{prefix}",
                        )
                    raw[f"{prefix}_{what}"] = float(amount)
        return parse_controls(raw)
    except (InvalidRequest, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
