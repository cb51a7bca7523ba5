"""The trust service: take commitments with finished answers, select audits by beacon,
hand them to verifiers, judge the recomputations and apply the consequences.

Decisions come from the pure core (`core/trust`); this module only reads and writes state.
Order that matters: the commitment is stored with the finish, and only then is the beacon
draw made, from a per-epoch secret whose hash is published in `/api/v1/status`. Who takes
an audit, and deadlines: `assign.py`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.db.tables import Account, Offer
from idlegrid.coordinator.events import AnswerFinished, NodeRegistered
from idlegrid.coordinator.trust import assign, embed_audits
from idlegrid.coordinator.trust.payability import Payability, record
from idlegrid.coordinator.trust.settings import TrustSettings
from idlegrid.coordinator.trust.tables import TrustAudit, TrustCommitment, TrustNode
from idlegrid.core import b64, ledger
from idlegrid.core.grammar import GrammarSpec
from idlegrid.core.trust import beacon, dispute, entries, selection
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust import embedding as emb
from idlegrid.core.trust.economics import AuditPolicy
from idlegrid.core.trust.extras import expected as expected_extras
from idlegrid.core.trust.lifecycle import AUDIT
from idlegrid.core.trust.merkle import merkle_root
from idlegrid.core.trust.report_codec import decode_report
from idlegrid.core.trust.reputation import ReputationModel
from idlegrid.errors import Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    from idlegrid.coordinator.views import TaskView


def tamper(c: cm.Commitment) -> cm.Commitment:
    """A "values" canary: the same answer with its first chunk's hidden-state values 1% off."""
    chunks = selection.tamper_values(c.chunks)
    root = merkle_root([ch.encode() for ch in chunks])
    return cm.Commitment(dataclasses.replace(c.header, root=root), chunks)


class Trust:
    """Audits and their consequences for one coordinator."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = TrustSettings()
        s = self.settings
        self.policy = AuditPolicy(
            stake=s.stake_multiple, full_audits=s.full_audits, halving=s.halving
        )
        self.reputation = ReputationModel()
        self.secret = ctx.secret
        self.epoch_commitment = beacon.beacon_commitment(self.secret)
        self.new_audit = asyncio.Event()
        self.ejected = ctx.ejected
        self.ejected.loader = self._ejected_ids
        self.live: frozenset[str] | None = None  # verifiers the draw may pick (None: all)
        from idlegrid.coordinator.trust.disputes import Disputes

        self.disputes = Disputes(self)
        # Which providers an independent verifier can check, since when: payout holds and
        # the probation budget for unverifiable ones.
        self.payability = Payability(self)

    @property
    def store(self) -> Any:
        """The coordinator's store."""
        return self.ctx.store

    # ---- nodes -------------------------------------------------------------------------

    async def on_register(self, event: NodeRegistered) -> None:
        """Remember whether a node verifies, and its determinism class."""
        node_id, body = event.node_id, event.body
        eng = body.get("engine") or {}
        det = "/".join(str(eng.get(k, "")) for k in ("engine", "version", "dtype", "device"))
        det += f"/t{eng.get('threads', '')}"
        verifier = bool(body.get("verifier"))
        await self.ctx.db(self._upsert_node, node_id, verifier, det, event.address)

    def _upsert_node(self, node_id: str, verifier: bool, det: str, address: str = "") -> None:
        with self.store.tx() as s:
            row = s.get(TrustNode, node_id)
            if row is None:
                s.add(
                    TrustNode(
                        node_id=node_id,
                        verifier=verifier,
                        det_class=det,
                        passed=0,
                        failed=0,
                        verifier_passed=0,
                        verifier_failed=0,
                        ejected=False,
                        proven_class="",
                        address=address[:64],
                        held=False,
                    )
                )
            else:
                row.verifier, row.det_class, row.address = verifier, det, address[:64]
                row.held = False  # a restarted verifier is drawn again (its lapse was paid)
                if row.ejected:
                    self.ejected.refresh_after(s)

    # ---- commitments -------------------------------------------------------------------

    def check_commitment(
        self, task: TaskView, blob_b64: str, new_ids: list[int], finish_reason: str
    ) -> emb.AnyCommitment:
        """Decode and sanity-check a commitment before settlement (400 if it is malformed)."""
        raw = b64.decode(blob_b64, "commitment")
        if emb.is_embedding(raw) or task.kind == "embedding":
            return embed_audits.check_commitment(task, raw, finish_reason)
        return self._check_generation(task, raw, new_ids, finish_reason)

    def _check_generation(
        self, task: TaskView, raw: bytes, new_ids: list[int], finish_reason: str
    ) -> cm.Commitment:
        c = cm.decode(raw)
        toks = c.tokens[:-1] if c.header.ended_by_end_token else c.tokens
        if toks != list(new_ids):
            raise InvalidRequest(
                "commitment tokens differ from the uploaded output", param="commitment"
            )
        if c.header.seed != task.payload["seed"] or c.header.finish_reason != finish_reason:
            raise InvalidRequest(
                "commitment seed or finish reason differs from the request", param="commitment"
            )
        p = task.payload
        want = expected_extras(
            p.get("presence_penalty"),
            p.get("frequency_penalty"),
            p.get("logit_bias"),
            p.get("logprobs"),
            len(task.delivered_ids),
        )
        if c.header.extras != want:  # what the verifier replays must be what was asked
            raise InvalidRequest(
                "commitment's penalties, logit_bias or logprobs differ from the request",
                param="commitment",
            )
        wire = task.payload.get("grammar")
        expected = GrammarSpec.from_wire(wire).digest() if wire else None
        for fault in cm.constraint_faults(c.header, expected):
            raise InvalidRequest(fault, param="commitment")
        return c

    def check_part(self, task: TaskView, blob_b64: str, new_ids: list[int]) -> cm.Commitment:
        """A handed-back attempt's commitment to the tokens it delivered: no finish claim
        (it did not finish), so it must say "length" and end without an end token."""
        c = self._check_generation(task, b64.decode(blob_b64, "commitment"), new_ids, "length")
        if c.header.ended_by_end_token or not new_ids:
            raise InvalidRequest(
                "a part's commitment covers only the tokens it delivered", param="commitment"
            )
        return c

    async def on_answer(self, event: AnswerFinished) -> None:
        """A committed answer (or handed-back part) is final: the beacon may audit it."""
        if event.commitment is not None:
            # Stored first, then the beacon draw: the provider committed before selection.
            await self.on_finish(
                event.task,
                event.node_id,
                event.attempt,
                event.commitment,
                event.delivered_before,
                part=event.part,
            )

    async def on_finish(
        self,
        task: TaskView,
        node_id: str,
        attempt: int,
        c: emb.AnyCommitment,
        prior_ids: list[int],
        part: bool = False,
    ) -> None:
        """Store the commitment, then draw the beacon: audit? plant a canary?"""
        await self.ctx.db(self._on_finish, task, node_id, attempt, c, prior_ids, part)
        self.new_audit.set()

    def _on_finish(
        self,
        task: TaskView,
        node_id: str,
        attempt: int,
        c: emb.AnyCommitment,
        prior_ids: list[int],
        part: bool = False,
    ) -> None:
        now = self.ctx.clock()
        digest = c.header.digest()
        # A part is checked as "these tokens, no more": its length claim is its own count.
        if isinstance(c, emb.EmbeddingCommitment):
            max_new = 0  # nothing is generated
        elif part:
            max_new = c.header.n_tokens
        else:
            max_new = int(task.payload["max_tokens"]) - len(prior_ids)
        charge = 0 if part else self._charge(task.id, task.key_id, task.hold)
        blob = c.encode()
        with self.store.tx() as s:
            s.add(
                TrustCommitment(
                    task_id=task.id,
                    attempt=attempt,
                    node_id=node_id,
                    digest=digest.hex(),
                    blob=blob,
                    prior_ids=list(prior_ids),
                    max_new=max_new,
                    charge=charge,
                    created_at=now,
                    part=part,
                )
            )
            node = s.get(TrustNode, node_id)
            clean, failed = record(s, node)
            # The rate follows the stake at risk in units of this request's charge.
            staked = sum(
                s.scalars(select(Account.balance).where(Account.id.like(f"stake:{node_id}:%")))
            )
            at_risk = staked / charge if charge > 0 else None
            # Only verifiers of the provider's kernel family (`kernel_family`: an AVX2 llama.cpp
            # does not judge an AVX-512 one) may audit it: across engines no tolerance is fair.
            # Among them the beacon draws one by stake, never on the provider's network; ids
            # and canaries are built so that nothing but the secret tells them apart.
            grammar = (
                c.header.constraint.engine
                if isinstance(c, cm.Commitment) and c.header.constraint is not None
                else None
            )
            pool = assign.candidates(self, s, grammar)
            audits: list[tuple[str, bool, bytes, str | None]] = []
            # Draws and ids are per answer (task, attempt), not per digest: identical seeded
            # requests commit to one digest, and are audited independently (docs/trust.md).
            where = selection.scope(task.id, attempt)
            rate = self.policy.rate(clean, failed, at_risk)
            real_id, canary_id = (
                selection.audit_id(self.secret, digest, k, task.id, attempt)
                for k in ("audit", "canary")
            )
            if beacon.selected(self.secret, digest, rate, scope=where):
                who = assign.draw(self, s, node_id, digest, c.header.det_class, "audit", [], pool)
                audits.append((real_id, False, blob, who))
            # Canaries plant wrong hidden states (an answer's) or a turned vector (an
            # embedding's): a verifier that approves one did not recompute.
            canarable = isinstance(c, emb.EmbeddingCommitment) or bool(c.chunks)
            canary_p = selection.canary_probability(self.settings.canary_rate, rate)
            if canarable and beacon.selected(self.secret, digest, canary_p, b"canary", where):
                # A canary goes to another verifier than the real audit where there is one.
                taken = [a[3] for a in audits if a[3]]
                who = assign.draw(
                    self, s, node_id, digest, c.header.det_class, "canary", taken, pool
                ) or assign.draw(self, s, node_id, digest, c.header.det_class, "canary", [], pool)
                if isinstance(c, emb.EmbeddingCommitment):
                    data = emb.tamper(c).encode()  # no task canary: see docs/trust.md
                else:
                    kind = selection.canary_kind(self.secret, digest, task.payload)
                    data = blob if kind == "task" else tamper(c).encode()
                audits.append((canary_id, True, data, who))
            for audit_id, canary, data, designated in audits:
                s.add(
                    TrustAudit(
                        id=audit_id,
                        task_id=task.id,
                        attempt=attempt,
                        node_id=node_id,
                        model_id=task.model_id,
                        designated=designated,
                        verifier_id=None,
                        canary=canary,
                        blob=data,
                        state=AUDIT.begin("pending", key=audit_id),
                        verdict={},
                        created_at=now,
                        assigned_at=0.0,
                        done_at=0.0,
                        expired=[],
                    )
                )

    def _part_charge(self, task_id: str, blob: bytes) -> int:
        """A failover part's share of the request's charge, by output tokens (0 until the
        request is settled)."""
        task = self.store.get_task(task_id)
        total = self._charge(task.id, task.key_id, task.hold)
        n = len(task.delivered_ids) if task.delivered_ids else 0
        part = cm.decode(blob).header.n_tokens
        return total * part // n if n else 0

    def _charge(self, task_id: str, key_id: str, hold: int) -> int:
        consumer = ledger.consumer_account(key_id)
        for e in self.store.entries(task_id):
            if e["key"] == f"settle:{task_id}":
                back = sum(int(p["amount"]) for p in e["postings"] if p["account"] == consumer)
                return hold - back
        return 0

    # ---- verifiers ---------------------------------------------------------------------

    async def poll(
        self, node_id: str, models: list[str], wait_s: float = 10.0
    ) -> dict[str, Any] | None:
        """An audit for this verifier (never its own answers), or None after `wait_s`."""
        return await self.ctx.long_poll(
            self.new_audit, lambda: assign.claim(self, node_id, models), wait_s
        )

    def audit_task(self, a: TrustAudit, com: TrustCommitment) -> dict[str, Any]:
        """The audited request as the provider saw it, and the commitment to re-check
        (reads the task: call it outside a write transaction)."""
        task = self.store.get_task(a.task_id)
        p = task.payload
        out = {
            "model": a.model_id,
            "kind": task.kind,
            "prompt": p.get("prompt"),
            "messages": p.get("messages"),
            "input": p.get("input"),
            "prior_ids": list(com.prior_ids),
            "max_new_tokens": com.max_new,
            "stop": p.get("stop") or [],
            "commitment": base64.b64encode(a.blob).decode(),
            "grammar": p.get("grammar"),
        }
        if a.canary and a.blob == com.blob:  # a "task" canary: the verifier's prompt is off
            out = selection.perturb_task(out, self.secret, bytes.fromhex(com.digest))
        return out

    def models_of(self, node_id: str) -> set[str]:
        """Models a node offers (a referee must be able to run the disputed one)."""
        with self.store.read() as s:
            return set(s.scalars(select(Offer.model_id).where(Offer.node_id == node_id)))

    def expire(self, live: frozenset[str] | None = None) -> list[str]:
        """Audit deadlines (see `assign.expire`); the ids of audits that lapsed."""
        return assign.expire(self, live)

    async def report(self, node_id: str, audit_id: str, report_b64: str) -> dict[str, Any]:
        """Judge a verifier's recomputation and apply what follows from it."""
        raw = b64.decode(report_b64, "report")
        report = emb.decode_report(raw) if emb.is_embedding(raw) else decode_report(raw)
        return await self.ctx.db(self._judge_and_apply, node_id, audit_id, report, raw)

    def tolerance(self, provider_class: str, verifier_class: str) -> cm.Tolerance:
        """Same class: tight; different class: the calibrated cross-class tolerance."""
        st = self.settings
        rel = st.rel_same if provider_class == verifier_class else st.rel_cross
        return cm.Tolerance(rel=rel, rank_slack=rel, margin=st.margin)

    def _judge_and_apply(
        self,
        node_id: str,
        audit_id: str,
        report: cm.Report | emb.EmbeddingReport,
        raw: bytes = b"",
    ) -> dict[str, Any]:
        now = self.ctx.clock()
        with self.store.tx() as s:
            a = s.get(TrustAudit, audit_id)
            if a is None:
                raise NotFound(f"no audit {audit_id}")
            if a.verifier_id != node_id or a.state != "assigned":
                raise Conflict(f"audit {audit_id} is not assigned to this node", state=a.state)
            com = s.get(TrustCommitment, (a.task_id, a.attempt))
            assert com is not None
            provider_id, task_id, canary, blob = a.node_id, a.task_id, a.canary, a.blob
            charge, max_new = com.charge, com.max_new
            # A failover part: its share of what the request was charged.
            part_of = (com.task_id, com.blob) if com.part else None
        if part_of is not None:
            charge = self._part_charge(*part_of)
        if emb.is_embedding(blob) != isinstance(report, emb.EmbeddingReport):
            raise InvalidRequest("the report is not of the audited kind", param="report")
        if isinstance(report, emb.EmbeddingReport):
            v, judged = embed_audits.judge(self.settings, blob, raw)
            verdict = {"passed": v.passed, "reasons": list(v.reasons), **judged, "canary": canary}
        else:
            c = cm.decode(blob)
            tol = self.tolerance(c.header.det_class, report.det_class)
            v = cm.judge(c, report, tol, max_new)
            verdict = {
                "passed": v.passed,
                "reasons": list(v.reasons),
                "worst_rel": v.worst_rel,
                "worst_margin": v.worst_margin if abs(v.worst_margin) != float("inf") else None,
                "first_bad_chunk": v.first_bad_chunk,
                "tolerance": tol.rel,
                "provider_class": c.header.det_class,
                "verifier_class": report.det_class,
                "canary": canary,
            }
            if not v.passed:  # where a dispute would start bisecting
                verdict["positions"] = dispute.disagreeing(c, report, tol)
        task = self.store.get_task(task_id)
        consumer = ledger.consumer_account(task.key_id)
        balances = self.store.balances()
        posts = self._consequences(
            audit_id, node_id, provider_id, canary, v.passed, charge, consumer, balances
        )
        with self.store.tx() as s:
            end = "passed" if v.passed else "failed"
            res = s.execute(
                update(TrustAudit)
                .where(TrustAudit.id == audit_id, TrustAudit.state.in_(AUDIT.sources(end)))
                .values(
                    state=AUDIT.move("assigned", end, key=audit_id, story=(f"verifier:{node_id}",)),
                    done_at=now,
                    verdict=verdict,
                )
            )
            if res.rowcount != 1:
                raise Conflict(f"audit {audit_id} was judged already")
            verifier = s.get(TrustNode, node_id)
            provider = s.get(TrustNode, provider_id)
            verifier.held = False  # it reports again: back in the draw
            if canary:
                if v.passed:  # approved a planted wrong answer: lazy or colluding
                    verifier.verifier_failed += 1
                    verifier.ejected = True
                    self.ejected.refresh_after(s)
                else:
                    verifier.verifier_passed += 1
            else:
                verifier.verifier_passed += 1
                if v.passed:
                    provider.passed += 1
                else:
                    # A failure in probation ejects (the documented rule), as does the
                    # policy's last allowed failure, whatever the posterior says.
                    clean, failed = record(s, provider)
                    on_probation = self.policy.failure_ejects(clean, failed)
                    provider.failed += 1
                    if on_probation or self.reputation.ejected(provider.passed, provider.failed):
                        provider.ejected = True
                        self.ejected.refresh_after(s)
            for e in posts:
                self.store._post(s, e)
        # Whether it was a canary stays with the coordinator.
        return {"audit_id": audit_id, **{k: v for k, v in verdict.items() if k != "canary"}}

    def _consequences(
        self,
        audit_id: str,
        verifier_id: str,
        provider_id: str,
        canary: bool,
        passed: bool,
        charge: int,
        consumer: str,
        balances: dict[str, int],
    ) -> list[ledger.Entry]:
        """Ledger entries that follow from a verdict (pure apart from the balances read)."""
        posts: list[ledger.Entry | None] = []
        fees = balances.get(ledger.FEES, 0)
        if canary and passed:
            for acct, bal in self._stakes(verifier_id, balances).items():
                posts.append(entries.canary_slash(f"{audit_id}:{acct}", acct, bal, bal))
            return [e for e in posts if e is not None]
        posts.append(entries.verifier_pay(audit_id, verifier_id, self._fee(charge), fees))
        if not canary and not passed:
            refund = charge
            for acct, bal in self._stakes(provider_id, balances).items():
                e = entries.slash(
                    f"{audit_id}:{acct}", acct, bal, bal, consumer, refund, verifier_id
                )
                if e is not None:
                    refund -= sum(p.amount for p in e.postings if p.account == consumer)
                    posts.append(e)
            accrual = ledger.accrual_account(provider_id)
            posts.append(
                entries.forfeit(audit_id, accrual, balances.get(accrual, 0), consumer, refund)
            )
        return [e for e in posts if e is not None]

    def _fee(self, charge: int) -> int:
        return charge * self.settings.audit_fee_bps // 10_000

    def _ejected_ids(self) -> list[str]:
        """The store's ejected nodes (the reader behind `ctx.ejected`)."""
        with self.store.read() as s:
            return list(s.scalars(select(TrustNode.node_id).where(TrustNode.ejected.is_(True))))

    def fee(self, charge: int) -> int:
        """A verifier's (or referee's) pay for checking a request that was charged `charge`."""
        return self._fee(charge)

    def stakes(self, node_id: str, balances: dict[str, int]) -> dict[str, int]:
        """A node's non-empty stake accounts."""
        return self._stakes(node_id, balances)

    @staticmethod
    def _stakes(node_id: str, balances: dict[str, int]) -> dict[str, int]:
        prefix = f"stake:{node_id}:"
        return {a: b for a, b in balances.items() if a.startswith(prefix) and b > 0}

    # ---- status ------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Audit rate p, p*, and each node's probation, audit record and payability."""
        from idlegrid.coordinator.trust.payability import trust_status

        return await trust_status(self)

    def audits(self) -> list[dict[str, Any]]:
        """Every audit with its verdict (operator view)."""
        with self.store.tx() as s:
            return [
                {
                    "id": a.id,
                    "task_id": a.task_id,
                    "attempt": a.attempt,
                    "node_id": a.node_id,
                    "verifier_id": a.verifier_id,
                    "canary": a.canary,
                    "state": a.state,
                    "verdict": a.verdict,
                    "expired": list(a.expired or []),
                }
                for a in s.scalars(select(TrustAudit))
            ]
