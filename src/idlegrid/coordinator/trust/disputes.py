"""Disputes: a provider contests a failed audit; the coordinator referees.

Rounds: the open interval of positions (core/trust/bisect.py) is halved by asking the
provider (open the committed chunk at the middle position, with its Merkle path) and the
challenger (the verifier that failed the audit: its recomputation of that position); the
challenger's answer against the opened chunk says whether they agree there. Every round
has a deadline: a provider that does not answer in time loses; a challenger that does not
answer sends the dispute to the panel at the last position it disputed. When one
disagreeing position is left, a panel of k verifier-mode nodes (neither party, drawn by the
beacon, stake-weighted) each recompute that position alone; the majority rules
(`core/disputes.py`). A ruling's postings and its state change are one savepoint: a ruling
that cannot be paid (`UnpayableRuling`) leaves the dispute as it was, retried next pass.
Agents learn of queries from their heartbeat answer
and answer automatically. This is the inference game of the one dispute shell
(`dispute_shell.py`): the shell opens, routes and lists; seats, turns and deadlines are
`core/disputes.py`'s.

Decisions and ledger entries come from the pure core (`core/trust/dispute.py`, `bisect.py`);
this module reads and writes state. All of it runs inside `Grid.db` (a worker thread).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from idlegrid.coordinator.db.tables import Account, LedgerEntry, LedgerPosting
from idlegrid.coordinator.trust import embed_audits
from idlegrid.coordinator.trust.tables import TrustAudit, TrustCommitment, TrustDispute, TrustNode
from idlegrid.core import disputes as seats
from idlegrid.core import ledger
from idlegrid.core.ledger import Cause, Entry, Posting
from idlegrid.core.trust import bisect, dispute, peek
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import embedding as emb
from idlegrid.core.trust.lifecycle import AUDIT, DISPUTE
from idlegrid.core.trust.merkle import Proof, verify_proof
from idlegrid.core.trust.report_codec import decode_report
from idlegrid.errors import Conflict, InsufficientCredits, InvalidRequest, NotFound, UnpayableRuling

if TYPE_CHECKING:
    from idlegrid.coordinator.trust.audits import Trust

OPEN_STATES = DISPUTE.live()  # awaiting-referee, bisecting, refereeing
ANSWERING = ("bisecting", "refereeing")


class Disputes:
    """Open, run and settle inference disputes for one coordinator (the shell's game)."""

    kind = "inference"
    prefix = "dsp-"

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        # Heartbeats skip the dispute lookup while none is open (set by open and tick).
        self.active = False

    @property
    def store(self) -> Any:
        """The coordinator's store."""
        return self.trust.store

    def clock(self) -> float:
        """The grid's clock."""
        return self.trust.ctx.clock()

    # ---- opening -----------------------------------------------------------------------

    def open(self, provider_id: str, audit_id: str, reason: str) -> dict[str, Any]:
        """Contest a failed audit of the caller's own answer (409 if it did not fail)."""
        now = self.clock()
        with self.store.tx() as s:
            a = s.get(TrustAudit, audit_id)
            if a is None or a.node_id != provider_id:
                raise NotFound(f"no audit {audit_id} of this node's answers")
            if a.canary or not AUDIT.allowed(a.state, "overturned"):  # only a failed one
                raise Conflict(
                    f"audit {audit_id} did not fail (state {a.state}); "
                    "only a failed audit can be disputed",
                    state=a.state,
                )
            dispute_id = f"dsp-{audit_id[4:]}"
            if s.get(TrustDispute, dispute_id) is not None:
                raise Conflict(f"audit {audit_id} is disputed already", dispute_id=dispute_id)
            com = s.get(TrustCommitment, (a.task_id, a.attempt))
            assert com is not None and a.verifier_id is not None
            if emb.is_embedding(a.blob):
                # Nothing to bisect (no tokens were generated): the panel recomputes every
                # vector at once, "position 0" of a one-position game.
                row = self._new_row(dispute_id, a, provider_id, reason, now, n=1, hi=0)
                s.add(row)
                self.active = True
                self._next_round(s, row, now)
                return self._view(row)
            c = cm.decode(a.blob)
            bad = list(a.verdict.get("positions") or [])
            n, hi = dispute.n_positions(c), max(bad) if bad else -1
            row = self._new_row(dispute_id, a, provider_id, reason, now, n=n, hi=hi)
            s.add(row)
            self.active = True
            if c.header.n_tokens > com.max_new + (1 if c.header.ended_by_end_token else 0):
                # Arithmetic on the commitment alone: nothing for anyone to recompute.
                self._rule(
                    s,
                    row,
                    a,
                    provider_right=False,
                    position=-1,
                    detail="more tokens committed than the request allowed",
                )
            elif row.hi < 0:
                # A failure at no position: the context or the report's shape. The referee
                # recomputes the first position, which carries the context hash.
                row.hi = 0
                self._next_round(s, row, now)
            else:
                self._next_round(s, row, now)
            return self._view(row)

    @staticmethod
    def _new_row(
        dispute_id: str, a: TrustAudit, provider_id: str, reason: str, now: float, n: int, hi: int
    ) -> TrustDispute:
        return TrustDispute(
            id=dispute_id,
            audit_id=a.id,
            provider_id=provider_id,
            verifier_id=a.verifier_id,
            referee_id=None,
            panel=[],
            votes={},
            awaiting_since=0.0,
            state=DISPUTE.begin("bisecting", key=dispute_id),
            n=n,
            lo=-1,
            hi=hi,
            round=0,
            waiting=[],
            answers={},
            deadline=0.0,
            rounds=[],
            excluded=[],
            ruling={},
            reason=reason[:500],
            created_at=now,
            done_at=0.0,
        )

    # ---- rounds ------------------------------------------------------------------------

    def _next_round(self, s: Any, row: TrustDispute, now: float) -> None:
        b = bisect.Bisection(row.n, row.lo, row.hi)
        row.answers = {}
        if b.done:
            row.waiting = []
            self._seat_panel(s, row, now)
            return
        row.round += 1
        row.waiting = [seats.PROVIDER, seats.CHALLENGER]
        row.deadline = now + self.trust.settings.dispute_answer_s

    def _position(self, row: TrustDispute) -> int:
        b = bisect.Bisection(row.n, row.lo, row.hi)
        return b.first_bad if b.done else b.query()

    def _seat_panel(self, s: Any, row: TrustDispute, now: float) -> None:
        """Fill the panel up to k from the eligible verifiers, or wait (then expire)."""
        a = s.get(TrustAudit, row.audit_id)
        k = self.trust.ctx.settings.dispute_panel_k
        skip = {row.provider_id, row.verifier_id, *row.excluded, *row.panel}
        # Panelists run the provider's engine family, as auditors do (see Trust._record).
        family = cm.kernel_family(peek.peek_class(a.blob))
        candidates = [
            v.node_id
            for v in s.scalars(
                select(TrustNode).where(TrustNode.verifier.is_(True), TrustNode.ejected.is_(False))
            )
            if v.node_id not in skip and cm.kernel_family(v.det_class) == family
        ]
        candidates = [v for v in candidates if a.model_id in self.trust.models_of(v)]
        balances = self._balances(s)
        weights = {v: sum(self.trust.stakes(v, balances).values()) for v in candidates}
        drawn = seats.draw_panel(
            self.trust.secret, row.id, weights, k - len(row.panel), salt=len(row.excluded)
        )
        if len(row.panel) + len(drawn) < k:
            # Visible and retried each supervisor pass; never settled without a panel.
            row.awaiting_since = row.awaiting_since or now
            if now - row.awaiting_since > self.trust.ctx.settings.dispute_panel_wait_s:
                self._expire(s, row, "too few eligible verifiers for a panel")
                return
            row.state = DISPUTE.move(row.state, "awaiting-referee", key=row.id)
            row.deadline = 0.0
            return
        row.panel = [*row.panel, *drawn]
        row.awaiting_since = 0.0
        if row.state != "refereeing":  # panelists still to answer keep their round
            row.round += 1
        row.state = DISPUTE.move(row.state, "refereeing", key=row.id)
        row.waiting = [seats.REFEREE]
        row.deadline = now + self.trust.settings.dispute_answer_s

    def _expire(self, s: Any, row: TrustDispute, detail: str) -> None:
        """The default outcome: the audit's verdict stands, nobody is slashed or paid."""
        row.state = DISPUTE.move(row.state, "expired", key=row.id, story=(detail,))
        row.waiting, row.done_at, row.deadline = [], self.clock(), 0.0
        row.ruling = {"provider_right": None, "detail": detail, "panel": dict(row.votes)}

    def pending(self, node_id: str) -> list[dict[str, Any]]:
        """Queries this node must answer now (they ride on its heartbeat answer)."""
        out = []
        with self.store.read() as s:
            rows = s.scalars(select(TrustDispute).where(TrustDispute.state.in_(ANSWERING)))
            for r in rows:
                out.extend(seats.asked(r, r.waiting, node_id))
        return out

    def query(self, node_id: str, dispute_id: str, round_: int) -> dict[str, Any]:
        """What this node must answer: its role, the position, and the audited request."""
        with self.store.read() as s:
            row = s.get(TrustDispute, dispute_id)
            if row is None:
                raise NotFound(f"no dispute {dispute_id}")
            role = seats.seat(row, row.waiting, node_id, round_, ANSWERING)
            a = s.get(TrustAudit, row.audit_id)
            com = s.get(TrustCommitment, (a.task_id, a.attempt))
            out = {
                "dispute_id": row.id,
                "round": row.round,
                "role": role,
                "position": self._position(row),
                "deadline_in_s": row.deadline - self.clock(),
                "task_id": a.task_id,
                "attempt": a.attempt,
                "audit_id": a.id,
            }
            out.update(self.trust.audit_task(a, com))
            return out

    def answer(
        self, node_id: str, dispute_id: str, round_: int, body: dict[str, Any]
    ) -> dict[str, Any]:
        """One party's answer for the current round; the round closes when all answered."""
        now = self.clock()
        with self.store.tx() as s:
            row = s.get(TrustDispute, dispute_id)
            if row is None:
                raise NotFound(f"no dispute {dispute_id}")
            role = seats.seat(row, row.waiting, node_id, round_, ANSWERING)
            seats.in_time(dispute_id, round_, row.deadline, now)
            a = s.get(TrustAudit, row.audit_id)
            if emb.is_embedding(a.blob):  # only a panel sits on an embedding dispute
                self._vote_vectors(s, row, a, node_id, seats.unb64(body, "report"))
                return self._view(row)
            c = cm.decode(a.blob)
            position = self._position(row)
            if role == seats.PROVIDER:
                ok = self._check_opening(c, position, body)
                if not ok:
                    self._rule(
                        s,
                        row,
                        a,
                        provider_right=False,
                        position=position,
                        detail="the provider's opening does not match its commitment",
                    )
                    return self._view(row)
                row.answers = {**row.answers, seats.PROVIDER: "opened"}
            else:
                report = decode_report(seats.unb64(body, "report"))
                if len(report.chunks) != (1 if position < len(c.chunks) else 0):
                    raise InvalidRequest(
                        "the report must hold exactly the queried position", param="report"
                    )
                if role == seats.REFEREE:
                    self._vote(s, row, a, c, position, node_id, report)
                    return self._view(row)
                row.answers = {**row.answers, role: body["report"]}
            row.waiting = [r for r in row.waiting if r != role]
            if not row.waiting:
                self._close_round(s, row, a, c, position, now)
            return self._view(row)

    @staticmethod
    def _check_opening(c: cm.Commitment, position: int, body: dict[str, Any]) -> bool:
        """The provider stands by its committed chunk: the leaf and path lead to the root."""
        j = min(position, len(c.chunks) - 1)
        if j < 0:
            return True  # nothing was committed beyond the header
        try:
            leaf = base64.b64decode(body.get("chunk") or "", validate=True)
            proof = Proof(
                j,
                tuple(bytes.fromhex(h) for h in body.get("siblings") or []),
                tuple(bool(r) for r in body.get("right") or []),
            )
            return leaf == c.chunks[j].encode() and verify_proof(c.header.root, leaf, proof)
        except (binascii.Error, ValueError):
            return False

    def _close_round(
        self, s: Any, row: TrustDispute, a: TrustAudit, c: cm.Commitment, position: int, now: float
    ) -> None:
        report = decode_report(base64.b64decode(row.answers[seats.CHALLENGER]))
        tol = self.trust.tolerance(c.header.det_class, report.det_class)
        agree = not dispute.faults_at(c, position, report, tol)
        b = bisect.Bisection(row.n, row.lo, row.hi)
        b.answer(agree)
        row.lo, row.hi = b.lo, b.hi
        row.rounds = [*row.rounds, {"round": row.round, "position": position, "agree": agree}]
        self._next_round(s, row, now)

    def _vote(
        self,
        s: Any,
        row: TrustDispute,
        a: TrustAudit,
        c: cm.Commitment,
        position: int,
        node_id: str,
        report: cm.Report,
    ) -> None:
        """One panelist's recompute of the position: the side it finds for. The verifier's
        claim there is its audit report, "disagree" (the panel only ever sits on a position
        the verifier disputed), so a recompute within tolerance finds for the provider."""
        faults = dispute.faults_at(
            c, position, report, self.trust.tolerance(c.header.det_class, report.det_class)
        )
        row.votes = {**row.votes, node_id: seats.CHALLENGER if faults else seats.PROVIDER}
        self._try_ruling(s, row, a, position, final=False)

    def _vote_vectors(
        self, s: Any, row: TrustDispute, a: TrustAudit, node_id: str, report: bytes
    ) -> None:
        """One panelist's recompute of every vector of an embedding answer, judged with the
        audits' tolerance: within it, the panelist finds for the provider."""
        verdict, _ = embed_audits.judge(self.trust.settings, a.blob, report)
        side = seats.PROVIDER if verdict.passed else seats.CHALLENGER
        row.votes = {**row.votes, node_id: side}
        self._try_ruling(s, row, a, 0, final=False)

    def _try_ruling(
        self, s: Any, row: TrustDispute, a: TrustAudit, position: int, final: bool = True
    ) -> bool:
        """Rule once every panelist voted (or, `final`, past the deadline: on a majority of
        the votes in); True once settled. An unpayable ruling rolls back to the savepoint:
        the votes stay, the dispute stays where it was and the next pass retries."""
        k = self.trust.ctx.settings.dispute_panel_k
        if not final and len(row.votes) < k:
            return False
        verdict = seats.panel_ruling(row.votes, k)
        if verdict is None:
            return False
        if verdict.winner is None:
            self._expire(s, row, "the panel reached no majority")
            return True
        what = "the committed vectors" if emb.is_embedding(a.blob) else "the committed chunk"
        detail = (
            f"panel {len(verdict.paid)} of {k}: {what} "
            + ("holds" if verdict.winner == seats.PROVIDER else "is not what the model computes")
            + " there (the verifier's report was "
            + ("false)" if verdict.winner == seats.PROVIDER else "right)")
        )
        s.flush()
        try:
            with s.begin_nested():
                self._rule(s, row, a, verdict.winner == seats.PROVIDER, position, detail, verdict)
        except (UnpayableRuling, InsufficientCredits) as exc:
            s.refresh(row)
            row.ruling = {**row.ruling, "unpaid": exc.message}
            return False
        return True

    # ---- deadlines ---------------------------------------------------------------------

    def tick(self, live: frozenset[str] = frozenset()) -> None:
        """Settle rounds past their deadline; find referees for disputes waiting for one
        (any verifier the trust table holds; `live` is the shell's, unused here)."""
        now = self.clock()
        if not self.store.exists(
            select(TrustDispute.id).where(TrustDispute.state.in_(OPEN_STATES))
        ):
            self.active = False
            return
        with self.store.tx() as s:
            rows = list(s.scalars(select(TrustDispute).where(TrustDispute.state.in_(OPEN_STATES))))
            self.active = bool(rows)
            for row in rows:
                a = s.get(TrustAudit, row.audit_id)
                position = self._position(row)
                if row.state == "awaiting-referee":
                    if not (row.votes and self._try_ruling(s, row, a, position)):
                        self._seat_panel(s, row, now)
                    continue
                if row.state == "refereeing" and self._try_ruling(s, row, a, position, False):
                    continue  # every vote was in, its ruling could not be paid before
                if now <= row.deadline:
                    continue
                if row.state == "refereeing" and self._try_ruling(s, row, a, position):
                    continue  # a majority of k voted; the silent ones are not paid
                if row.state == "refereeing":
                    # Silent panelists are not paid and are replaced by fresh draws.
                    silent = [p for p in row.panel if p not in row.votes]
                    row.excluded = [*row.excluded, *silent]
                    row.panel = [p for p in row.panel if p in row.votes]
                    self._seat_panel(s, row, now)
                elif seats.PROVIDER in row.waiting:
                    self._rule(s, row, a, False, position, "the provider did not answer in time")
                else:
                    # A silent challenger slashes nobody by itself: the panel recomputes the
                    # last position it disputed (decisive alone: it said "disagree" there).
                    row.rounds = [
                        *row.rounds,
                        {"round": row.round, "position": position, "agree": None},
                    ]
                    row.lo = row.hi - 1
                    row.waiting, row.answers = [], {}
                    self._seat_panel(s, row, now)

    # ---- ruling ------------------------------------------------------------------------

    def _rule(
        self,
        s: Any,
        row: TrustDispute,
        a: TrustAudit,
        provider_right: bool,
        position: int,
        detail: str,
        verdict: seats.PanelRuling | None = None,
    ) -> None:
        """Record the ruling and post its consequences, in the caller's transaction.

        Only a panel's majority (`verdict`) ever rules for the provider, so only then is the
        verifier slashed. The panel's majority is paid by the loser (the verifier's stakes
        left after the reversal; the provider's account, then its stakes), the fee pool
        covering only what the loser lacks; `UnpayableRuling` if even that falls short.
        """
        now = self.clock()
        end = "won" if provider_right else "lost"
        res = s.execute(
            update(TrustDispute)
            .where(TrustDispute.id == row.id, TrustDispute.state.in_(DISPUTE.sources(end)))
            .values(state=DISPUTE.move(row.state, end, key=row.id, story=(detail,)))
        )
        if res.rowcount != 1:
            raise Conflict(f"dispute {row.id} was settled already")
        s.refresh(row)
        row.waiting, row.done_at = [], now
        winner = seats.PROVIDER if provider_right else seats.CHALLENGER
        row.ruling = {
            "provider_right": provider_right,
            "position": position,
            "detail": detail,
            "panel": dict(row.votes),
            "paid": list(verdict.paid) if verdict else [],
            "slashed": seats.slashed(winner, verdict is not None),
        }
        com = s.get(TrustCommitment, (a.task_id, a.attempt))
        fee = self.trust.fee(com.charge if com else 0)
        balances = self._balances(s)
        posts: list[Entry | None] = []
        provider = s.get(TrustNode, row.provider_id)
        verifier = s.get(TrustNode, row.verifier_id)
        if provider_right and verdict is not None:
            originals = self._audit_entries(s, a.id)
            stakes = self.trust.stakes(row.verifier_id, balances)
            entry, used = dispute.reversal(row.id, originals, balances, stakes)
            posts.append(entry)
            balances = dispute.apply(balances, posts)
            left = {k: v for k, v in self.trust.stakes(row.verifier_id, balances).items()}
            posts.append(
                dispute.panel_pay(
                    row.id, verdict.paid, fee, {**left, ledger.FEES: balances.get(ledger.FEES, 0)}
                )
            )
            balances = dispute.apply(balances, posts[-1:])
            posts.extend(
                dispute.penalty(
                    row.id, self.trust.stakes(row.verifier_id, balances), row.provider_id
                )
            )
            a.state = AUDIT.move(a.state, "overturned", key=a.id, story=(f"dispute:{row.id}",))
            a.verdict = {**a.verdict, "overturned_by": row.id}
            if provider is not None:
                provider.failed = max(provider.failed - 1, 0)
                provider.passed += 1
                if provider.ejected and not self.trust.reputation.ejected(
                    provider.passed, provider.failed
                ):
                    provider.ejected = False
            if verifier is not None:
                verifier.verifier_failed += 1
                verifier.verifier_passed = max(verifier.verifier_passed - 1, 0)
                verifier.ejected = True  # a panel's majority showed its numbers were false
            # The cache of ejected nodes is re-read from the store once this commits.
            self.trust.ejected.refresh_after(s)
        elif verdict is not None:
            acct = ledger.provider_account(row.provider_id)
            funders = {
                acct: balances.get(acct, 0),
                **self.trust.stakes(row.provider_id, balances),
                ledger.FEES: balances.get(ledger.FEES, 0),
            }
            posts.append(dispute.panel_pay(row.id, verdict.paid, fee, funders))
        for e in posts:
            if e is not None:
                self.store._post(s, e)

    @staticmethod
    def _balances(s: Any) -> dict[str, int]:
        return {acct: bal for acct, bal in s.execute(select(Account.id, Account.balance))}

    @staticmethod
    def _audit_entries(s: Any, audit_id: str) -> list[Entry]:
        """The slash (one per stake account), forfeit and verifier pay an audit caused."""
        rows = list(
            s.scalars(
                select(LedgerEntry).where(
                    LedgerEntry.key.in_([f"forfeit:{audit_id}", f"audit-pay:{audit_id}"])
                    | LedgerEntry.key.like(f"slash:{audit_id}:%")
                )
            )
        )
        postings: dict[int, list[Posting]] = {}
        for seq, acct, amount in s.execute(
            select(LedgerPosting.entry_seq, LedgerPosting.account, LedgerPosting.amount).where(
                LedgerPosting.entry_seq.in_([r.seq for r in rows])
            )
        ):
            postings.setdefault(seq, []).append(Posting(acct, amount))
        return [
            Entry(r.key, Cause(r.cause_kind, r.cause_id), tuple(postings.get(r.seq, [])), r.memo)
            for r in rows
        ]

    # ---- views -------------------------------------------------------------------------

    @staticmethod
    def _view(row: TrustDispute) -> dict[str, Any]:
        return {
            "id": row.id,
            "kind": "inference",
            "audit_id": row.audit_id,
            "provider_id": row.provider_id,
            "challenger_id": row.verifier_id,
            "referee_id": row.referee_id,
            "panel": list(row.panel),
            "votes": dict(row.votes),
            "awaiting_since": row.awaiting_since,
            "state": row.state,
            "round": row.round,
            "positions": row.n,
            "interval": [row.lo, row.hi],
            "waiting_for": list(row.waiting),
            "rounds": list(row.rounds),
            "ruling": dict(row.ruling),
            "reason": row.reason,
            "created_at": row.created_at,
            "done_at": row.done_at,
        }

    def listing(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Every dispute (or one node's, as any party), newest first."""
        with self.store.read() as s:
            q = select(TrustDispute).order_by(TrustDispute.created_at.desc())
            rows = list(s.scalars(q))
            return [
                self._view(r)
                for r in rows
                if node_id is None or node_id in (r.provider_id, r.verifier_id, *r.panel)
            ]
