"""What hardware this provider has: CPU, memory, OS, NVIDIA GPUs (NVML), Apple MPS.

The probe never fails: whatever cannot be read is None or an empty list, so an agent on an
odd machine still starts and reports what it knows.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuInfo:
    """One accelerator as the provider reports it."""

    index: int
    name: str
    vendor: str  # "nvidia" or "apple"
    vram_bytes: int | None = None
    driver: str | None = None
    power_limit_w: float | None = None
    compute_capability: str | None = None
    uuid: str | None = None


@dataclass(frozen=True)
class Hardware:
    """The machine a provider agent runs on."""

    cpu_model: str | None
    cpu_logical: int | None
    cpu_physical: int | None
    ram_bytes: int | None
    os: str
    os_release: str
    arch: str
    python: str
    gpus: list[GpuInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, for the agent's registration message."""
        return asdict(self)


def probe() -> Hardware:
    """Probe this machine; missing facts are None, missing GPUs an empty list."""
    return Hardware(
        cpu_model=_safe(_cpu_model),
        cpu_logical=_safe(_cpu_logical),
        cpu_physical=_safe(_cpu_physical),
        ram_bytes=_safe(_ram_bytes),
        os=platform.system().lower() or sys.platform,
        os_release=platform.release(),
        arch=_normalise_arch(platform.machine()),
        python=platform.python_version(),
        gpus=(_safe(_nvidia_gpus) or []) + (_safe(_apple_gpus) or []),
    )


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception:  # a probe that breaks must not stop the agent
        return None


def _normalise_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "aarch64": "arm64"}.get(m, m)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _cpu_model() -> str | None:
    text = _read("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Processor", "cpu model"):
                return value.strip() or None
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string")
    return platform.processor() or None


def _cpu_logical() -> int | None:
    # Respect cgroup/affinity limits: that is what an engine can actually use.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _cpu_physical() -> int | None:
    text = _read("/proc/cpuinfo")
    if text:
        cores: set[tuple[str, str]] = set()
        phys = core = ""
        for line in text.splitlines() + [""]:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not key and core:
                cores.add((phys, core))
                phys = core = ""
        if cores:
            return len(cores)
    if sys.platform == "darwin":
        value = _sysctl("hw.physicalcpu")
        return int(value) if value else None
    return None


def _ram_bytes() -> int | None:
    text = _read("/proc/meminfo")
    if text:
        for line in text.splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    if sys.platform == "darwin":
        value = _sysctl("hw.memsize")
        return int(value) if value else None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _sysctl(name: str) -> str | None:
    import subprocess

    out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _nvidia_gpus() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, or no GPU: NVML raises its own error types
        return []
    try:
        driver = _text(_safe(pynvml.nvmlSystemGetDriverVersion))
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = _safe(lambda h=handle: pynvml.nvmlDeviceGetMemoryInfo(h))
            power = _safe(lambda h=handle: pynvml.nvmlDeviceGetPowerManagementLimit(h))
            cc = _safe(lambda h=handle: pynvml.nvmlDeviceGetCudaComputeCapability(h))
            gpus.append(
                GpuInfo(
                    index=i,
                    name=_text(_safe(lambda h=handle: pynvml.nvmlDeviceGetName(h))) or "NVIDIA GPU",
                    vendor="nvidia",
                    vram_bytes=int(memory.total) if memory is not None else None,
                    driver=driver,
                    power_limit_w=power / 1000.0 if power is not None else None,  # NVML: mW
                    compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
                    uuid=_text(_safe(lambda h=handle: pynvml.nvmlDeviceGetUUID(h))),
                )
            )
        return gpus
    finally:
        _safe(pynvml.nvmlShutdown)


def _text(value: Any) -> str | None:
    # Older nvidia-ml-py returns bytes, newer returns str.
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _apple_gpus() -> list[GpuInfo]:
    if sys.platform != "darwin" or _normalise_arch(platform.machine()) != "arm64":
        return []
    name = _cpu_model() or "Apple Silicon"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and not torch.backends.mps.is_available():
        return []
    # Unified memory: the GPU can use most of the machine's RAM.
    return [GpuInfo(index=0, name=f"{name} GPU", vendor="apple", vram_bytes=_safe(_ram_bytes))]
