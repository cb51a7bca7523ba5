"""The dispute game over one training segment: bisect the steps, then the operators of one
step, then a referee recomputes a single operator. Pure: moves and time come in as calls.

Level 1 (steps). The provider's per-step state hashes are already committed. Each round the
challenger opens its own state hash at the queried step; the parties agree there iff the
hashes are equal. Every state depends on all earlier ones, so agreement is monotone up to
the first fault: ⌈log₂ k⌉ rounds find the first step t whose end state differs while the
state before it (the previous leaf, or the segment's start hash) is agreed.

Level 2 (operators of step t). Both parties trace step t from the agreed state and commit a
Merkle root over their op hash chain (c_i = H(c_{i−1} ‖ record_i), c_{−1} = agreed state
hash) plus its length. Each round both open c_mid with a Merkle proof. Chain agreement is
monotone too, so ⌈log₂ N_ops⌉ rounds find the first op j whose record differs while every
earlier op agrees. Both then reveal record j, checked against their c_{j−1} and c_j.

Leaf. The referee recomputes op j alone on inputs whose hashes the agreed records fix, and
says which side's output it reproduces (`rule`). A party that does not move by the round's
deadline loses (`timeout`); when both are late the challenger loses (the commitment stands).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from idlegrid.core.training.proof import TrainingCommitment
from idlegrid.core.trust.bisect import Bisection
from idlegrid.core.trust.merkle import Proof, merkle_proof, merkle_root, verify_proof
from idlegrid.errors import Conflict

PROVIDER = "provider"
CHALLENGER = "challenger"
PARTIES = (PROVIDER, CHALLENGER)


def rounds_bound(k: int, n_ops: int) -> int:
    """Most bisection rounds a dispute over k steps and n_ops operators takes."""
    return (math.ceil(math.log2(k)) if k > 1 else 0) + (
        math.ceil(math.log2(n_ops)) if n_ops > 1 else 0
    )


def chain_next(prev: bytes, record: bytes) -> bytes:
    """One link of the op hash chain."""
    return hashlib.sha256(prev + record).digest()


@dataclass(frozen=True)
class Outcome:
    """How a dispute ended and where."""

    winner: str
    reason: str
    step: int | None
    op_index: int | None
    rounds: int

    @property
    def provider_at_fault(self) -> bool:
        """True if the provider lost: slash it and refund the segment."""
        return self.winner == CHALLENGER


class DisputeError(Conflict):
    """A move that the game's current phase does not allow."""

    code = "dispute_move_rejected"


@dataclass
class _Ops:
    n: int
    root: bytes
    opened: dict[int, bytes] = field(default_factory=dict)
    record: bytes | None = None


@dataclass
class Dispute:
    """State of one dispute; build with `Dispute.open`."""

    commitment: TrainingCommitment
    round_seconds: float
    deadline: float
    phase: str = "steps"
    awaiting: set[str] = field(default_factory=lambda: {CHALLENGER})
    rounds: int = 0
    steps: Bisection | None = None
    disputed_step: int | None = None
    ops: dict[str, _Ops] = field(default_factory=dict)
    op_bisect: Bisection | None = None
    op_index: int | None = None
    outcome: Outcome | None = None

    @staticmethod
    def open(
        commitment: TrainingCommitment,
        challenger_end_hash: bytes,
        now: float,
        round_seconds: float = 60.0,
    ) -> Dispute:
        """A challenger disputes a segment, claiming its replay ends in another state."""
        d = Dispute(commitment, round_seconds, now + round_seconds)
        if challenger_end_hash == commitment.end_hash:
            d._end(PROVIDER, "the challenger's replay ends where the commitment does", None)
            return d
        d.steps = Bisection(len(commitment.leaves))
        if d.steps.done:  # a one-step segment: that step is the disputed one
            d._to_ops(commitment.start_step, now)
        return d

    # ---- level 1 ----------------------------------------------------------------------------

    def step_query(self) -> int:
        """The absolute step whose end state the challenger must open next."""
        self._need("steps")
        assert self.steps is not None
        return self.commitment.start_step + self.steps.query()

    def answer_step(self, state_hash: bytes, now: float) -> None:
        """The challenger opens its state hash after the queried step."""
        self._move("steps", CHALLENGER, now)
        assert self.steps is not None
        step = self.step_query()
        self.steps.answer(state_hash == self.commitment.leaf(step).state_hash)
        self.rounds += 1
        if self.steps.done:
            self._to_ops(self.commitment.start_step + self.steps.first_bad, now)
        else:
            self._arm({CHALLENGER}, now)

    @property
    def agreed_start_hash(self) -> bytes:
        """The state both parties agree on before the disputed step."""
        if self.disputed_step is None:
            raise DisputeError("no disputed step yet")
        if self.disputed_step == self.commitment.start_step:
            return self.commitment.start_hash
        return self.commitment.leaf(self.disputed_step - 1).state_hash

    def _to_ops(self, step: int, now: float) -> None:
        self.disputed_step = step
        self.phase = "ops-commit"
        self._arm(set(PARTIES), now)

    # ---- level 2 ----------------------------------------------------------------------------

    def commit_ops(
        self, party: str, n_ops: int, root: bytes, last: bytes, proof: Proof, now: float
    ) -> None:
        """A party commits to its op chain of the disputed step: length, root, last link."""
        self._move("ops-commit", party, now)
        if n_ops < 1 or proof.index != n_ops - 1 or not verify_proof(root, last, proof):
            self._end(_other(party), f"{party}'s op chain commitment does not open", None)
            return
        self.ops[party] = _Ops(n_ops, root, {n_ops - 1: last})
        if self.awaiting:
            return
        p, c = self.ops[PROVIDER], self.ops[CHALLENGER]
        if p.n == c.n and p.opened[p.n - 1] == c.opened[c.n - 1]:
            # Same ops, same outputs from the same start: the step's end state is one
            # function of them, so the referee recomputes that step's state hash.
            self.phase = "referee"
            self._arm({PROVIDER}, now)
            return
        self.op_bisect = Bisection(max(p.n, c.n))
        if self.op_bisect.done:
            self._to_referee(now)
        else:
            self.phase = "ops"
            self._arm(set(PARTIES), now)

    def op_query(self) -> int:
        """The op index whose chain link both parties must open next."""
        self._need("ops")
        assert self.op_bisect is not None
        return self.op_bisect.query()

    def open_op(self, party: str, link: bytes, proof: Proof, now: float) -> None:
        """A party opens its chain link at the queried op (past its chain's end: lose)."""
        i = self.op_query()
        self._move("ops", party, now)
        mine = self.ops[party]
        if i < mine.n and (proof.index != i or not verify_proof(mine.root, link, proof)):
            self._end(_other(party), f"{party}'s op chain link {i} does not open", i)
            return
        mine.opened[i] = link if i < mine.n else b""
        if self.awaiting:
            return
        assert self.op_bisect is not None
        a, b = self.ops[PROVIDER].opened[i], self.ops[CHALLENGER].opened[i]
        self.op_bisect.answer(bool(a) and a == b)
        self.rounds += 1
        if self.op_bisect.done:
            self._to_referee(now)
        else:
            self._arm(set(PARTIES), now)

    def _to_referee(self, now: float) -> None:
        assert self.op_bisect is not None
        self.op_index = self.op_bisect.first_bad
        self.phase = "records"
        self._arm(set(PARTIES), now)

    def reveal_record(self, party: str, record: bytes, now: float) -> None:
        """A party reveals its record of the disputed op; it must extend the agreed chain to
        the link it opened there (a party whose chain ended before that op reveals b"")."""
        self._move("records", party, now)
        assert self.op_index is not None
        mine = self.ops[party]
        j = self.op_index
        if j < mine.n:
            link = mine.opened.get(j)
            prev = self.agreed_start_hash if j == 0 else self._opened_prev(j)
            if link is None or chain_next(prev, record) != link:
                self._end(_other(party), f"{party}'s record of op {j} is not its chain link", j)
                return
        mine.record = record if j < mine.n else b""
        if not self.awaiting:
            self.phase = "referee"
            self._arm({PROVIDER}, now)  # the provider must hand over the op's inputs

    def _opened_prev(self, j: int) -> bytes:
        links = [self.ops[p].opened.get(j - 1) for p in PARTIES]
        if links[0] is None or links[0] != links[1]:
            # the bisection only stops at j after agreement at j − 1 was opened, unless j == 0
            raise DisputeError("the link before the disputed op was not agreed")
        return links[0]

    def records(self) -> tuple[bytes, bytes]:
        """(provider's, challenger's) record of the disputed op, for the referee."""
        p, c = self.ops[PROVIDER].record, self.ops[CHALLENGER].record
        if p is None or c is None:
            raise DisputeError("records not revealed yet")
        return p, c

    def rule(self, provider_ok: bool, challenger_ok: bool, detail: str = "") -> Outcome:
        """The referee's recompute of the disputed op (or step): whose result it reproduced.
        If it reproduces neither, the provider's commitment is still wrong: it loses."""
        self._need("referee")
        winner = PROVIDER if provider_ok else CHALLENGER
        why = (
            "referee reproduced the provider's result"
            if provider_ok
            else "referee reproduced the challenger's result"
            if challenger_ok
            else "referee reproduced neither result"
        )
        return self._end(winner, f"{why}{': ' + detail if detail else ''}", self.op_index)

    # ---- time -------------------------------------------------------------------------------

    def timeout(self, now: float) -> Outcome | None:
        """End the game if the awaited party missed the deadline; None if none did."""
        if self.outcome is not None or now < self.deadline or not self.awaiting:
            return self.outcome
        late = PROVIDER if self.awaiting == {PROVIDER} else CHALLENGER
        return self._end(_other(late), f"{late} did not answer by the deadline", self.op_index)

    # ---- plumbing ---------------------------------------------------------------------------

    def _need(self, phase: str) -> None:
        if self.outcome is not None:
            raise DisputeError("the dispute is over", phase=self.phase)
        if self.phase != phase:
            raise DisputeError(f"not in phase {phase} but {self.phase}", phase=self.phase)

    def _move(self, phase: str, party: str, now: float) -> None:
        self._need(phase)
        if party not in self.awaiting:
            raise DisputeError(f"{party} is not expected to move now", phase=phase)
        if now >= self.deadline:
            self.timeout(now)
            raise DisputeError(f"{party} moved after the deadline", phase=phase)
        self.awaiting.discard(party)

    def _arm(self, parties: set[str], now: float) -> None:
        self.awaiting = set(parties)
        self.deadline = now + self.round_seconds

    def _end(self, winner: str, reason: str, op_index: int | None) -> Outcome:
        self.phase = "done"
        self.awaiting = set()
        self.outcome = Outcome(winner, reason, self.disputed_step, op_index, self.rounds)
        return self.outcome


def _other(party: str) -> str:
    return CHALLENGER if party == PROVIDER else PROVIDER


Referee = Callable[[int, int | None, bytes, bytes], tuple[bool, bool]]


def play(
    commitment: TrainingCommitment,
    challenger_hashes: Sequence[bytes],
    op_records: Callable[[str, int], Sequence[bytes]],
    referee: Referee,
    now: float = 0.0,
) -> Outcome:
    """Run a whole dispute with two cooperative parties (both answer at once).

    `challenger_hashes[i]` is the challenger's state hash after step start + i;
    `op_records(party, step)` that party's op records of a step (traced from the agreed
    state); `referee(step, op_index, provider_record, challenger_record)` recomputes and
    returns (provider reproduced, challenger reproduced); op_index None: the whole step.
    """
    d = Dispute.open(commitment, challenger_hashes[-1], now)
    while d.phase == "steps":
        d.answer_step(challenger_hashes[d.step_query() - commitment.start_step], now)
    if d.outcome is not None:
        return d.outcome
    assert d.disputed_step is not None
    chains: dict[str, list[bytes]] = {}
    records = {party: list(op_records(party, d.disputed_step)) for party in PARTIES}
    for party in PARTIES:
        recs = records[party]
        links, c = [], d.agreed_start_hash
        for r in recs:
            c = chain_next(c, r)
            links.append(c)
        chains[party] = links
        d.commit_ops(
            party,
            len(links),
            merkle_root(links),
            links[-1],
            merkle_proof(links, len(links) - 1),
            now,
        )
    while d.phase == "ops":
        i = d.op_query()
        for party in PARTIES:
            links = chains[party]
            if i < len(links):
                d.open_op(party, links[i], merkle_proof(links, i), now)
            else:
                d.open_op(party, b"", Proof(i, (), ()), now)
    if d.phase == "records":
        assert d.op_index is not None
        for party in PARTIES:
            recs = records[party]
            d.reveal_record(party, recs[d.op_index] if d.op_index < len(recs) else b"", now)
    if d.outcome is not None:
        return d.outcome
    p_rec, c_rec = d.records() if d.op_index is not None else (b"", b"")
    return d.rule(*referee(d.disputed_step, d.op_index, p_rec, c_rec))
