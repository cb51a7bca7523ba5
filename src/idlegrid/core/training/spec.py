"""The training job spec: everything that matters is fixed by the consumer, nothing by the provider.

The initial weights derive from `init_seed`, the data order from `job_seed` through
`batch_indices` (a counter-based hash, so any party can reproduce step s alone), the
hyperparameters and the step count from the spec. A provider that wants to cheat has no
free choice left to hide in; the verifier recomputes all of them, never reads them from a
proof (this is what defeats the published proof-of-learning spoofs).

The spec's digest (SHA-256 of its canonical JSON) names the job together with the consumer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from idlegrid.errors import InvalidRequest

MAX_SEED = (1 << 63) - 1
DATASET_REF = re.compile(r"^[a-z][a-z0-9_-]*:[A-Za-z0-9_.-]+$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class ModelSpec:
    """The architecture; byte-level, so the vocabulary is the 256 byte values."""

    arch: str = "gpt"
    vocab: int = 256
    seq: int = 64
    layers: int = 4
    dim: int = 64
    heads: int = 4

    @property
    def params(self) -> int:
        """Parameter count of the GPT in training/gpt.py with this shape."""
        d = self.dim
        # two norms, qkv, proj, and the 4x MLP: 12 d^2 + 13 d per block
        block = 12 * d * d + 13 * d
        embed, head = (self.vocab + self.seq) * d, 2 * d + d * self.vocab + self.vocab
        return embed + self.layers * block + head


@dataclass(frozen=True)
class DatasetSpec:
    """Which data, bound by the hash of its bytes; `windows` training windows are drawn from it."""

    ref: str = "stdlib:v1"
    sha256: str = ""
    windows: int = 2048


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer and its hyperparameters (constant learning rate)."""

    name: str = "adamw"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0


@dataclass(frozen=True)
class JobSpec:
    """One training job as the consumer submits it."""

    dataset: DatasetSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    init_seed: int = 0
    job_seed: int = 0
    batch_size: int = 16
    steps: int = 100
    checkpoint_interval: int = 10
    determinism_class: str | None = None
    price_per_step: int = 1_000
    stake_required: int = 2_000_000  # 200 segments' price at the defaults: p ≈ 1.1 %
    # Data-parallel width: a gang of this many providers runs each step, rank r on the r-th
    # contiguous chunk of the step's batch; a verifier replays it as that many micro-batches.
    parallel: int = 1

    @staticmethod
    def parse(obj: Any) -> JobSpec:
        """Strictly parse a JSON-shaped dict; any unknown, missing or bad field raises."""
        return _parse(obj)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-shaped form (`parse(to_dict())` gives back an equal spec)."""
        out = asdict(self)
        out["optimizer"]["betas"] = list(self.optimizer.betas)
        if self.parallel == 1:  # absent = 1, so specs (and digests) from before it are unchanged
            del out["parallel"]
        return out

    def canonical(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no spaces; floats in repr form)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON."""
        return hashlib.sha256(b"idlegrid-train-spec\x00" + self.canonical()).digest()

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on."""
        return self.batch_size * self.model.seq

    @property
    def escrow_total(self) -> int:
        """µcr the consumer escrows at submission: every step at the spec's price."""
        return self.price_per_step * self.steps

    def segments(self) -> list[tuple[int, int]]:
        """The audit segments of this job."""
        return segments(self.steps, self.checkpoint_interval)


def job_id(spec: JobSpec, consumer: str, nonce: str = "") -> str:
    """A job's id: the spec digest bound to the consumer (and a client nonce for repeats)."""
    h = hashlib.sha256(spec.digest() + b"\x00" + consumer.encode() + b"\x00" + nonce.encode())
    return "job-" + h.hexdigest()[:24]


def batch_indices(job_seed: int, step: int, n_windows: int, batch_size: int) -> list[int]:
    """The windows step `step` trains on: a pure function of (seed, step), sampled with
    replacement by a counter-based hash so no party needs any earlier state to reproduce it."""
    if n_windows < 1 or batch_size < 1 or step < 0:
        raise ValueError("need n_windows >= 1, batch_size >= 1, step >= 0")
    out = []
    for i in range(batch_size):
        h = hashlib.sha256(b"idlegrid-batch\x00" + struct.pack("<QQI", job_seed, step, i)).digest()
        # 64 random bits modulo n: bias below n / 2^64, negligible for any real data set.
        out.append(int.from_bytes(h[:8], "little") % n_windows)
    return out


def segments(steps: int, interval: int) -> list[tuple[int, int]]:
    """Half-open step ranges [a, b) of at most `interval` steps covering 0..steps."""
    if steps < 1 or interval < 1:
        raise ValueError("need steps >= 1 and interval >= 1")
    return [(a, min(a + interval, steps)) for a in range(0, steps, interval)]


def segment_of(step: int, interval: int) -> int:
    """Index of the segment that contains `step`."""
    return step // interval


# ---- parsing --------------------------------------------------------------------------------


def _fields(obj: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field {where}.{unknown[0]}", param=f"{where}.{unknown[0]}")
    return obj


def _int(obj: dict[str, Any], key: str, where: str, default: int | None, lo: int, hi: int) -> int:
    param = f"{where}.{key}"
    if key not in obj:
        if default is None:
            raise InvalidRequest(f"{param} is required", param=param)
        return default
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{param} must be an integer", param=param)
    if not lo <= v <= hi:
        raise InvalidRequest(f"{param} must be in [{lo}, {hi}], got {v}", param=param)
    return v


def _float(
    obj: dict[str, Any],
    key: str,
    where: str,
    default: float,
    lo: float,
    hi: float,
    lo_open: bool = False,
) -> float:
    param = f"{where}.{key}"
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidRequest(f"{param} must be a number", param=param)
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        raise InvalidRequest(
            f"{param} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", param=param
        )
    return v


def _str(
    obj: dict[str, Any],
    key: str,
    where: str,
    default: str | None,
    pattern: re.Pattern[str] | None = None,
    choices: tuple[str, ...] = (),
) -> str:
    param = f"{where}.{key}"
    if key not in obj:
        if default is None:
            raise InvalidRequest(f"{param} is required", param=param)
        return default
    v = obj[key]
    if not isinstance(v, str):
        raise InvalidRequest(f"{param} must be a string", param=param)
    if choices and v not in choices:
        raise InvalidRequest(f"{param} must be one of {', '.join(choices)}", param=param)
    if pattern is not None and not pattern.match(v):
        raise InvalidRequest(f"{param} is malformed", param=param)
    return v


def _parse_model(obj: Any) -> ModelSpec:
    w = "spec.model"
    d = _fields(obj, w, {"arch", "vocab", "seq", "layers", "dim", "heads"})
    arch = _str(d, "arch", w, "gpt", choices=("gpt",))
    vocab = _int(d, "vocab", w, 256, 256, 256)  # byte-level data: exactly the byte values
    seq = _int(d, "seq", w, 64, 4, 4096)
    layers = _int(d, "layers", w, 4, 1, 96)
    dim = _int(d, "dim", w, 64, 8, 8192)
    heads = _int(d, "heads", w, 4, 1, 128)
    if dim % heads:
        raise InvalidRequest(
            f"{w}.dim ({dim}) must be a multiple of heads ({heads})", param=f"{w}.heads"
        )
    return ModelSpec(arch, vocab, seq, layers, dim, heads)


def _parse_dataset(obj: Any) -> DatasetSpec:
    w = "spec.dataset"
    d = _fields(obj, w, {"ref", "sha256", "windows"})
    return DatasetSpec(
        _str(d, "ref", w, "stdlib:v1", DATASET_REF),
        _str(d, "sha256", w, None, HEX64),
        _int(d, "windows", w, 2048, 1, 10_000_000),
    )


def _parse_optimizer(obj: Any) -> OptimizerSpec:
    w = "spec.optimizer"
    d = _fields(obj, w, {"name", "lr", "betas", "weight_decay"})
    name = _str(d, "name", w, "adamw", choices=OPTIMIZERS)
    lr = _float(d, "lr", w, 3e-3, 0.0, 10.0, lo_open=True)
    betas_raw = d.get("betas", [0.9, 0.95])
    if not isinstance(betas_raw, list | tuple) or len(betas_raw) != 2:
        raise InvalidRequest(f"{w}.betas must be a list of two numbers", param=f"{w}.betas")
    b = {"b0": betas_raw[0], "b1": betas_raw[1]}
    betas = (
        _float(b, "b0", f"{w}.betas", 0.9, 0.0, 0.9999),
        _float(b, "b1", f"{w}.betas", 0.95, 0.0, 0.9999),
    )
    wd = _float(d, "weight_decay", w, 0.0, 0.0, 1.0)
    return OptimizerSpec(name, lr, betas, wd)


def _parse(obj: Any) -> JobSpec:
    w = "spec"
    d = _fields(
        obj,
        w,
        {
            "model",
            "dataset",
            "optimizer",
            "init_seed",
            "job_seed",
            "batch_size",
            "steps",
            "checkpoint_interval",
            "determinism_class",
            "price_per_step",
            "stake_required",
            "parallel",
        },
    )
    if "dataset" not in d:
        raise InvalidRequest("spec.dataset is required", param="spec.dataset")
    steps = _int(d, "steps", w, None, 1, 10_000_000)
    interval = _int(d, "checkpoint_interval", w, min(10, steps), 1, steps)
    det = d.get("determinism_class")
    if det is not None and (not isinstance(det, str) or not 0 < len(det) <= 200):
        raise InvalidRequest(
            "spec.determinism_class must be null or a short string", param="spec.determinism_class"
        )
    batch = _int(d, "batch_size", w, 16, 1, 65_536)
    parallel = _int(d, "parallel", w, 1, 1, 64)
    if batch % parallel:
        raise InvalidRequest(
            f"spec.parallel ({parallel}) must divide spec.batch_size ({batch})",
            param="spec.parallel",
        )
    return JobSpec(
        dataset=_parse_dataset(d["dataset"]),
        model=_parse_model(d.get("model", {})),
        optimizer=_parse_optimizer(d.get("optimizer", {})),
        init_seed=_int(d, "init_seed", w, 0, 0, MAX_SEED),
        job_seed=_int(d, "job_seed", w, 0, 0, MAX_SEED),
        batch_size=batch,
        steps=steps,
        checkpoint_interval=interval,
        determinism_class=det,
        price_per_step=_int(d, "price_per_step", w, 1_000, 0, 10**12),
        stake_required=_int(d, "stake_required", w, 2_000_000, 0, 10**15),
        parallel=parallel,
    )
