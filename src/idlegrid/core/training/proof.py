"""What a training provider commits per segment, and the verdict on a verifier's replay.

Per step s the provider hashes its full state AFTER that step (weights, optimizer state,
step counter) into a 32-byte `state_hash`; the leaf is (step, state_hash, loss). One
`TrainingCommitment` covers the k steps of a segment: a Merkle tree over the leaves, plus
the hash of the state the segment started from, which must equal the previous segment's
last leaf (or, for the first segment, the hash of the initial state derived from the
spec's seed). So the commitments of a job form one chain of custody from W0 to the end,
and every break in it lies inside some segment, where a replay of that segment sees it.

A provider commits before any audit draw for that segment (`select_segment` hashes the
commitment digest with a beacon secret revealed later). The loss is committed too, but it
is evidence, not proof: the state hashes and the replay are what decide.

Judging: within one determinism class a replay is bitwise, so hashes (and losses) must be
equal. Across classes the verifier replays from the provider's own committed start
checkpoint and compares per-step losses and the relative distance of the end weights
(thresholds profiled from honest cross-class pairs; see docs/training.md).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from idlegrid.core.trust import beacon
from idlegrid.core.trust.economics import p_star
from idlegrid.core.trust.merkle import Proof, merkle_proof, merkle_root, verify_proof
from idlegrid.errors import InvalidRequest

VERSION = 1
MAGIC = b"IGTC"
HASH_LEN = 32
MAX_LEAVES = 1 << 20
_LEAF = struct.Struct("<Q32sd")
_HEAD = struct.Struct("<4sBH")  # magic, version, job id length
_TAIL = struct.Struct("<Q32sI")  # start step, start hash, leaf count
AUDIT_DOMAIN = b"train-audit"

# Cross-class thresholds, profiled from honest pairs (1 vs 2 CPU threads; docs/training.md
# has the measured distributions): honest end-weight distances stay near 1e-4 of the
# segment's update norm and per-step loss differences below 1e-6, while the mildest cheats
# (bf16 autocast, 5 % noise per update) land at 7e-3 and above and 4e-4 in loss. The
# thresholds sit >= 15x above the largest honest value and below every cheat.
WEIGHT_TOL = 2e-3
LOSS_TOL = 1e-4


@dataclass(frozen=True)
class StepLeaf:
    """The state after one step: its hash and the training loss of that step."""

    step: int
    state_hash: bytes
    loss: float


def leaf_bytes(leaf: StepLeaf) -> bytes:
    """Canonical 48-byte encoding: uint64 step, 32-byte hash, float64 loss (little-endian)."""
    return _LEAF.pack(leaf.step, leaf.state_hash, leaf.loss)


def _bad(msg: str) -> InvalidRequest:
    return InvalidRequest(f"bad training commitment: {msg}", param="commitment")


def check_leaves(start_step: int, leaves: Sequence[StepLeaf]) -> None:
    """Raise InvalidRequest unless leaves are consecutive from start_step, hashes 32 bytes,
    losses finite."""
    if not leaves:
        raise _bad("no leaves")
    if len(leaves) > MAX_LEAVES:
        raise _bad(f"{len(leaves)} leaves, at most {MAX_LEAVES}")
    for i, leaf in enumerate(leaves):
        if leaf.step != start_step + i:
            raise _bad(f"leaf {i} is step {leaf.step}, expected {start_step + i}")
        if not isinstance(leaf.state_hash, bytes) or len(leaf.state_hash) != HASH_LEN:
            raise _bad(f"leaf {i} state hash is not {HASH_LEN} bytes")
        if not math.isfinite(leaf.loss):
            raise _bad(f"leaf {i} loss is not finite")


@dataclass(frozen=True)
class TrainingCommitment:
    """A provider's commitment to one segment [start_step, start_step + len(leaves))."""

    job_id: str
    start_step: int
    leaves: Sequence[StepLeaf]  # stored as a tuple
    start_hash: bytes
    _root: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaves", tuple(self.leaves))
        if not 0 <= self.start_step < 1 << 63:
            raise _bad("start step out of range")
        if not isinstance(self.start_hash, bytes) or len(self.start_hash) != HASH_LEN:
            raise _bad(f"start hash is not {HASH_LEN} bytes")
        job = self.job_id.encode()
        if not 0 < len(job) <= 200:
            raise _bad("job id must be 1..200 bytes")
        check_leaves(self.start_step, self.leaves)
        object.__setattr__(self, "_root", merkle_root([leaf_bytes(x) for x in self.leaves]))

    @property
    def root(self) -> bytes:
        """Merkle root over the leaves' canonical bytes."""
        return self._root

    @property
    def end_step(self) -> int:
        """One past the last step covered."""
        return self.start_step + len(self.leaves)

    @property
    def end_hash(self) -> bytes:
        """Hash of the state at the end of the segment (the next segment's start hash)."""
        return self.leaves[-1].state_hash

    def to_bytes(self) -> bytes:
        """Compact binary form: header, job id, start step/hash, count, then 48 B per leaf."""
        job = self.job_id.encode()
        return b"".join(
            [
                _HEAD.pack(MAGIC, VERSION, len(job)),
                job,
                _TAIL.pack(self.start_step, self.start_hash, len(self.leaves)),
                *(leaf_bytes(x) for x in self.leaves),
            ]
        )

    @staticmethod
    def from_bytes(data: bytes) -> TrainingCommitment:
        """Strict parse of `to_bytes` output; raises InvalidRequest on anything malformed."""
        if len(data) < _HEAD.size:
            raise _bad("truncated header")
        magic, version, jlen = _HEAD.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
            raise _bad("unknown magic or version")
        off = _HEAD.size
        if len(data) < off + jlen + _TAIL.size:
            raise _bad("truncated header")
        try:
            job = data[off : off + jlen].decode()
        except UnicodeDecodeError:
            raise _bad("job id is not UTF-8") from None
        off += jlen
        start, start_hash, n = _TAIL.unpack_from(data, off)
        off += _TAIL.size
        if n > MAX_LEAVES or len(data) != off + n * _LEAF.size:
            raise _bad(f"length {len(data)} does not fit {n} leaves")
        leaves = []
        for i in range(n):
            step, h, loss = _LEAF.unpack_from(data, off + i * _LEAF.size)
            leaves.append(StepLeaf(step, h, loss))
        return TrainingCommitment(job, start, tuple(leaves), start_hash)

    def digest(self) -> bytes:
        """SHA-256 of the binary form: what the audit beacon and the signature cover."""
        return hashlib.sha256(self.to_bytes()).digest()

    def leaf(self, step: int) -> StepLeaf:
        """The committed leaf of `step`."""
        if not self.start_step <= step < self.end_step:
            raise IndexError(f"step {step} is not in [{self.start_step}, {self.end_step})")
        return self.leaves[step - self.start_step]

    def proof(self, step: int) -> Proof:
        """Merkle inclusion proof of the leaf of `step`."""
        self.leaf(step)
        return merkle_proof([leaf_bytes(x) for x in self.leaves], step - self.start_step)

    def follows(self, previous: TrainingCommitment) -> bool:
        """True if this segment starts exactly where `previous` ended (same job, same state)."""
        return (
            self.job_id == previous.job_id
            and self.start_step == previous.end_step
            and self.start_hash == previous.end_hash
        )


def verify_leaf(root: bytes, leaf: StepLeaf, proof: Proof) -> bool:
    """True if `leaf` is committed under `root` at the position the proof names."""
    return verify_proof(root, leaf_bytes(leaf), proof)


def audit_rate(
    price_per_step: int,
    interval: int,
    stake: int,
    *,
    detect: float = 0.99,
    rho: float = 0.1,
    safety: float = 2.0,
) -> float:
    """Steady audit rate for a job's segments: safety × p*, p* = G / (d(1−ρ)(S+F)).

    Per segment the price is R = price_per_step × interval; a cheat gains at most G = R
    (paid for work not done), forfeits at least that segment's unpaid escrow F = R, and
    loses the job stake S (research note §7.9, core/trust/economics.py)."""
    r = price_per_step * interval
    if r <= 0:
        return 0.0
    return min(1.0, safety * p_star(r, detect, rho, stake, r))


def probe_ok(expected_hash: bytes, data: bytes | None) -> bool:
    """Availability probe: the provider produced bytes that hash to the committed state
    (a checkpoint's bytes are exactly what its state hash covers)."""
    return data is not None and hashlib.sha256(data).digest() == expected_hash


def select_segment(secret: bytes, commitment_digest: bytes, p: float) -> bool:
    """True if the segment with this commitment digest is audited at rate p (beacon draw)."""
    return beacon.selected(secret, commitment_digest, p, domain=AUDIT_DOMAIN)


@dataclass(frozen=True)
class Verdict:
    """The outcome of judging one replayed segment; `detail` carries the statistics."""

    ok: bool
    first_bad_step: int | None
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


def judge_segment(
    committed: Sequence[StepLeaf],
    recomputed: Sequence[StepLeaf],
    *,
    exact: bool,
    loss_tol: float = LOSS_TOL,
    weight_dist: float | None = None,
    weight_tol: float = WEIGHT_TOL,
) -> Verdict:
    """Compare a verifier's replay with the provider's committed leaves.

    exact: the first step whose state hash or loss differs is the fault.
    tolerance: the first step whose loss differs by more than `loss_tol` is the fault; else
    the end-of-segment weight distance (relative to the segment's update norm, measured by
    the verifier against the provider's committed end checkpoint) must be within
    `weight_tol`, and a missing distance is itself a failure.
    """
    if not committed:
        return Verdict(False, None, "nothing committed")
    first = committed[0].step
    if len(recomputed) != len(committed) or any(
        c.step != r.step for c, r in zip(committed, recomputed, strict=True)
    ):
        return Verdict(
            False,
            first,
            "replay does not cover the committed steps",
            {"committed": len(committed), "recomputed": len(recomputed)},
        )
    diffs = [abs(c.loss - r.loss) for c, r in zip(committed, recomputed, strict=True)]
    detail: dict[str, Any] = {
        "max_loss_diff": max(diffs),
        "weight_dist": weight_dist,
        "exact": exact,
    }
    if exact:
        for c, r in zip(committed, recomputed, strict=True):
            if c.state_hash != r.state_hash:
                return Verdict(False, c.step, "state hash differs", detail)
            if c.loss != r.loss:
                return Verdict(False, c.step, "loss differs", detail)
        return Verdict(True, None, "bitwise identical", detail)
    for c, d in zip(committed, diffs, strict=True):
        if not d <= loss_tol:
            return Verdict(False, c.step, f"loss off by {d:.3g} > {loss_tol:.3g}", detail)
    if weight_dist is None or not math.isfinite(weight_dist):
        return Verdict(False, committed[-1].step, "no end-weight distance reported", detail)
    if weight_dist > weight_tol:
        return Verdict(
            False,
            committed[-1].step,
            f"end weights off by {weight_dist:.3g} > {weight_tol:.3g}",
            detail,
        )
    return Verdict(True, None, "within the profiled cross-class tolerance", detail)


def canary_commitment(honest: TrainingCommitment, seed: int) -> TrainingCommitment:
    """A known-wrong commitment for a lazy-verifier check: the honest segment with its state
    hashes corrupted from a seeded step on (losses nudged too, so a verifier cannot spot the
    canary by the loss curve alone being off-pattern). A verifier that replays sees the
    mismatch; one that approves without replaying is caught."""
    n = len(honest.leaves)
    h = hashlib.sha256(b"idlegrid-canary\x00" + seed.to_bytes(8, "little") + honest.digest())
    from_i = int.from_bytes(h.digest()[:8], "little") % n
    leaves = list(honest.leaves)
    for i in range(from_i, n):
        x = leaves[i]
        bad = hashlib.sha256(b"canary\x00" + h.digest() + x.state_hash).digest()
        leaves[i] = StepLeaf(x.step, bad, x.loss * (1 + 1e-3))
    return TrainingCommitment(honest.job_id, honest.start_step, tuple(leaves), honest.start_hash)


def verifier_report_matches(
    truth: Sequence[StepLeaf],
    reported: Sequence[StepLeaf],
    *,
    exact: bool,
    loss_tol: float = LOSS_TOL,
) -> bool:
    """Did a verifier report what a real replay gives? Used on canaries, where the protocol
    knows the honest leaves: a lazy verifier that echoes the commitment fails this."""
    if len(truth) != len(reported):
        return False
    for t, r in zip(truth, reported, strict=True):
        if t.step != r.step:
            return False
        if exact and t.state_hash != r.state_hash:
            return False
        if not abs(t.loss - r.loss) <= loss_tol:
            return False
    return True
