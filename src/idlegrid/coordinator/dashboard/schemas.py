"""Response models of the dashboard's JSON snapshot and of the economics API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from idlegrid.coordinator.schemas import Number


class Snapshot(BaseModel):
    """One page's HTML fragments and chart data, at a change version of the grid."""

    page: str
    now: Number
    sections: dict[str, str]  # fragment id -> HTML
    charts: dict[str, Any]  # chart id -> {title, x, series}
    version: int


class ProviderEarnings(BaseModel):
    """One provider over the period: credits (µcr), energy (J) and efficiency."""

    node_id: str
    name: str
    hardware: dict[str, Any]
    decode_tps: Number
    earned: int  # net income for work over the period, µcr
    income: dict[str, int]  # earned by source: tokens, seconds, training steps, ...
    accrued: int  # work not paid out yet (now)
    paid: int  # work that reached the provider account over the period
    energy_j: Number
    energy_estimated: bool
    request_energy_j: Number
    request_energy_estimated: bool
    output_tokens: int
    requests: int
    tokens_per_joule: Number | None
    tokens_per_joule_by_model: dict[str, Number | None]
    power: dict[str, Any] | None  # the last heartbeat's power reading


class Earnings(BaseModel):
    """GET /api/v1/economics/earnings."""

    period: str
    period_s: Number
    since: Number
    until: Number
    fee_bps: int
    providers: list[ProviderEarnings]


class ModelPrices(BaseModel):
    """Live providers' prices for one model, µcr per 1M tokens, and their median speed."""

    model: str
    providers: int
    output_min: int
    output_median: int
    output_max: int
    prompt_median: int
    decode_tps_median: Number


class Prices(BaseModel):
    """GET /api/v1/economics/prices."""

    fee_bps: int
    models: list[ModelPrices]
