"""The hardware probe on this machine: sane values, never an exception."""

from __future__ import annotations

import json
import os

from idlegrid.agent.hardware.probe import GpuInfo, Hardware, probe


def test_probe_reports_this_machine() -> None:
    hw = probe()
    assert isinstance(hw, Hardware)
    assert hw.cpu_logical is not None and hw.cpu_logical >= 1
    assert hw.cpu_logical <= (os.cpu_count() or hw.cpu_logical)
    assert hw.cpu_physical is None or 1 <= hw.cpu_physical <= (os.cpu_count() or 1)
    assert hw.ram_bytes is not None and hw.ram_bytes > 64 * 2**20
    assert hw.os and hw.arch and hw.python.count(".") == 2
    assert hw.cpu_model is None or hw.cpu_model.strip() == hw.cpu_model != ""
    for gpu in hw.gpus:  # none here is fine; where there are, they are well-formed
        assert isinstance(gpu, GpuInfo) and gpu.vendor in ("nvidia", "apple") and gpu.name


def test_probe_is_json_ready() -> None:
    data = json.loads(json.dumps(probe().to_dict()))
    assert set(data) >= {"cpu_model", "cpu_logical", "ram_bytes", "os", "arch", "gpus"}
    assert isinstance(data["gpus"], list)
