"""Hardware descriptors and the GPU list that makes device names comparable. Pure.

NVML says "NVIDIA GeForce RTX 4070 SUPER", a consumer writes "RTX-4070S", a spreadsheet
says "4070 Super": `canonical_gpu` maps all of them to one model so specs, offers and
prices talk about the same thing. VRAM, not raw speed, decides what a card can hold, so
every model carries its memory; where one name has several memory sizes (A100 40/80 GB)
the reported memory picks the variant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idlegrid.errors import InvalidRequest


@dataclass(frozen=True)
class GpuModel:
    """One canonical accelerator model with its datasheet numbers."""

    name: str
    vendor: str
    vram_gb: float
    tier: str  # consumer | workstation | datacenter | apple | cpu
    fp16_tflops: float  # dense tensor throughput, datasheet
    mem_bw_gbs: float
    rated_w: float
    aliases: tuple[str, ...] = ()


def _g(
    name: str,
    vendor: str,
    vram: float,
    tier: str,
    tflops: float,
    bw: float,
    watts: float,
    *aliases: str,
) -> GpuModel:
    return GpuModel(name, vendor, vram, tier, tflops, bw, watts, aliases)


GPUS: tuple[GpuModel, ...] = (
    _g("RTX-3060", "nvidia", 12, "consumer", 51, 360, 170),
    _g("RTX-3060-Ti", "nvidia", 8, "consumer", 65, 448, 200),
    _g("RTX-3070", "nvidia", 8, "consumer", 81, 448, 220),
    _g("RTX-3080", "nvidia", 10, "consumer", 119, 760, 320, "RTX-3080-10GB"),
    _g("RTX-3090", "nvidia", 24, "consumer", 142, 936, 350),
    _g("RTX-4060", "nvidia", 8, "consumer", 60, 272, 115),
    _g("RTX-4060-Ti", "nvidia", 8, "consumer", 88, 288, 160),
    _g("RTX-4060-Ti-16GB", "nvidia", 16, "consumer", 88, 288, 165),
    _g("RTX-4070", "nvidia", 12, "consumer", 117, 504, 200),
    _g("RTX-4070S", "nvidia", 12, "consumer", 142, 504, 220, "RTX-4070-SUPER"),
    _g("RTX-4070-Ti", "nvidia", 12, "consumer", 160, 504, 285),
    _g("RTX-4080", "nvidia", 16, "consumer", 195, 717, 320),
    _g("RTX-4090", "nvidia", 24, "consumer", 330, 1008, 450),
    _g("RTX-5090", "nvidia", 32, "consumer", 419, 1792, 575),
    _g("RTX-A6000", "nvidia", 48, "workstation", 155, 768, 300, "A6000"),
    _g("RTX-6000-Ada", "nvidia", 48, "workstation", 365, 960, 300, "RTX-6000-ADA-GENERATION"),
    _g("L4", "nvidia", 24, "datacenter", 121, 300, 72),
    _g("A10", "nvidia", 24, "datacenter", 125, 600, 150, "A10G"),
    _g("L40S", "nvidia", 48, "datacenter", 362, 864, 350),
    _g("A100-40GB", "nvidia", 40, "datacenter", 312, 1555, 400),
    _g("A100-80GB", "nvidia", 80, "datacenter", 312, 2039, 400),
    _g("H100-PCIe", "nvidia", 80, "datacenter", 756, 2000, 350, "H100-PCIE-80GB"),
    _g("H100-SXM", "nvidia", 80, "datacenter", 989, 3350, 700, "H100-SXM5-80GB", "H100-80GB-HBM3"),
    _g("H200", "nvidia", 141, "datacenter", 989, 4800, 700, "H200-SXM-141GB"),
    _g("MI300X", "amd", 192, "datacenter", 1307, 5300, 750, "INSTINCT-MI300X"),
    _g("M2-Max", "apple", 32, "apple", 27, 400, 60, "APPLE-M2-MAX"),
    _g("M3-Max", "apple", 48, "apple", 28, 400, 60, "APPLE-M3-MAX"),
    _g("M4-Max", "apple", 64, "apple", 34, 546, 70, "APPLE-M4-MAX"),
    _g("CPU", "cpu", 0, "cpu", 1, 50, 65),
)

BY_NAME: dict[str, GpuModel] = {g.name: g for g in GPUS}
TIERS = ("consumer", "workstation", "apple", "datacenter", "cpu")

# Words vendors add around the model name; removing them leaves what identifies the chip.
_NOISE = {
    "NVIDIA",
    "GEFORCE",
    "AMD",
    "RADEON",
    "TESLA",
    "APPLE",
    "GRAPHICS",
    "GPU",
    "LAPTOP",
    "GENERATION",
}
_FORM = re.compile(r"^(SXM\d?|PCIE|NVL|HBM\dE?)$")
_MEM = re.compile(r"^(\d+)GB$")


def _tokens(name: str) -> list[str]:
    words = re.findall(r"[A-Z0-9]+", name.upper().replace("SUPER", "S"))
    words = [w for w in words if w not in _NOISE]
    # "RTX 4090", "GeForce 4090" and "4090" are one card.
    if words and words[0] in ("RTX", "GTX") and len(words) > 1:
        words = words[1:]
    return words


def _squash(name: str) -> str:
    return "".join(_tokens(name))


def _bare(name: str) -> tuple[str, float | None]:
    """Name without memory size and form factor, and the memory size it named."""
    mem = None
    kept = []
    for w in _tokens(name):
        if m := _MEM.match(w):
            mem = float(m.group(1))
        elif not _FORM.match(w):
            kept.append(w)
    return "".join(kept), mem


_INDEX: dict[str, str] = {}
for _m in GPUS:
    for _alias in (_m.name, *_m.aliases):
        _INDEX.setdefault(_squash(_alias), _m.name)


def canonical_gpu(name: str, vram_gb: float | None = None) -> str:
    """The canonical model for a device name (and reported memory where names are ambiguous)."""
    key = _squash(name)
    bare, named_mem = _bare(name)
    family = [g for g in GPUS if _bare(g.name)[0] == bare]
    if key in _INDEX and not (vram_gb and len(family) > 1):
        return _INDEX[key]
    if not family:
        if key in _INDEX:
            return _INDEX[key]
        raise InvalidRequest(f"unknown accelerator model '{name}'", param="accelerators")
    # Form factor in the name separates H100 PCIe from SXM; memory picks A100 40 or 80 GB.
    for form in ("SXM", "PCIE"):
        if form in key and len(family) > 1:
            family = [g for g in family if form in g.name.upper()] or family
    mem = named_mem if named_mem is not None else vram_gb
    if mem is not None:
        family.sort(key=lambda g: (abs(g.vram_gb - mem), g.vram_gb))
    return family[0].name


def gpu(name: str) -> GpuModel:
    """The catalog entry for a canonical (or any recognisable) name."""
    return BY_NAME[canonical_gpu(name)]


@dataclass(frozen=True)
class Device:
    """A group of identical accelerators in one host."""

    model: str  # canonical
    count: int = 1
    vram_gb: float = 0.0  # per device; defaults to the model's
    interface: str = ""  # PCIe | SXM | NVLink | unified
    vendor: str = ""

    @property
    def info(self) -> GpuModel:
        """Datasheet numbers for this device's model."""
        return BY_NAME[self.model]


@dataclass(frozen=True)
class Hardware:
    """What a provider advertises: devices, host, measured speed, power, region, record."""

    provider: str
    region: str
    devices: tuple[Device, ...]
    cpus: int = 1
    ram_gb: float = 0.0
    tokens_per_s: Mapping[str, float] = field(default_factory=dict)  # model -> decode tok/s
    matmul_tflops: float = 0.0  # measured
    mem_bw_gbs: float = 0.0  # measured
    power_w: float | None = None  # reported by the hardware; None where it cannot tell
    reliability: float = 1.0  # uptime × success ratio, 0..1
    verified: bool = False  # speed backed by a hardware proof


def device_class(device: Device) -> str:
    """The class a stake is posted for: the canonical model (VRAM decides what it can do)."""
    return device.model


def device_groups(hardware: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Device groups a probe reports: GPUs by canonical model, else the CPU with its RAM."""
    groups: dict[str, dict[str, Any]] = {}
    for g in hardware.get("gpus") or []:
        vram = (g.get("vram_bytes") or 0) / 1e9 or None
        try:
            model = canonical_gpu(str(g.get("name", "")), vram)
        except InvalidRequest:
            continue  # a device we cannot name is not sold; the node still serves tokens
        d = groups.setdefault(
            model, {"model": model, "count": 0, "vram_gb": vram or BY_NAME[model].vram_gb}
        )
        d["count"] += 1
    if not groups:
        ram = (hardware.get("ram_bytes") or 0) / 1e9
        groups["CPU"] = {"model": "CPU", "count": 1, "vram_gb": round(ram, 1)}
    return list(groups.values())
