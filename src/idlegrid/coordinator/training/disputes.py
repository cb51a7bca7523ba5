"""Training disputes on the grid: a provider contests a failed segment audit and the
coordinator drives the pure game (`core/training/dispute.py`) round by round.

The game is never stored as an object: the row keeps every move with its time and the game
is rebuilt by replaying them through the core, so every decision (who must move, by when,
who lost) is the core's. Rounds: the challenger (the verifier that failed the segment)
first claims its replay's end state, then opens its state hash at each step the core
queries; both parties then commit to their op chain of the disputed step, open links and
reveal the disputed record. The state before the disputed step is agreed; when the
coordinator does not hold it, the provider hands it over (it must hash to the agreed leaf).
A panel of k training verifiers (neither party, live, drawn by the beacon, stake-weighted;
`core/disputes.py`) each trace the disputed step from that state and report their own record
of the disputed op (or the step's end state hash when both chains agree); each vote is the
side whose claim it reproduced, and the majority of k rules. Queries ride on the heartbeat
answer; a party that misses its deadline loses (a challenger that does so forfeits the
slash it caused, but is slashed only by a panel); a silent panelist is replaced, unpaid. A
ruling and its postings are one savepoint: `UnpayableRuling` leaves the dispute as it was.

This is the training game of the one dispute shell (`coordinator/trust/dispute_shell.py`,
which `app.compose()` hands it to): the shell opens, routes and lists; seats, turns and
deadlines are `core/disputes.py`'s.

Exact mode only: the core's game compares hashes, so the challenger must have run in the
provider's class; a cross-class audit cannot be disputed here (409 says why).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from idlegrid.coordinator.training.dispute_moves import (
    apply_move,
    hex_field,
    parse_move,
    replay_game,
)
from idlegrid.coordinator.training.dispute_settlement import DisputeSettlement
from idlegrid.coordinator.training.tables import (
    TrainAudit,
    TrainCheckpoint,
    TrainDispute,
    TrainJob,
    TrainSegment,
)
from idlegrid.coordinator.trust.tables import TrustNode
from idlegrid.core import b64
from idlegrid.core import disputes as seats
from idlegrid.core.training import dispute as game
from idlegrid.core.training.lifecycle import TRAIN_AUDIT
from idlegrid.core.training.proof import TrainingCommitment
from idlegrid.core.trust.lifecycle import TRAIN_DISPUTE
from idlegrid.errors import Conflict, InsufficientCredits, NotFound, UnpayableRuling

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from idlegrid.coordinator.training.common import TrainingBase

OPEN = TRAIN_DISPUTE.live()  # open, awaiting-referee, refereeing
ANSWERING = ("open", "refereeing")
ROLES = {game.PROVIDER: seats.PROVIDER, game.CHALLENGER: seats.CHALLENGER}


class TrainDisputes(DisputeSettlement):
    """Open, run and settle training disputes for one coordinator (the shell's game)."""

    kind = "training"
    prefix = "tdsp-"

    def __init__(self, jobs: TrainingBase) -> None:
        self.jobs = jobs
        # Heartbeats skip the lookup while none is open; the first tick finds out (a
        # restarted coordinator may hold open disputes).
        self.active = True

    @property
    def store(self) -> Any:
        """The coordinator's store."""
        return self.jobs.store

    def clock(self) -> float:
        """The grid's clock."""
        return float(self.jobs.ctx.clock())

    # ---- opening -----------------------------------------------------------------------

    def open(self, provider_id: str, audit_id: str, reason: str) -> dict[str, Any]:
        """Contest a failed audit of the caller's own segment (409 unless it failed in
        exact mode and is not disputed yet)."""
        now = self.clock()
        with self.store.tx() as s:
            a = s.get(TrainAudit, audit_id)
            if a is None or a.node_id != provider_id or a.canary:
                raise NotFound(f"no audit {audit_id} of this node's segments")
            if not TRAIN_AUDIT.allowed(a.state, "overturned"):  # only a failed one
                raise Conflict(
                    f"audit {audit_id} did not fail (state {a.state}); only a "
                    "failed audit can be disputed",
                    state=a.state,
                )
            if not a.verdict.get("exact"):
                raise Conflict(
                    f"audit {audit_id} was judged across determinism classes (provider "
                    f"{a.verdict.get('provider_class')!r}, verifier "
                    f"{a.verdict.get('verifier_class')!r}); disputes are exact-mode only: "
                    "the challenger must run in the provider's class",
                    state=a.state,
                )
            dispute_id = f"tdsp-{audit_id[5:]}"
            if s.get(TrainDispute, dispute_id) is not None:
                raise Conflict(f"audit {audit_id} is disputed already", dispute_id=dispute_id)
            assert a.verifier_id is not None
            row = TrainDispute(
                id=dispute_id,
                audit_id=audit_id,
                job_id=a.job_id,
                segment_id=a.segment_id,
                provider_id=provider_id,
                verifier_id=a.verifier_id,
                referee_id=None,
                panel=[],
                votes={},
                awaiting_since=0.0,
                state=TRAIN_DISPUTE.begin("open", key=dispute_id),
                round=1,
                round_s=self.jobs.settings.dispute_round_s,
                moves=[],
                checkpoint=None,
                deadline=now + self.jobs.settings.dispute_round_s,
                excluded=[],
                ruling={},
                reason=reason[:500],
                created_at=now,
                done_at=0.0,
            )
            s.add(row)
            self.jobs._event(
                s,
                a.job_id,
                "dispute-opened",
                f"dispute:{dispute_id}",
                audit=audit_id,
                provider=provider_id,
                challenger=a.verifier_id,
            )
            self.active = True
            return self._view(row, self._commitment(s, row))

    # ---- rounds ------------------------------------------------------------------------

    def _commitment(self, s: Session, row: TrainDispute) -> TrainingCommitment:
        seg = s.get(TrainSegment, row.segment_id)
        assert seg is not None
        return TrainingCommitment.from_bytes(seg.blob)

    def _awaiting(self, row: TrainDispute, d: game.Dispute | None) -> list[str]:
        if row.state == "refereeing":
            return [seats.REFEREE]
        if row.state != "open":
            return []
        if d is None:
            return [seats.CHALLENGER]
        return sorted(ROLES[p] for p in d.awaiting)

    def pending(self, node_id: str) -> list[dict[str, Any]]:
        """Queries this node must answer now (they ride on its heartbeat answer)."""
        out = []
        with self.store.read() as s:
            for r in s.scalars(select(TrainDispute).where(TrainDispute.state.in_(ANSWERING))):
                if node_id not in (r.provider_id, r.verifier_id, *(r.panel or [])):
                    continue
                d = replay_game(r, self._commitment(s, r))
                out.extend(seats.asked(r, self._awaiting(r, d), node_id))
        return out

    def query(self, node_id: str, dispute_id: str, round_: int) -> dict[str, Any]:
        """What this node must answer: its role, the phase and index, and the segment."""

        with self.store.read() as s:
            row = s.get(TrainDispute, dispute_id)
            if row is None:
                raise NotFound(f"no dispute {dispute_id}")
            c = self._commitment(s, row)
            d = replay_game(row, c)
            role = seats.seat(row, self._awaiting(row, d), node_id, round_, ANSWERING)
            seg = s.get(TrainSegment, row.segment_id)
            job = s.get(TrainJob, row.job_id)
            assert seg is not None and job is not None
            start = s.get(TrainCheckpoint, (job.id, seg.start_step))
            out: dict[str, Any] = {
                "dispute_id": row.id,
                "round": row.round,
                "role": role,
                "job_id": job.id,
                "spec": job.spec,
                "start_step": seg.start_step,
                "end_step": seg.end_step,
                "commitment": b64.encode(seg.blob),
                "start_checkpoint": b64.encode(start.blob) if start is not None else None,
                "deadline_in_s": (
                    row.deadline if d is None or role == seats.REFEREE else d.deadline
                )
                - self.clock(),
            }
            if d is None:
                out.update(phase="claim", step=seg.end_step - 1)
            elif role == seats.REFEREE:
                out.update(
                    phase="referee",
                    step=d.disputed_step,
                    op_index=d.op_index,
                    agreed_checkpoint=b64.encode(row.checkpoint) if row.checkpoint else None,
                )
            else:
                out.update(phase=d.phase, step=d.disputed_step, op_index=d.op_index)
                if d.phase == "steps":
                    out["step"] = d.step_query()
                elif d.phase == "ops":
                    out["op_index"] = d.op_query()
            return out

    def answer(
        self, node_id: str, dispute_id: str, round_: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        """One party's (or the referee's) answer for the current round."""
        now = self.clock()
        with self.store.tx() as s:
            row = s.get(TrainDispute, dispute_id)
            if row is None:
                raise NotFound(f"no dispute {dispute_id}")
            c = self._commitment(s, row)
            d = replay_game(row, c)
            role = seats.seat(row, self._awaiting(row, d), node_id, round_, ANSWERING)
            if role == seats.REFEREE:
                self._referee(s, row, c, d, body, now, node_id)
                return self._view(row, c)
            if d is None:  # the challenger's claim: its replay's end state
                seats.in_time(dispute_id, round_, row.deadline, now)
                claim = hex_field(body, "state_hash").hex()
                move = {"kind": "claim", "party": game.CHALLENGER, "hash": claim, "at": now}
                row.moves = [move]
                d = replay_game(row, c)
                assert d is not None
                row.round += 1
            else:
                party = game.PROVIDER if role == seats.PROVIDER else game.CHALLENGER
                before = (d.phase, d.deadline)
                if d.phase == "referee":
                    self._handover(s, row, c, d, body, now)
                    return self._view(row, c)
                move = parse_move(d, party, body, now)
                try:
                    apply_move(d, move)
                except game.DisputeError as exc:
                    if d.outcome is not None:  # moved after its deadline: the late one lost
                        self._settle(s, row, c, d)
                        return self._view(row, c)
                    raise exc
                row.moves = [*row.moves, move]
                if (d.phase, d.deadline) != before:
                    row.round += 1
            self._advance(s, row, c, d, now)
            return self._view(row, c)

    def _advance(
        self, s: Session, row: TrainDispute, c: TrainingCommitment, d: game.Dispute, now: float
    ) -> None:
        """After a move: settle an ended game, or move on to the referee."""
        if d.outcome is not None:
            self._settle(s, row, c, d)
            return
        if d.phase == "referee" and d.disputed_step is not None:
            seg = s.get(TrainSegment, row.segment_id)
            assert seg is not None
            if d.disputed_step == seg.start_step:
                # The coordinator holds the segment's start (or the referee derives step 0
                # from the spec): nothing to hand over.
                held = s.get(TrainCheckpoint, (row.job_id, seg.start_step))
                row.checkpoint = held.blob if held is not None else None
                self._to_referee(row, now)

    def _handover(
        self,
        s: Session,
        row: TrainDispute,
        c: TrainingCommitment,
        d: game.Dispute,
        body: dict[str, Any],
        now: float,
    ) -> None:
        """The provider hands over the agreed state before the disputed step."""
        if now >= d.deadline:
            d.timeout(now)
            self._settle(s, row, c, d)
            return
        ckpt = seats.unb64(body, "checkpoint")
        if hashlib.sha256(ckpt).digest() != d.agreed_start_hash:
            d.rule(False, False, "the provider's checkpoint is not the agreed state")
            self._settle(s, row, c, d)
            return
        row.checkpoint = ckpt
        self._to_referee(row, now)

    def _to_referee(self, row: TrainDispute, now: float) -> None:
        # Picked by the supervisor from the live verifiers (see tick).
        row.state = TRAIN_DISPUTE.move(row.state, "awaiting-referee", key=row.id)
        row.referee_id, row.deadline = None, 0.0
        row.round += 1
        self.active = True

    def _pick_referee(
        self, s: Session, row: TrainDispute, live: frozenset[str], now: float
    ) -> None:
        """Fill the panel up to k from the live verifiers, or wait (then expire)."""
        settings = self.jobs.ctx.settings
        k = settings.dispute_panel_k
        skip = {row.provider_id, row.verifier_id, *row.excluded, *row.panel}
        candidates = [
            v
            for v in s.scalars(
                select(TrustNode.node_id).where(
                    TrustNode.verifier.is_(True), TrustNode.ejected.is_(False)
                )
            )
            if v not in skip and v in live
        ]
        weights = {v: sum(self.jobs._accounts(s, f"stake:{v}:%").values()) for v in candidates}
        drawn = seats.draw_panel(
            self.jobs.secret, row.id, weights, k - len(row.panel), salt=len(row.excluded)
        )
        if len(row.panel) + len(drawn) < k:
            # Visible as awaiting-referee; never settled without a panel; expires at last.
            row.awaiting_since = row.awaiting_since or now
            if now - row.awaiting_since > settings.dispute_panel_wait_s:
                self._expire(row, "too few eligible verifiers for a panel")
            elif row.state != "awaiting-referee":
                row.state = TRAIN_DISPUTE.move(row.state, "awaiting-referee", key=row.id)
            return
        row.panel = [*row.panel, *drawn]
        row.awaiting_since = 0.0
        if row.state != "refereeing":  # panelists still to answer keep their round
            row.round += 1
        row.state = TRAIN_DISPUTE.move(row.state, "refereeing", key=row.id)
        row.deadline = now + row.round_s

    def _expire(self, row: TrainDispute, detail: str) -> None:
        """The default outcome: the audit's verdict stands, nobody is slashed or paid."""
        row.state = TRAIN_DISPUTE.move(row.state, "expired", key=row.id, story=(detail,))
        row.done_at, row.deadline = self.clock(), 0.0
        row.ruling = {"provider_right": None, "reason": detail, "panel": dict(row.votes)}

    def _referee(
        self,
        s: Session,
        row: TrainDispute,
        c: TrainingCommitment,
        d: game.Dispute | None,
        body: dict[str, Any],
        now: float,
        node_id: str = "",
    ) -> None:
        """One panelist's recompute: its own record of the disputed op (or the step's end
        state hash) from the agreed state; its vote is the side whose claim it reproduced
        (reproducing neither finds against the provider, as the core's game rules)."""
        assert d is not None and d.disputed_step is not None
        seats.in_time(row.id, row.round, row.deadline, now)
        seg = s.get(TrainSegment, row.segment_id)
        assert seg is not None
        det = str(body.get("det_class") or "")
        if det != seg.det_class:
            # Exact mode: a panelist of another class proves nothing; another is drawn.
            row.excluded = [*row.excluded, node_id]
            row.panel = [p for p in row.panel if p != node_id]
            return
        if hex_field(body, "start_hash") != d.agreed_start_hash:
            # It traced from the spec's initial state (step 0) and that is not where the
            # provider's commitment starts: the provider's initial weights are not the job's.
            vote = seats.CHALLENGER
        elif d.op_index is None:
            ok = hex_field(body, "state_hash") == c.leaf(d.disputed_step).state_hash
            vote = seats.PROVIDER if ok else seats.CHALLENGER
        else:
            mine = seats.unb64(body, "record")
            p_rec, _ = d.records()
            vote = seats.PROVIDER if mine and mine == p_rec else seats.CHALLENGER
        row.votes = {**row.votes, node_id: vote}
        self._try_ruling(s, row, c, d, final=False)

    def _try_ruling(
        self, s: Session, row: TrainDispute, c: TrainingCommitment, d: game.Dispute, final: bool
    ) -> bool:
        """Rule once every panelist voted (or, `final`, on a majority of the votes in);
        True once settled. An unpayable ruling rolls back: the votes stay, retried later."""
        k = self.jobs.ctx.settings.dispute_panel_k
        if not final and len(row.votes) < k:
            return False
        verdict = seats.panel_ruling(row.votes, k)
        if verdict is None:
            return False
        if verdict.winner is None:
            self._expire(row, "the panel reached no majority")
            return True
        where = (
            f"step {d.disputed_step}"  # both op chains agreed: the step's end state
            if d.op_index is None
            else f"op {d.op_index} of step {d.disputed_step}"
        )
        d.rule(
            verdict.winner == seats.PROVIDER,
            verdict.winner == seats.CHALLENGER,
            f"panel {len(verdict.paid)} of {k} on {where}",
        )
        s.flush()
        try:
            with s.begin_nested():
                self._settle(s, row, c, d, verdict=verdict)
        except (UnpayableRuling, InsufficientCredits) as exc:
            s.refresh(row)
            row.ruling = {**row.ruling, "unpaid": exc.message}
            return False
        return True

    # ---- deadlines ---------------------------------------------------------------------

    def tick(self, live: frozenset[str]) -> None:
        """Settle rounds past their deadline; find referees; replace silent ones."""
        if not self.active:
            return
        now = self.clock()
        with self.store.tx() as s:
            rows = list(s.scalars(select(TrainDispute).where(TrainDispute.state.in_(OPEN))))
            self.active = bool(rows)
            for row in rows:
                c = self._commitment(s, row)
                if row.state in ("awaiting-referee", "refereeing"):
                    d = replay_game(row, c)
                    assert d is not None
                    if self._try_ruling(s, row, c, d, final=False):
                        continue  # every vote was in, its ruling could not be paid before
                    if row.state == "refereeing" and now > row.deadline:
                        if self._try_ruling(s, row, c, d, final=True):
                            continue  # a majority of k voted; the silent are not paid
                        silent = [p for p in row.panel if p not in row.votes]
                        row.excluded = [*row.excluded, *silent]
                        row.panel = [p for p in row.panel if p in row.votes]
                    if row.state == "awaiting-referee" or len(row.panel) < (
                        self.jobs.ctx.settings.dispute_panel_k
                    ):
                        self._pick_referee(s, row, live, now)
                    continue
                d = replay_game(row, c)
                if d is None:
                    if now > row.deadline:
                        d = game.Dispute.open(c, c.end_hash, row.created_at, row.round_s)
                        d._end(game.PROVIDER, "challenger did not answer by the deadline", None)
                        self._settle(s, row, c, d)
                    continue
                if d.timeout(now) is not None:
                    self._settle(s, row, c, d)

    # ---- ruling ------------------------------------------------------------------------

    # ---- views -------------------------------------------------------------------------

    def _view(self, row: TrainDispute, c: TrainingCommitment) -> dict[str, Any]:
        d = replay_game(row, c) if row.state in OPEN else None
        return {
            "id": row.id,
            "kind": "training",
            "audit_id": row.audit_id,
            "segment": row.segment_id,
            "provider_id": row.provider_id,
            "challenger_id": row.verifier_id,
            "referee_id": row.referee_id,
            "panel": list(row.panel),
            "votes": dict(row.votes),
            "awaiting_since": row.awaiting_since,
            "state": row.state,
            "round": row.round,
            "phase": (d.phase if d is not None else "claim" if row.state == "open" else row.state),
            "waiting_for": self._awaiting(row, d),
            "moves": len(row.moves),
            "ruling": dict(row.ruling),
            "reason": row.reason,
            "created_at": row.created_at,
            "done_at": row.done_at,
        }

    def listing(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Every training dispute (or one node's, in any seat), newest first."""
        with self.store.read() as s:
            rows = s.scalars(select(TrainDispute).order_by(TrainDispute.created_at.desc()))
            return [
                self._view(r, self._commitment(s, r))
                for r in rows
                if node_id is None or node_id in (r.provider_id, r.verifier_id, *r.panel)
            ]

    def of_job(self, s: Session, job_id: str) -> list[dict[str, Any]]:
        """A job's disputes, oldest first (for the job view)."""
        rows = s.scalars(
            select(TrainDispute)
            .where(TrainDispute.job_id == job_id)
            .order_by(TrainDispute.created_at)
        )
        return [self._view(r, self._commitment(s, r)) for r in rows]
