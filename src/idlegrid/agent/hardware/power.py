"""Power meters for the agent: NVML on NVIDIA, RAPL counters on CPUs, else an estimate.

Every meter exposes one cumulative energy counter in joules since it was created, so
energy per request is a difference of two reads (core.energy.Attribution splits it when
requests overlap) and kWh over any period is a difference of two heartbeat samples.

- NVML: `nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load, Volta and newer),
  summed over the GPUs; older cards only report instantaneous power, which a background
  thread samples at 10 Hz and integrates.
- RAPL: /sys/class/powercap/intel-rapl:N/energy_uj of each CPU package (sub-zones such as
  intel-rapl:0:0 are parts of the package and would be counted twice), wrapping at
  max_energy_range_uj. Often root-only since 2020 (CVE-2020-8694), hence "where readable".
- Estimate: rated watts while serving, a fifth of that while idle, integrated over time
  with the number of requests in flight; marked `estimated` everywhere it shows.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from idlegrid.core.energy import wrapped_delta

log = logging.getLogger("idlegrid.agent.power")

RAPL_ROOT = Path("/sys/class/powercap")
# A desktop CPU's typical package power; used only when nothing better is known.
DEFAULT_CPU_WATTS = 65.0
IDLE_FRACTION = 0.2


class PowerMeter(Protocol):
    """A cumulative energy counter for the devices that serve requests."""

    source: str  # "nvml" | "rapl" | "estimate"
    estimated: bool

    def joules(self) -> float:
        """Energy used since the meter was created, J."""
        ...

    def watts(self) -> float | None:
        """Current draw, W, if known."""
        ...

    def close(self) -> None:
        """Stop any background sampling."""
        ...


class RatedMeter:
    """An estimate: rated watts while requests run, IDLE_FRACTION of them while idle."""

    source = "estimate"
    estimated = True

    def __init__(
        self,
        rated_watts: float,
        busy: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
        idle_watts: float | None = None,
    ) -> None:
        self.rated_watts = rated_watts
        self.idle_watts = rated_watts * IDLE_FRACTION if idle_watts is None else idle_watts
        self._busy = busy
        self._clock = clock
        self._last = clock()
        self._joules = 0.0
        self._lock = threading.Lock()

    def bind_busy(self, busy: Callable[[], int]) -> None:
        """Count requests in flight with `busy` (the agent binds its own count)."""
        self._busy = busy

    def watts(self) -> float:
        """The draw assumed right now."""
        return self.rated_watts if self._busy() > 0 else self.idle_watts

    def joules(self) -> float:
        """Energy since creation, assuming the draw held since the previous read."""
        with self._lock:
            now = self._clock()
            self._joules += self.watts() * max(0.0, now - self._last)
            self._last = now
            return self._joules

    def close(self) -> None:
        """Nothing to stop."""


class RaplMeter:
    """CPU package energy from the kernel's RAPL counters."""

    source = "rapl"
    estimated = False

    def __init__(self, zones: Sequence[Path], clock: Callable[[], float] = time.monotonic) -> None:
        if not zones:
            raise ValueError("no RAPL zones")
        self._zones = list(zones)
        self._ranges = [_read_float(z / "max_energy_range_uj") for z in self._zones]
        self._last = [_read_float(z / "energy_uj") for z in self._zones]
        self._clock = clock
        self._joules = 0.0
        self._watts: float | None = None
        self._t = clock()
        self._lock = threading.Lock()

    def joules(self) -> float:
        """Energy since creation, J (counters are µJ)."""
        with self._lock:
            added = 0.0
            for i, zone in enumerate(self._zones):
                cur, last = _read_float(zone / "energy_uj"), self._last[i]
                if cur is None or last is None:
                    continue
                added += wrapped_delta(last, cur, self._ranges[i]) / 1e6
                self._last[i] = cur
            now = self._clock()
            if now > self._t:
                self._watts = added / (now - self._t)
            self._t = now
            self._joules += added
            return self._joules

    def watts(self) -> float | None:
        """Mean draw between the last two reads."""
        return self._watts

    def close(self) -> None:
        """Nothing to stop."""


def rapl_zones(root: Path = RAPL_ROOT) -> list[Path]:
    """Readable top-level RAPL package zones (intel-rapl:N), or []."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") != 1:  # intel-rapl:0:0 is a sub-zone of package 0
            continue
        if _read_float(zone / "energy_uj") is not None:
            zones.append(zone)
    return zones


class NvmlMeter:
    """NVIDIA GPUs' energy through NVML: the driver's counter, or sampled power."""

    source = "nvml"
    estimated = False

    def __init__(self, indices: Sequence[int] | None = None, interval_s: float = 0.1) -> None:
        import pynvml  # lazy: only on machines with the NVIDIA extra

        self._nvml: Any = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        chosen = list(indices) if indices is not None else list(range(count))
        if not chosen:
            pynvml.nvmlShutdown()
            raise ValueError("no NVIDIA GPU")
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in chosen]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._base = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
            self._counter = True
        except pynvml.NVMLError:
            # Pre-Volta: no energy counter, integrate sampled power instead.
            self._counter = False
            self._sampled = 0.0
            self._prev = (time.monotonic(), self._power())
            self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
            self._thread.start()

    def _power(self) -> float:
        milliwatts = sum(self._nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles)
        return float(milliwatts) / 1000.0

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            now, w = time.monotonic(), self._power()
            with self._lock:
                t0, w0 = self._prev
                self._sampled += (w0 + w) / 2 * (now - t0)
                self._prev = (now, w)

    def joules(self) -> float:
        """Energy since creation, J."""
        if self._counter:
            now = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
            return (
                sum(wrapped_delta(b, n, None) for b, n in zip(self._base, now, strict=True))
                / 1000.0
            )  # mJ
        with self._lock:
            return self._sampled

    def watts(self) -> float | None:
        """Current board power, W."""
        try:
            return self._power()
        except self._nvml.NVMLError:
            return None

    def close(self) -> None:
        """Stop sampling and release NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def rated_watts(hardware: dict[str, Any]) -> float:
    """A device's rated power from its probe: the GPUs' power limits, else a desktop CPU's."""
    limits = [g.get("power_limit_w") for g in hardware.get("gpus") or []]
    known = [float(w) for w in limits if w]
    return sum(known) if known else DEFAULT_CPU_WATTS


def choose_meter(
    hardware: dict[str, Any],
    busy: Callable[[], int] = lambda: 0,
    *,
    rated: float | None = None,
    rapl_root: Path = RAPL_ROOT,
) -> PowerMeter:
    """The best meter this machine offers: NVML, then RAPL, then an estimate from rated power."""
    gpus = hardware.get("gpus") or []
    if any(g.get("vendor") == "nvidia" for g in gpus):
        try:
            return NvmlMeter([g["index"] for g in gpus if g.get("vendor") == "nvidia"])
        except Exception as exc:  # NVML's errors are its own types; fall through to the next
            log.warning("NVML power unavailable (%s); trying other meters", exc)
    elif not gpus:
        zones = rapl_zones(rapl_root)
        if zones:
            return RaplMeter(zones)
    # Apple GPUs: powermetrics needs root, so an Apple laptop gets an estimate too.
    return RatedMeter(rated if rated is not None else rated_watts(hardware), busy)


def _read_float(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None
