"""The agent's power meters on a fake sysfs tree and a manual clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from idlegrid.agent.hardware import power
from idlegrid.agent.hardware.power import RaplMeter, RatedMeter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def zone(root: Path, name: str, uj: int, max_uj: int = 1_000_000_000) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "energy_uj").write_text(f"{uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def test_rapl_sums_packages_skips_subzones_and_survives_a_wrap(tmp_path: Path) -> None:
    p0 = zone(tmp_path, "intel-rapl:0", 999_000_000)
    p1 = zone(tmp_path, "intel-rapl:1", 5_000_000)
    zone(tmp_path, "intel-rapl:0:0", 1)  # the package's core sub-zone: would double count
    (tmp_path / "intel-rapl:2").mkdir()  # unreadable counter: skipped
    zones = power.rapl_zones(tmp_path)
    assert [z.name for z in zones] == ["intel-rapl:0", "intel-rapl:1"]
    clock = Clock()
    meter = RaplMeter(zones, clock)
    (p0 / "energy_uj").write_text("2000000\n")  # wrapped at 1e9 µJ: +1 J +2 J
    (p1 / "energy_uj").write_text("12000000\n")  # +7 J
    clock.t = 2.0
    assert meter.joules() == pytest.approx(10.0)
    assert meter.watts() == pytest.approx(5.0)
    assert meter.estimated is False and meter.source == "rapl"


def test_rated_meter_draws_serving_power_only_while_busy() -> None:
    clock = Clock()
    busy = [0]
    meter = RatedMeter(200.0, lambda: busy[0], clock)
    clock.t = 10.0
    assert meter.joules() == pytest.approx(10 * 40.0)  # idle: a fifth of rated
    busy[0] = 1
    clock.t = 12.0
    assert meter.joules() == pytest.approx(400.0 + 2 * 200.0)
    assert meter.watts() == 200.0
    assert meter.estimated is True and meter.source == "estimate"


def test_choose_meter_falls_back_to_an_estimate_from_rated_power(tmp_path: Path) -> None:
    gpu = {"gpus": [{"index": 0, "vendor": "apple", "name": "M2 GPU"}]}
    m = power.choose_meter(gpu, rapl_root=tmp_path)
    assert isinstance(m, RatedMeter) and m.rated_watts == power.DEFAULT_CPU_WATTS
    nvidia = {"gpus": [{"index": 0, "vendor": "nvidia", "power_limit_w": 450.0}]}
    assert power.rated_watts(nvidia) == 450.0
    # without pynvml or a driver: still a meter, marked as an estimate
    m = power.choose_meter(nvidia, rapl_root=tmp_path)
    assert m.estimated is not isinstance(m, power.NvmlMeter)
    m.close()
    zone(tmp_path, "intel-rapl:0", 0)
    assert isinstance(power.choose_meter({"gpus": []}, rapl_root=tmp_path), RaplMeter)
    assert power.choose_meter({}, rated=30.0, rapl_root=tmp_path / "none").watts() == 6.0
