"""Hardware proofs, part 1: the seeded matrix-multiply challenge. Pure (numpy only).

The challenger draws a seed the provider cannot predict; A (n×n) and B (n×n) follow from
it through a counter-mode hash per element (lowbias32 of the element's index, keyed by the
seed), so no entry is a function of i+j (the Hankel shortcut found in SN27's challenge)
and the provider must do the full O(n³) product. The provider returns a Merkle root over
the rows of C = A·B (float32); the challenger stamps the time itself, then opens r random
rows and recomputes each in O(n²) from one row of A and all of B. Partial work passes with
probability f^r; a lower-precision product misses the tolerance; a slower device misses the
time budget for the device it claims.

The PRF works on uint32 in numpy and on int64 with masks in torch, with the same values, so
a GPU agent generates A and B on the device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from idlegrid.core.trust import merkle

GOLDEN = 0x9E3779B1
M1, M2 = 0x7FEB352D, 0x846CA68B
# Values on a grid exact in the challenge dtype: 24 bits for fp32, 11 for fp16.
VALUE_BITS = {"fp32": 24, "fp16": 11}
# Relative RMS error of a row against the float64 reference. Honest fp32 accumulation
# measures ~1e-7; bf16 inputs ~2e-3, fp16 inputs on an fp32 challenge ~2e-4, TF32 ~5e-4.
ROW_TOLERANCE = 1e-5

F32 = npt.NDArray[np.float32]


def key(seed: bytes, tag: str) -> int:
    """A 32-bit PRF key for one matrix of one challenge."""
    return int.from_bytes(hashlib.sha256(seed + b"\x00" + tag.encode()).digest()[:4], "little")


def lowbias32(x: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """Chris Wellons' lowbias32 integer hash, in place on a uint32 array (wraps mod 2³²)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(M1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(M2)
    x ^= x >> np.uint32(16)
    return x


def values(k: int, start: int, count: int, bits: int) -> F32:
    """`count` challenge values from element index `start` on: uniform on a grid in [-1, 1)."""
    with np.errstate(over="ignore"):
        x = np.arange(start, start + count, dtype=np.uint64).astype(np.uint32)
        x *= np.uint32(GOLDEN)
        x += np.uint32(k)
        lowbias32(x)
    out = (x >> np.uint32(32 - bits)).astype(np.float32)
    out *= np.float32(2.0 / (1 << bits))
    out -= np.float32(1.0)
    return out


def matrix(seed: bytes, tag: str, n: int, bits: int) -> F32:
    """A whole n×n challenge matrix ("A" or "B")."""
    return values(key(seed, tag), 0, n * n, bits).reshape(n, n)


def rows_of(seed: bytes, tag: str, rows: Sequence[int], n: int, bits: int) -> F32:
    """Selected rows of a challenge matrix, without building the rest."""
    k = key(seed, tag)
    return (
        np.stack([values(k, i * n, n, bits) for i in rows])
        if rows
        else np.zeros((0, n), np.float32)
    )


def row_leaf(row: npt.NDArray[np.floating]) -> bytes:
    """The Merkle leaf of one row of C: its float32 little-endian bytes."""
    return np.ascontiguousarray(row, dtype="<f4").tobytes()


def commit_rows(c: npt.NDArray[np.floating]) -> tuple[bytes, list[bytes]]:
    """Merkle root over the rows of C, and the leaves (kept to open rows later)."""
    leaves = [row_leaf(r) for r in c]
    return merkle.merkle_root(leaves), leaves


def open_rows(secret: bytes, root: bytes, n: int, r: int) -> list[int]:
    """The r distinct rows to open, drawn after the root is known (the provider cannot aim)."""
    r = min(r, n)
    out: list[int] = []
    ctr = 0
    while len(out) < r:
        h = hashlib.sha256(b"open\x00" + secret + root + ctr.to_bytes(4, "little")).digest()
        i = int.from_bytes(h[:8], "little") % n
        if i not in out:
            out.append(i)
        ctr += 1
    return out


def row_error(a_row: F32, b: F32, got: F32) -> float:
    """Relative RMS error of a returned row of C against the float64 reference."""
    ref = a_row.astype(np.float64) @ b.astype(np.float64)
    scale = float(np.sqrt(np.mean(ref * ref))) or 1.0
    if got.shape != ref.shape or not np.all(np.isfinite(got)):
        return math.inf
    return float(np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2))) / scale


# ---- timing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How long the claimed device may take, from seed sent to root received."""

    compute_s: float  # 2n³ at the claimed rate
    overhead_s: float  # generating A, B and hashing C, plus the round trip
    total_s: float


@dataclass(frozen=True)
class TimingModel:
    """Calibrated constants of the time budget (docs/trust.md, "Hardware proofs")."""

    gpu_efficiency: float = 0.25  # share of datasheet fp16 TFLOP/s a plain torch matmul reaches
    cpu_floor_gflops: float = 1.0  # any CPU that serves tokens does ≥8× this (measured)
    host_ns_per_element: float = 150.0  # numpy PRF + hash per element, ~4× this box's worst
    device_ns_per_element: float = 10.0  # PRF on the device + copying C out + hashing
    rtt_s: float = 0.5  # network round trip and scheduling slack

    def budget(self, n: int, claimed_tflops: float, on_device: bool) -> Budget:
        """Time the claimed device may take for an n×n challenge."""
        compute = 2.0 * n**3 / (claimed_tflops * 1e12)
        per = self.device_ns_per_element if on_device else self.host_ns_per_element
        overhead = 3 * n * n * per * 1e-9 + self.rtt_s
        return Budget(compute, overhead, compute + overhead)

    def proven_tflops(self, n: int, elapsed_s: float, on_device: bool) -> float:
        """The throughput the measured time proves, as a lower bound (TFLOP/s): the whole
        elapsed time counts as compute, so a fast prover is never credited with more."""
        del on_device  # the overhead allowance only widens the budget, never the proof
        return 2.0 * n**3 / max(elapsed_s, 1e-6) / 1e12


@dataclass(frozen=True)
class Spec:
    """What a claim is challenged with."""

    claimed: str  # canonical device class
    n: int
    dtype: str  # fp16 for accelerators (tensor throughput), fp32 for CPUs
    open_rows: int
    claimed_tflops: float  # the rate the budget assumes (after efficiency)
    on_device: bool


def spec_for(
    claimed: str,
    catalog: Mapping[str, float],
    model: TimingModel,
    n_gpu: int = 4096,
    n_cpu: int = 1024,
    open_rows_count: int = 16,
) -> Spec:
    """Challenge size and rate for a claimed class (`catalog`: class -> datasheet TFLOP/s)."""
    if claimed == "CPU":
        return Spec(
            claimed, n_cpu, "fp32", open_rows_count, model.cpu_floor_gflops / 1000, on_device=False
        )
    tflops = catalog[claimed] * model.gpu_efficiency
    return Spec(claimed, n_gpu, "fp16", open_rows_count, tflops, on_device=True)


def proven_class(
    tflops: float, catalog: Mapping[str, float], model: TimingModel, cpu_ok: bool = True
) -> str | None:
    """The fastest class whose assumed rate the measured rate reaches (CPU at the floor)."""
    fits = [
        (rate * model.gpu_efficiency, name)
        for name, rate in catalog.items()
        if name != "CPU" and rate * model.gpu_efficiency <= tflops
    ]
    if fits:
        return max(fits)[1]
    return "CPU" if cpu_ok and tflops * 1000 >= model.cpu_floor_gflops else None


# ---- verdict ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opening:
    """One opened row: its values and the Merkle path to the committed root."""

    index: int
    row: F32
    proof: merkle.Proof


@dataclass(frozen=True)
class Verdict:
    """Whether a matmul proof backs the claim, and what it proves otherwise."""

    passed: bool
    correct: bool
    in_time: bool
    elapsed_s: float
    budget_s: float
    worst_error: float
    proven_tflops: float
    reasons: tuple[str, ...]


def judge(
    spec: Spec,
    seed: bytes,
    root: bytes,
    wanted: Sequence[int],
    openings: Sequence[Opening],
    elapsed_s: float,
    model: TimingModel,
    tolerance: float = ROW_TOLERANCE,
) -> Verdict:
    """Check every wanted row (path and value) and the time the challenger measured."""
    reasons: list[str] = []
    bits = VALUE_BITS[spec.dtype]
    by_index = {o.index: o for o in openings}
    worst = 0.0
    missing = [i for i in wanted if i not in by_index]
    if missing:
        reasons.append(f"rows {missing[:4]} not opened")
    present = [i for i in wanted if i in by_index]
    b = matrix(seed, "B", spec.n, bits) if present else np.zeros((0, 0), np.float32)
    a_rows = rows_of(seed, "A", present, spec.n, bits)
    for a_row, i in zip(a_rows, present, strict=True):
        o = by_index[i]
        if o.row.shape != (spec.n,) or not merkle.verify_proof(root, row_leaf(o.row), o.proof):
            reasons.append(f"row {i}: Merkle path does not match the root")
            worst = math.inf
            continue
        err = row_error(a_row, b, o.row)
        worst = max(worst, err)
        if not err <= tolerance:
            reasons.append(f"row {i}: error {err:.2e} above {tolerance:.0e}")
    correct = not reasons
    budget = model.budget(spec.n, spec.claimed_tflops, spec.on_device)
    in_time = elapsed_s <= budget.total_s
    if not in_time:
        reasons.append(f"took {elapsed_s:.3f} s; a {spec.claimed} may take {budget.total_s:.3f} s")
    proven = model.proven_tflops(spec.n, elapsed_s, spec.on_device) if correct else 0.0
    return Verdict(
        correct and in_time,
        correct,
        in_time,
        elapsed_s,
        budget.total_s,
        worst,
        proven,
        tuple(reasons),
    )


def detection_probability(fraction_done: float, opened: int) -> float:
    """P(caught) for a provider that computed only `fraction_done` of the rows."""
    return 1.0 - fraction_done**opened


def late_only(kind: str, verdict: Mapping[str, Any]) -> bool:
    """Whether a failed proof's only fault is its time, the answer being right: a prover
    busy with other work can be late once, and is re-tried; one that lacks the hardware is
    late again (docs/trust.md, "Hardware proofs")."""
    if verdict.get("passed"):
        return False
    if kind == "matmul":
        return bool(verdict.get("correct")) and verdict.get("in_time") is False
    return (
        verdict.get("wrong_samples") == 0
        and len(verdict.get("reasons") or ()) == 1
        and float(verdict.get("elapsed_s") or 0.0) > float(verdict.get("budget_s") or math.inf)
    )
