"""Topology model: devices, latency and bandwidth matrices, the model to train, JSON in/out.

Every validation failure raises `InvalidRequest` whose `param` names the offending field
in JSON-path form (`bandwidth_gbps[2][5]`, `devices[3].memory_gb`, `model.layers`), so a
CLI or an HTTP edge can point the user at the exact number to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from idlegrid.errors import InvalidRequest

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
OBJECTIVES = ("full", "dtfm")
COMPRESSION_BITS = (2, 3, 4, 8, 16, 32)
DEFAULT_TFLOPS = 125.0  # V100 tensor-core peak: DT-FM's testbed
# Mixed-precision Adam: fp16 weights + fp16 grads + fp32 master, m, v (ZeRO paper's 16 B/param).
TRAIN_BYTES_PER_PARAM = 16
# Live activations of one transformer layer per token, in units of hidden size (Korthikanti et al.).
LAYER_ACT_BYTES_PER_H = 34

FloatMatrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Device:
    """One accelerator: peak dense TFLOPS at the model dtype and memory in GB (None: unknown)."""

    id: str
    region: str
    tflops: float = DEFAULT_TFLOPS
    memory_gb: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-like model and its batch; activation and gradient sizes follow from it."""

    layers: int
    hidden: int
    seq: int
    batch: float  # global batch in sequences (float: DT-FM schedules for 1M tokens / 2048)
    micro_batch: int = 1
    accumulation: int = 1  # pipeline flushes per iteration (gradient accumulation steps)
    dtype: str = "fp16"  # activations on the wire
    grad_dtype: str = "fp32"  # gradients on the wire (DT-FM's scheduler assumes fp32)
    params: float | None = None  # None: 12·L·h² + (vocab + seq)·h
    vocab: int = 50257
    mfu: float = 0.35  # fraction of peak TFLOPS a device sustains on this model
    recompute: bool = True  # activation recomputation (Megatron; DT-FM's FLOP formula)
    activation_bytes: float | None = None  # override: global batch's bytes at one boundary
    gradient_bytes: float | None = None  # override: gradient bytes of the whole model

    @property
    def n_params(self) -> float:
        """Parameter count, given or derived from the shape."""
        if self.params is not None:
            return self.params
        return 12.0 * self.layers * self.hidden**2 + (self.vocab + self.seq) * self.hidden

    def flops_per_sequence_layer(self) -> float:
        """Training FLOPs of one sequence through one layer (Megatron's formula)."""
        # 72·s·h²·(1 + s/6h) forward+backward; recomputation adds one more forward (96).
        factor = 96.0 if self.recompute else 72.0
        return factor * self.seq * self.hidden**2 * (1.0 + self.seq / (6.0 * self.hidden))


@dataclass(frozen=True)
class Compression:
    """Bits on the wire for forward activations, backward activation-gradients, DP gradients."""

    activation_bits: int | None = None  # None: the model dtype, uncompressed
    backward_bits: int | None = None
    gradient_bits: int | None = None


@dataclass(frozen=True)
class Topology:
    """Devices, N×N latency (ms) and bandwidth (Gbit/s, row sends to column), model, shape."""

    devices: tuple[Device, ...]
    latency_ms: tuple[tuple[float, ...], ...]
    bandwidth_gbps: tuple[tuple[float, ...], ...]
    model: ModelSpec
    stages: int
    data_parallel: int
    compression: Compression = Compression()
    objective: str = "full"

    @property
    def n(self) -> int:
        """Number of devices."""
        return len(self.devices)

    def latency_s(self) -> FloatMatrix:
        """Latency matrix in seconds, zero diagonal."""
        lat = np.asarray(self.latency_ms, dtype=np.float64) / 1e3
        np.fill_diagonal(lat, 0.0)
        return lat

    def bandwidth_bps(self) -> FloatMatrix:
        """Bandwidth matrix in bit/s; the diagonal is infinite (no self-transfer cost)."""
        bw = np.asarray(self.bandwidth_gbps, dtype=np.float64) * 1e9
        np.fill_diagonal(bw, np.inf)
        return bw

    def regions(self) -> list[str]:
        """Distinct regions in order of first appearance."""
        return list(dict.fromkeys(d.region for d in self.devices))

    def layers_per_stage(self) -> list[int]:
        """Layers of each pipeline stage; earlier stages take the remainder."""
        base, extra = divmod(self.model.layers, self.stages)
        return [base + (1 if j < extra else 0) for j in range(self.stages)]

    def activation_bytes(self) -> float:
        """Bytes of activations of one macro-batch crossing one stage boundary (c_PP)."""
        m = self.model
        total = m.activation_bytes
        if total is None:
            total = m.batch * m.seq * m.hidden * DTYPE_BYTES[m.dtype]
        return total / self.data_parallel

    def gradient_bytes(self, layers: int | None = None) -> float:
        """Gradient bytes of a stage of `layers` layers (c_DP); default an average stage."""
        m = self.model
        share = (layers if layers is not None else m.layers / self.stages) / m.layers
        total = m.gradient_bytes
        if total is None:
            total = m.n_params * DTYPE_BYTES[m.grad_dtype]
        return total * share

    def micro_batches(self) -> int:
        """Micro-batches per pipeline flush (a macro-batch is `accumulation` flushes)."""
        m = self.model
        return max(1, math.ceil(m.batch / self.data_parallel / m.micro_batch / m.accumulation))

    def stage_memory_gb(self, layers: int) -> float:
        """Approximate training memory of one stage of `layers` layers, in GB."""
        m = self.model
        params = m.n_params * layers / m.layers
        tokens = m.micro_batch * m.seq
        act = DTYPE_BYTES[m.dtype]
        if m.recompute:  # GPipe stashes each layer's input for every micro-batch in flight
            stash = self.micro_batches() * layers * tokens * m.hidden * act
            live: float = LAYER_ACT_BYTES_PER_H * tokens * m.hidden
        else:
            stash = self.micro_batches() * layers * tokens * m.hidden * LAYER_ACT_BYTES_PER_H
            live = 0.0
        return (TRAIN_BYTES_PER_PARAM * params + stash + live) / 1e9


def _fail(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _number(
    value: Any, param: str, *, minimum: float | None = None, positive: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{param} must be a number, got {value!r}", param)
    x = float(value)
    if not math.isfinite(x):
        raise _fail(f"{param} must be finite, got {value!r}", param)
    if positive and x <= 0:
        raise _fail(f"{param} must be positive, got {value!r}", param)
    if minimum is not None and x < minimum:
        raise _fail(f"{param} must be >= {minimum:g}, got {value!r}", param)
    return x


def _integer(value: Any, param: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{param} must be an integer, got {value!r}", param)
    if value < minimum:
        raise _fail(f"{param} must be >= {minimum}, got {value}", param)
    return value


def _matrix(
    raw: Any, name: str, n: int, *, positive_off_diagonal: bool
) -> tuple[tuple[float, ...], ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        raise _fail(f"{name} must be an N×N list of lists (N = {n} devices)", name)
    if len(raw) != n:
        raise _fail(
            f"{name} has {len(raw)} rows but there are {n} devices; it must be {n}×{n}", name
        )
    rows = []
    for i, row in enumerate(raw):
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != n:
            got = len(row) if isinstance(row, Sequence) and not isinstance(row, str) else "no"
            raise _fail(
                f"{name}[{i}] has {got} entries; the matrix must be square ({n}×{n})",
                f"{name}[{i}]",
            )
        vals = []
        for j, v in enumerate(row):
            p = f"{name}[{i}][{j}]"
            x = _number(v, p)
            if x < 0:
                raise _fail(f"{p} is {v}: {name.split('_')[0]} cannot be negative", p)
            if positive_off_diagonal and i != j and x == 0:
                raise _fail(f"{p} is 0: every pair of devices needs a positive bandwidth", p)
            vals.append(x)
        rows.append(tuple(vals))
    return tuple(rows)


def _bits(raw: Mapping[str, Any], key: str) -> int | None:
    if raw.get(key) is None:
        return None
    b = _integer(raw[key], f"compression.{key}")
    if b not in COMPRESSION_BITS:
        raise _fail(
            f"compression.{key} must be one of {COMPRESSION_BITS}, got {b}", f"compression.{key}"
        )
    return b


def _parse_model(raw: Any) -> ModelSpec:
    if not isinstance(raw, Mapping):
        raise _fail("model must be an object with layers, hidden, seq, batch", "model")
    for key in ("layers", "hidden", "seq", "batch"):
        if key not in raw:
            raise _fail(f"model.{key} is required", f"model.{key}")
    dtype = raw.get("dtype", "fp16")
    grad_dtype = raw.get("grad_dtype", "fp32")
    for key, val in (("dtype", dtype), ("grad_dtype", grad_dtype)):
        if val not in DTYPE_BYTES:
            raise _fail(
                f"model.{key} must be one of {sorted(DTYPE_BYTES)}, got {val!r}", f"model.{key}"
            )
    mfu = _number(raw.get("mfu", 0.35), "model.mfu", positive=True)
    if mfu > 1:
        raise _fail(f"model.mfu is a fraction of peak (0, 1], got {mfu}", "model.mfu")

    def opt(key: str) -> float | None:
        v = raw.get(key)
        return None if v is None else _number(v, f"model.{key}", positive=True)

    recompute = raw.get("recompute", True)
    if not isinstance(recompute, bool):
        raise _fail("model.recompute must be true or false", "model.recompute")
    return ModelSpec(
        layers=_integer(raw["layers"], "model.layers"),
        hidden=_integer(raw["hidden"], "model.hidden"),
        seq=_integer(raw["seq"], "model.seq"),
        batch=_number(raw["batch"], "model.batch", positive=True),
        micro_batch=_integer(raw.get("micro_batch", 1), "model.micro_batch"),
        accumulation=_integer(raw.get("accumulation", 1), "model.accumulation"),
        dtype=dtype,
        grad_dtype=grad_dtype,
        params=opt("params"),
        vocab=_integer(raw.get("vocab", 50257), "model.vocab"),
        mfu=mfu,
        recompute=recompute,
        activation_bytes=opt("activation_bytes"),
        gradient_bytes=opt("gradient_bytes"),
    )


def _parse_devices(raw: Any) -> tuple[Device, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise _fail("devices must be a non-empty list of objects with id and region", "devices")
    devices, seen = [], set()
    for i, d in enumerate(raw):
        p = f"devices[{i}]"
        if not isinstance(d, Mapping):
            raise _fail(f"{p} must be an object with id and region", p)
        for key in ("id", "region"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise _fail(f"{p}.{key} must be a non-empty string", f"{p}.{key}")
        if d["id"] in seen:
            raise _fail(f"{p}.id {d['id']!r} is used twice; ids must be unique", f"{p}.id")
        seen.add(d["id"])
        mem = d.get("memory_gb")
        devices.append(
            Device(
                id=d["id"],
                region=d["region"],
                tflops=_number(d.get("tflops", DEFAULT_TFLOPS), f"{p}.tflops", positive=True),
                memory_gb=None if mem is None else _number(mem, f"{p}.memory_gb", positive=True),
            )
        )
    return tuple(devices)


def parse_topology(raw: Mapping[str, Any]) -> Topology:
    """Validate a decoded topology.json and build a Topology (InvalidRequest names the field)."""
    if not isinstance(raw, Mapping):
        raise _fail("a topology must be a JSON object", "topology")
    for key in ("devices", "latency_ms", "bandwidth_gbps", "model", "stages", "data_parallel"):
        if key not in raw:
            raise _fail(f"{key} is required", key)
    devices = _parse_devices(raw["devices"])
    n = len(devices)
    latency = _matrix(raw["latency_ms"], "latency_ms", n, positive_off_diagonal=False)
    bandwidth = _matrix(raw["bandwidth_gbps"], "bandwidth_gbps", n, positive_off_diagonal=True)
    model = _parse_model(raw["model"])
    stages = _integer(raw["stages"], "stages")
    dp = _integer(raw["data_parallel"], "data_parallel")
    if stages > n:
        raise _fail(f"stages is {stages} but there are only {n} devices", "stages")
    if stages * dp != n:
        raise _fail(
            f"stages × data_parallel = {stages}×{dp} = {stages * dp} must equal the "
            f"number of devices ({n})",
            "data_parallel",
        )
    if model.layers < stages:
        raise _fail(
            f"{stages} stages need at least {stages} layers, model.layers is {model.layers}",
            "stages",
        )
    comp_raw = raw.get("compression") or {}
    if not isinstance(comp_raw, Mapping):
        raise _fail("compression must be an object", "compression")
    compression = Compression(
        *(_bits(comp_raw, k) for k in ("activation_bits", "backward_bits", "gradient_bits"))
    )
    objective = raw.get("objective", "full")
    if objective not in OBJECTIVES:
        raise _fail(f"objective must be one of {OBJECTIVES}, got {objective!r}", "objective")
    topo = Topology(devices, latency, bandwidth, model, stages, dp, compression, objective)
    _check_memory(topo)
    return topo


def _check_memory(topo: Topology) -> None:
    need = topo.stage_memory_gb(max(topo.layers_per_stage()))
    known = [(i, d) for i, d in enumerate(topo.devices) if d.memory_gb is not None]
    if not known:
        return
    if all(d.memory_gb is not None and d.memory_gb < need for _, d in known):
        best = max(d.memory_gb or 0.0 for _, d in known)
        raise _fail(
            f"the model fits nowhere: a stage needs about {need:.1f} GB, the largest "
            f"device has {best:g} GB (use more stages, a smaller micro_batch or more "
            f"accumulation)",
            "model",
        )
    for i, d in known:
        if d.memory_gb is not None and d.memory_gb < need:
            raise _fail(
                f"device {d.id!r} has {d.memory_gb:g} GB but every device must hold a "
                f"stage of about {need:.1f} GB",
                f"devices[{i}].memory_gb",
            )


def topology_to_json(topo: Topology) -> dict[str, Any]:
    """The JSON form of a topology; parse_topology(topology_to_json(t)) == t."""
    m = topo.model
    model: dict[str, Any] = {
        "layers": m.layers,
        "hidden": m.hidden,
        "seq": m.seq,
        "batch": m.batch,
        "micro_batch": m.micro_batch,
        "accumulation": m.accumulation,
        "dtype": m.dtype,
        "grad_dtype": m.grad_dtype,
        "vocab": m.vocab,
        "mfu": m.mfu,
        "recompute": m.recompute,
    }
    for key in ("params", "activation_bytes", "gradient_bytes"):
        if getattr(m, key) is not None:
            model[key] = getattr(m, key)
    devices = []
    for d in topo.devices:
        dj: dict[str, Any] = {"id": d.id, "region": d.region, "tflops": d.tflops}
        if d.memory_gb is not None:
            dj["memory_gb"] = d.memory_gb
        devices.append(dj)
    c = topo.compression
    return {
        "devices": devices,
        "latency_ms": [list(r) for r in topo.latency_ms],
        "bandwidth_gbps": [list(r) for r in topo.bandwidth_gbps],
        "model": model,
        "stages": topo.stages,
        "data_parallel": topo.data_parallel,
        "compression": {
            "activation_bits": c.activation_bits,
            "backward_bits": c.backward_bits,
            "gradient_bits": c.gradient_bits,
        },
        "objective": topo.objective,
    }
