"""Energy arithmetic, pure: counters, power integration, per-request shares, kWh, tokens/J.

Units: joules (J) and watts (W) as floats, time in seconds. A device's energy comes either
from a cumulative counter (NVML total energy, RAPL energy_uj) or from power samples, or is
an estimate from rated power; every figure carries `estimated` so that an estimate is never
shown as a measurement, and anything computed from an estimate stays marked.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from idlegrid.errors import InvalidRequest

J_PER_KWH = 3_600_000.0
J_PER_WH = 3_600.0


def kwh(joules: float) -> float:
    """Joules to kilowatt-hours."""
    return joules / J_PER_KWH


def joules_of_kwh(value: float) -> float:
    """Kilowatt-hours to joules."""
    return value * J_PER_KWH


@dataclass(frozen=True)
class Energy:
    """An amount of energy and whether any part of it was estimated rather than measured."""

    joules: float
    estimated: bool = False

    def __add__(self, other: Energy) -> Energy:
        return Energy(self.joules + other.joules, self.estimated or other.estimated)

    @property
    def kwh(self) -> float:
        """The same amount in kWh."""
        return kwh(self.joules)


def total(parts: Iterable[Energy]) -> Energy:
    """Sum of energies; estimated if any part was."""
    out = Energy(0.0)
    for p in parts:
        out = out + p
    return out


def tokens_per_joule(tokens: int, joules: float) -> float | None:
    """Efficiency; None when no energy was recorded (dividing by zero would claim infinity)."""
    if joules <= 0:
        return None
    return tokens / joules


def wrapped_delta(prev: float, cur: float, wrap_at: float | None) -> float:
    """Increase of a cumulative counter between two reads.

    RAPL's energy_uj wraps at max_energy_range_uj; a counter that went down without a wrap
    range was reset (driver reload, agent restart), so it counts from zero.
    """
    if cur >= prev:
        return cur - prev
    if wrap_at is not None and wrap_at > prev:
        return wrap_at - prev + cur
    return cur


def integrate_power(samples: Sequence[tuple[float, float]]) -> float:
    """Joules from (time s, watts) samples by the trapezoid rule; samples must be time-ordered."""
    joules = 0.0
    for (t0, w0), (t1, w1) in zip(samples, samples[1:], strict=False):
        if t1 < t0:
            raise InvalidRequest("power samples must be in time order", param="samples")
        joules += (w0 + w1) / 2 * (t1 - t0)
    return joules


@dataclass(frozen=True)
class CounterSample:
    """A device's cumulative energy counter read at time `t` (seconds since the epoch)."""

    t: float
    joules_total: float
    estimated: bool = False


def energy_between(samples: Sequence[CounterSample], start: float, end: float) -> Energy:
    """Energy a device used in [start, end], from counter samples sorted by time.

    Intervals that straddle an edge count in proportion to their overlap (power assumed
    steady between two samples); a counter that went down was reset and counts from zero.
    """
    if end < start:
        raise InvalidRequest("period ends before it starts", param="end")
    joules = 0.0
    estimated = False
    for a, b in zip(samples, samples[1:], strict=False):
        span = b.t - a.t
        lo, hi = max(a.t, start), min(b.t, end)
        if span <= 0 or hi <= lo:
            continue
        joules += wrapped_delta(a.joules_total, b.joules_total, None) * (hi - lo) / span
        estimated = estimated or a.estimated or b.estimated
    return Energy(joules, estimated)


class Attribution:
    """Splits one device's energy among the requests it was serving at the same time.

    Call `advance` with the device's cumulative joules whenever the set of running jobs is
    about to change (and as often as convenient in between): the energy since the last call
    is shared evenly among the jobs that ran through it. Energy drawn while idle belongs to
    no request; it still counts in the device's kWh.
    """

    def __init__(self, wrap_at: float | None = None) -> None:
        self._last: float | None = None
        self._wrap_at = wrap_at
        self._active: set[str] = set()
        self._acc: dict[str, float] = {}

    def advance(self, joules_total: float) -> None:
        """Record a counter reading; the energy since the last one goes to the running jobs."""
        if self._last is not None and self._active:
            share = wrapped_delta(self._last, joules_total, self._wrap_at) / len(self._active)
            for job in self._active:
                self._acc[job] = self._acc.get(job, 0.0) + share
        self._last = joules_total

    def start(self, job: str, joules_total: float) -> None:
        """A job begins now (reading taken just before it runs)."""
        self.advance(joules_total)
        self._active.add(job)
        self._acc.setdefault(job, 0.0)

    def finish(self, job: str, joules_total: float) -> float:
        """A job ends now: its share of the energy, in joules."""
        self.advance(joules_total)
        self._active.discard(job)
        return self._acc.pop(job, 0.0)

    @property
    def active(self) -> Collection[str]:
        """Jobs running now."""
        return frozenset(self._active)
