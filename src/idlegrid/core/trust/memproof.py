"""Hardware proofs, part 2: the memory-capacity challenge. Pure (numpy only).

Fill: W = S·L uint32 words in L lanes of S steps; word[s][l] is R rounds of lowbias32 over
word[s-1][l], so a word can only be rebuilt by replaying its lane up to s (s·R rounds).
Chase: after the fill is done the challenger reveals a second seed; P chases of Q steps each
read word[a] and hash it into the next address, so every read depends on the one before and
the addresses cannot be known ahead. The prover returns the Q×P values it read; the
challenger checks the addresses follow from the values (cheap, vectorised), replays a
random sample of the words, and compares the chase time it measured with the budget.

Limits (measured and argued in docs/trust.md): a prover that keeps only every k-th step of
each lane answers a read with k/2·R extra rounds. Against a numpy prover that is decisive;
against native SIMD code (~0.3 ns a round) the time budget only proves about W/k words with
k ≈ budget per read / (R/2 · 0.3 ns). The proof is a lower bound on memory, not a measure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from idlegrid.core.trust.hwproof import GOLDEN, lowbias32

U32 = npt.NDArray[np.uint32]
LANES = 4096


def _key(seed: bytes, tag: str) -> np.uint32:
    return np.uint32(int.from_bytes(hashlib.sha256(seed + tag.encode()).digest()[:4], "little"))


@dataclass(frozen=True)
class MemSpec:
    """Size and shape of one memory challenge."""

    words: int  # multiple of LANES
    rounds: int = 8
    chases: int = 512
    steps: int = 128
    samples: int = 64

    @property
    def depth(self) -> int:
        """Steps per lane."""
        return self.words // LANES

    @staticmethod
    def for_bytes(nbytes: float, rounds: int = 8) -> MemSpec:
        """The challenge for a claimed capacity (rounded down to whole lane rows)."""
        depth = max(1, int(nbytes // (4 * LANES)))
        return MemSpec(words=depth * LANES, rounds=rounds)


def _step(prev: U32, s: int, k: np.uint32, rounds: int) -> U32:
    with np.errstate(over="ignore"):
        x = prev ^ (np.uint32((s * GOLDEN) & 0xFFFFFFFF) + k)
        for _ in range(rounds):
            lowbias32(x)
            x += k
    return x


def fill(seed: bytes, spec: MemSpec) -> U32:
    """The whole buffer, step-major (index s·LANES + l)."""
    k = _key(seed, "fill")
    buf = np.empty(spec.words, dtype=np.uint32)
    with np.errstate(over="ignore"):
        row = np.arange(LANES, dtype=np.uint32) * np.uint32(GOLDEN) + k
    row = _step(row, 0, k, spec.rounds)
    buf[:LANES] = row
    for s in range(1, spec.depth):
        row = _step(row, s, k, spec.rounds)
        buf[s * LANES : (s + 1) * LANES] = row
    return buf


def words_at(seed: bytes, spec: MemSpec, addrs: npt.NDArray[np.int64]) -> U32:
    """Replay the lanes of some addresses (the challenger's spot check; s·R rounds each)."""
    k = _key(seed, "fill")
    steps, lanes = addrs // LANES, addrs % LANES
    with np.errstate(over="ignore"):
        x = lanes.astype(np.uint32) * np.uint32(GOLDEN) + k
    out = np.zeros(len(addrs), dtype=np.uint32)
    for s in range(int(steps.max()) + 1 if len(addrs) else 0):
        x = _step(x, s, k, spec.rounds)
        hit = steps == s
        out[hit] = x[hit]
    return out


def _next(
    values: U32, addrs: npt.NDArray[np.int64], t: int, kc: np.uint32, words: int
) -> npt.NDArray[np.int64]:
    with np.errstate(over="ignore"):
        x = values ^ addrs.astype(np.uint32) ^ (np.uint32((t * GOLDEN) & 0xFFFFFFFF) + kc)
        lowbias32(x)
    return (x % np.uint32(words)).astype(np.int64)


def _starts(chase_seed: bytes, spec: MemSpec) -> npt.NDArray[np.int64]:
    kc = _key(chase_seed, "chase")
    with np.errstate(over="ignore"):
        x = np.arange(spec.chases, dtype=np.uint32) * np.uint32(GOLDEN) + kc
        lowbias32(x)
    return (x % np.uint32(spec.words)).astype(np.int64)


def chase(buf: U32, chase_seed: bytes, spec: MemSpec) -> U32:
    """The prover's answer: the (steps × chases) values read, in order."""
    kc = _key(chase_seed, "chase")
    addrs = _starts(chase_seed, spec)
    out = np.empty((spec.steps, spec.chases), dtype=np.uint32)
    for t in range(spec.steps):
        v = buf[addrs]
        out[t] = v
        addrs = _next(v, addrs, t, kc, spec.words)
    return out


@dataclass(frozen=True)
class MemVerdict:
    """Whether the chase is consistent, its sampled words right, and in time."""

    passed: bool
    wrong_samples: int
    elapsed_s: float
    budget_s: float
    reasons: tuple[str, ...]


def budget_s(spec: MemSpec, ns_per_read: float, rtt_s: float) -> float:
    """Time the chase may take."""
    return spec.chases * spec.steps * ns_per_read * 1e-9 + rtt_s


def judge(
    seed: bytes,
    chase_seed: bytes,
    spec: MemSpec,
    trace: U32,
    elapsed_s: float,
    sample_seed: bytes,
    ns_per_read: float = 2000.0,
    rtt_s: float = 0.5,
) -> MemVerdict:
    """Rebuild the addresses from the values, replay sampled words, check the time."""
    reasons: list[str] = []
    if trace.shape != (spec.steps, spec.chases):
        return MemVerdict(False, 0, elapsed_s, 0.0, ("trace has the wrong shape",))
    kc = _key(chase_seed, "chase")
    addrs = np.empty_like(trace, dtype=np.int64)
    a = _starts(chase_seed, spec)
    for t in range(spec.steps):
        addrs[t] = a
        a = _next(trace[t], a, t, kc, spec.words)
    rng = np.random.Generator(
        np.random.Philox(key=int.from_bytes(hashlib.sha256(sample_seed).digest()[:8], "little"))
    )
    pick = rng.choice(trace.size, size=min(spec.samples, trace.size), replace=False)
    want = words_at(seed, spec, addrs.reshape(-1)[pick])
    wrong = int(np.count_nonzero(want != trace.reshape(-1)[pick]))
    if wrong:
        reasons.append(f"{wrong} of {len(pick)} sampled reads are not the filled words")
    budget = budget_s(spec, ns_per_read, rtt_s)
    if elapsed_s > budget:
        reasons.append(f"chase took {elapsed_s:.3f} s; budget {budget:.3f} s")
    return MemVerdict(not reasons, wrong, elapsed_s, budget, tuple(reasons))
