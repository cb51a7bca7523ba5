"""Summaries the dashboard shows, pure: percentiles, time buckets, accounts by kind."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from idlegrid.errors import InvalidRequest


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; None if empty."""
    if not 0 <= q <= 100:
        raise InvalidRequest("percentile must be between 0 and 100", param="q")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def buckets(
    points: Iterable[tuple[float, float]], start: float, end: float, width: float
) -> tuple[list[float], list[float]]:
    """Sum (time, value) points into fixed-width buckets over [start, end): (bucket starts, sums).

    Every bucket is present, empty ones as 0, so a chart shows quiet periods as quiet.
    """
    if width <= 0 or end <= start:
        raise InvalidRequest("buckets need a positive width and end after start", param="width")
    n = max(1, math.ceil((end - start) / width))
    starts = [start + i * width for i in range(n)]
    sums = [0.0] * n
    for t, v in points:
        if start <= t < end:
            sums[min(n - 1, int((t - start) // width))] += v
    return starts, sums


def bucket_mean(
    points: Iterable[tuple[float, float]], start: float, end: float, width: float
) -> tuple[list[float], list[float | None]]:
    """Mean of (time, value) points per bucket; None where a bucket has no point (a gap)."""
    pts = list(points)
    starts, sums = buckets(pts, start, end, width)
    _, counts = buckets(((t, 1.0) for t, _ in pts), start, end, width)
    return starts, [s / c if c else None for s, c in zip(sums, counts, strict=True)]


ACCOUNT_KINDS = ("consumer", "provider", "accrual", "stake", "escrow", "system")


def account_kind(account: str) -> str:
    """'consumer', 'provider', 'accrual', 'stake', 'escrow', 'system', or 'other'."""
    prefix = account.split(":", 1)[0]
    return prefix if prefix in ACCOUNT_KINDS else "other"


def totals_by_kind(balances: Mapping[str, int]) -> dict[str, int]:
    """Sum of balances per account kind (µcr)."""
    out: dict[str, int] = {}
    for account, value in balances.items():
        kind = account_kind(account)
        out[kind] = out.get(kind, 0) + value
    return out


def provider_money(balances: Mapping[str, int], node_id: str) -> dict[str, int]:
    """A provider's accrued (not yet paid out) and paid balances, µcr."""
    return {
        "accrued": balances.get(f"accrual:{node_id}", 0),
        "paid": balances.get(f"provider:{node_id}", 0),
    }
