"""Gang placement's two answers besides the winner: the record of who runs what, and why no
gang formed. Pure.

A gang is all or nothing: either every member is placed (one `Placement`, all legs) or the
order is unmatched and holds nothing. Links nobody reported are not used: two providers
share a gang only over a link at least one of them reported at `min_link_gbps` or more.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from idlegrid.core.planner.gang import GangPlan

if TYPE_CHECKING:
    from idlegrid.core.market.orders import Order

# Why a job too big for every device is not split across several: said with its vram_gb.
NO_STAGES = (
    "vram_gb: no device holds the whole model, and a job is not split into pipeline "
    "stages across providers (the verified trainer runs data-parallel ranks only)"
)


def one_per_provider(order: Order) -> bool:
    """A data-parallel training job runs one rank per provider (each rank is a node that
    polls for its work), so its gang takes one device from each of `devices` providers."""
    return order.job is not None and order.devices > 1


def gang_record(
    plan: GangPlan, providers: Sequence[str], offer_ids: Sequence[str], price: Sequence[int]
) -> dict[str, Any]:
    """The placement's `gang`: layout, planned step time and every member's part (rank r
    is member r of the list: stage-major, shard within its stage)."""
    return {
        "layout": plan.layout,
        "stages": plan.stages,
        "data_parallel": plan.data_parallel,
        "step_s": plan.step_s,
        "members": [
            {
                "rank": r,
                "provider": providers[m.index],
                "offer_id": offer_ids[m.index],
                "stage": m.stage,
                "shard": m.shard,
                "unit_price": int(price[m.index]),
            }
            for r, m in enumerate(plan.members)
        ],
    }


def shortfall(
    need: int,
    one_per_provider: bool,
    min_link_gbps: float,
    providers: Sequence[str],
    free_devices: int,
    within_all_but_price: int,
    link: Callable[[str, str], float | None],
) -> str:
    """Why no gang of `need` formed from the fitting offers of `providers` (distinct, each
    with a free device): too few fit, too few under the price ceiling, or their links are
    unknown or too slow. `within_all_but_price`: providers that passed every filter but
    `max_price`."""
    have = len(providers) if one_per_provider else free_devices
    unit = "providers" if one_per_provider else "free devices"
    if have < need:
        if one_per_provider and within_all_but_price >= need:
            return (
                f"gang: over the ceiling: {need} providers needed, "
                f"{len(providers)} of {within_all_but_price} fitting ones within max_price"
            )
        return f"gang: not enough fitting offers: {need} {unit} needed, {have} fit"
    reported = [
        bw for a, b in itertools.combinations(providers, 2) if (bw := link(a, b)) is not None
    ]
    pairs = len(providers) * (len(providers) - 1) // 2
    if not reported:
        return (
            f"gang: links unknown: none reported between the {len(providers)} fitting "
            "providers (an unreported link is not used)"
        )
    return (
        f"gang: links too slow: no {need} fitting providers all linked at >= "
        f"{min_link_gbps:g} Gbit/s (fastest reported {max(reported):g} Gbit/s, "
        f"{pairs - len(reported)} of {pairs} pairs unreported)"
    )
