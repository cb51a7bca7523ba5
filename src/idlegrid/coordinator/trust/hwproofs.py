"""Hardware proofs in the coordinator: issue challenges, time them, judge, demote and slash.

Lifecycle of a proof row: issued → started (seed revealed, clock starts) → committed (root
or fill received, clock read) → passed | failed; issued rows nobody starts expire without
consequence (the claim simply stays unverified). The maths is `core/trust/hwproof.py` and
`core/trust/memproof.py`; this module reads and writes state and applies the verdicts.
The coordinator is the challenger: it measures the time itself, from the moment it sends
the seed to the moment the commitment arrives.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.db.tables import DeviceOffer
from idlegrid.coordinator.events import SupplyChanged
from idlegrid.coordinator.trust.tables import HwProof
from idlegrid.core import b64, ledger
from idlegrid.core.market.hardware import BY_NAME
from idlegrid.core.trust import beacon, entries, merkle
from idlegrid.core.trust import hwproof as hw
from idlegrid.core.trust import memproof as mp
from idlegrid.core.trust.lifecycle import HW_PROOF
from idlegrid.errors import Conflict, InvalidRequest, NotFound

CATALOG = {name: g.fp16_tflops for name, g in BY_NAME.items()}


class HwSettings(BaseSettings):
    """Hardware-proof knobs; IDLEGRID_HW_* environment variables (calibration: docs/trust.md)."""

    model_config = SettingsConfigDict(env_prefix="IDLEGRID_HW_", extra="ignore")

    enabled: bool = True
    n_gpu: int = Field(4096, ge=64, le=16384)
    n_cpu: int = Field(1024, ge=64, le=8192)
    open_rows: int = Field(16, ge=1, le=64)
    gpu_efficiency: float = Field(0.25, gt=0, le=1)
    cpu_floor_gflops: float = Field(1.0, gt=0)
    host_ns_per_element: float = Field(150.0, ge=0)
    device_ns_per_element: float = Field(10.0, ge=0)
    rtt_s: float = Field(0.5, ge=0)
    mem_cap_mb: float = Field(256.0, gt=0, description="largest buffer a memory proof asks for")
    mem_rounds: int = Field(8, ge=1)
    mem_ns_per_read: float = Field(2000.0, gt=0)
    recheck_per_hour: float = Field(1.0, ge=0, description="random re-checks per node and hour")
    expire_s: float = Field(120.0, gt=0)


class HwProofs:
    """Hardware challenges for one coordinator."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.settings = HwSettings()
        s = self.settings
        self.model = hw.TimingModel(
            s.gpu_efficiency,
            s.cpu_floor_gflops,
            s.host_ns_per_element,
            s.device_ns_per_element,
            s.rtt_s,
        )
        self.secret = secrets.token_bytes(32)  # row openings and re-check draws
        self._last_draw = ctx.clock()

    @property
    def store(self) -> Any:
        """The coordinator's store."""
        return self.ctx.store

    # ---- issuing -------------------------------------------------------------------------

    def issue(self, node_id: str, devices: list[dict[str, Any]], reason: str) -> list[str]:
        """A matmul and a memory challenge for every device class the node claims."""
        if not (self.settings.enabled and self.ctx.settings.hw_proofs):
            return []
        with self.store.tx() as s:
            return self._add(s, node_id, devices, reason, ("matmul", "memory"))

    def _add(
        self,
        s: Any,
        node_id: str,
        devices: list[dict[str, Any]],
        reason: str,
        kinds: tuple[str, ...],
    ) -> list[str]:
        """Challenge rows of these kinds for these device claims, in the caller's transaction."""
        now = self.ctx.clock()
        ids: list[str] = []
        for d in devices:
            cls = d["model"]
            if cls not in BY_NAME:
                continue
            spec = hw.spec_for(
                cls,
                CATALOG,
                self.model,
                self.settings.n_gpu,
                self.settings.n_cpu,
                self.settings.open_rows,
            )
            mem_bytes = min(
                float(d.get("vram_gb") or BY_NAME[cls].vram_gb) * 1e9,
                self.settings.mem_cap_mb * 1e6,
            )
            mem = mp.MemSpec.for_bytes(mem_bytes, self.settings.mem_rounds)
            for kind, body in (
                (
                    "matmul",
                    {
                        "n": spec.n,
                        "dtype": spec.dtype,
                        "open_rows": spec.open_rows,
                        "claimed_tflops": spec.claimed_tflops,
                        "on_device": spec.on_device,
                    },
                ),
                (
                    "memory",
                    {
                        "words": mem.words,
                        "rounds": mem.rounds,
                        "chases": mem.chases,
                        "steps": mem.steps,
                        "samples": mem.samples,
                    },
                ),
            ):
                if kind not in kinds:
                    continue
                pid = f"hw-{kind[:3]}-{secrets.token_hex(8)}"
                s.add(
                    HwProof(
                        id=pid,
                        node_id=node_id,
                        claimed=cls,
                        kind=kind,
                        state=HW_PROOF.begin("issued", key=pid),
                        spec={**body, "reason": reason},
                        seed=secrets.token_hex(32),
                        root="",
                        wanted=[],
                        verdict={},
                        created_at=now,
                        sent_at=0.0,
                        committed_at=0.0,
                        done_at=0.0,
                    )
                )
                ids.append(pid)
        return ids

    def on_register(self, node_id: str) -> None:
        """Challenge what a (re-)registering node claims; keep earlier demotions in force."""
        self._reapply_demotions(node_id)
        self.issue(node_id, self._claims(node_id), "registration")

    def _claims(self, node_id: str) -> list[dict[str, Any]]:
        with self.store.tx() as s:
            return [
                {"model": d.device_model, "vram_gb": d.vram_gb}
                for d in s.scalars(select(DeviceOffer).where(DeviceOffer.node_id == node_id))
            ]

    def pending(self, node_id: str) -> list[str]:
        """Challenges waiting for this node to start them (sent with the heartbeat answer)."""
        with self.store.tx() as s:
            return list(
                s.scalars(
                    select(HwProof.id).where(HwProof.node_id == node_id, HwProof.state == "issued")
                )
            )

    def tick(self, live: frozenset[str]) -> None:
        """Random re-checks (beacon draw per node) and expiry of stale challenges."""
        now = self.ctx.clock()
        dt, self._last_draw = now - self._last_draw, now
        p = min(1.0, self.settings.recheck_per_hour * dt / 3600)
        for node_id in sorted(live):
            digest = f"{node_id}:{now}".encode()
            if (
                p > 0
                and beacon.selected(self.secret, digest, p, domain=b"hw-recheck")
                and (not self.pending(node_id))
            ):
                self.issue(node_id, self._claims(node_id), "re-check")
        if not self.store.exists(
            select(HwProof.id).where(HwProof.state.in_(("issued", "started")))
        ):
            return
        with self.store.tx() as s:
            for row in s.scalars(select(HwProof).where(HwProof.state.in_(("issued", "started")))):
                if row.state == "issued" and now - row.created_at > self.settings.expire_s:
                    row.state = HW_PROOF.move(row.state, "expired", key=row.id)
                    row.done_at = now
                    row.verdict = {"passed": False, "reasons": ["never started"]}
        for pid in self._overdue(now):
            self._fail_overdue(pid)

    def _overdue(self, now: float) -> list[str]:
        with self.store.tx() as s:
            return [
                r.id
                for r in s.scalars(select(HwProof).where(HwProof.state == "started"))
                if now - r.sent_at > max(self.settings.expire_s, 4 * self._budget(r))
            ]

    def _budget(self, row: HwProof) -> float:
        if row.kind == "matmul":
            return self.model.budget(
                row.spec["n"], row.spec["claimed_tflops"], row.spec["on_device"]
            ).total_s
        return mp.budget_s(self._mem_spec(row), self.settings.mem_ns_per_read, self.settings.rtt_s)

    def _fail_overdue(self, pid: str) -> None:
        with self.store.tx() as s:
            row = s.get(HwProof, pid)
            if row is None or row.state != "started":
                return
            node_id, claimed, kind = row.node_id, row.claimed, row.kind
        self._apply(
            pid,
            node_id,
            claimed,
            kind,
            False,
            0.0,
            {"passed": False, "reasons": ["no commitment before the deadline"]},
        )

    # ---- the protocol --------------------------------------------------------------------

    def _row(self, s: Any, node_id: str, pid: str, state: str) -> HwProof:
        row = s.get(HwProof, pid)
        if row is None or row.node_id != node_id:
            raise NotFound(f"no hardware proof {pid} for this node")
        if row.state != state:
            raise Conflict(f"hardware proof {pid} is {row.state}, not {state}", state=row.state)
        proof: HwProof = row
        return proof

    def start(self, node_id: str, pid: str) -> dict[str, Any]:
        """Reveal the seed; the clock starts now."""
        with self.store.tx() as s:
            row = self._row(s, node_id, pid, "issued")
            row.state = HW_PROOF.move(row.state, "started", key=pid)
            row.sent_at = self.ctx.clock()
            # Memory proofs get the fill seed now and the chase seed once the fill is done.
            return {
                "id": pid,
                "kind": row.kind,
                "claimed": row.claimed,
                "seed": row.seed,
                "spec": dict(row.spec),
            }

    def commit(
        self, node_id: str, pid: str, root_hex: str, at: float | None = None
    ) -> dict[str, Any]:
        """Matmul: the root of C arrives (clock read: `at`, when the request arrived),
        answer with the rows to open. Memory: the fill is done; reveal the chase seed and
        restart the clock."""
        now = self.ctx.clock() if at is None else at
        with self.store.tx() as s:
            row = self._row(s, node_id, pid, "started")
            if row.kind == "memory":
                row.state = HW_PROOF.move(row.state, "committed", key=pid)
                # The chase's clock starts as its seed leaves, not when the fill arrived.
                row.sent_at, row.root = self.ctx.clock(), "filled"
                return {"id": pid, "chase_seed": self._chase_seed(row).hex()}
            try:
                root = bytes.fromhex(root_hex)
            except ValueError as exc:
                raise InvalidRequest("root is not hex", param="root") from exc
            if len(root) != 32:
                raise InvalidRequest("root must be 32 bytes", param="root")
            wanted = hw.open_rows(
                self.secret + pid.encode(), root, row.spec["n"], row.spec["open_rows"]
            )
            row.state = HW_PROOF.move(row.state, "committed", key=pid)
            row.committed_at, row.root, row.wanted = now, root_hex, wanted
            return {"id": pid, "rows": wanted}

    def _chase_seed(self, row: HwProof) -> bytes:
        return bytes.fromhex(row.seed) + b"chase" + self.secret[:8]

    @staticmethod
    def _mem_spec(row: HwProof) -> mp.MemSpec:
        sp = row.spec
        return mp.MemSpec(sp["words"], sp["rounds"], sp["chases"], sp["steps"], sp["samples"])

    def open(
        self, node_id: str, pid: str, body: dict[str, Any], at: float | None = None
    ) -> dict[str, Any]:
        """The opened rows (matmul) or the chase trace (memory, its clock read: `at`, when
        the request arrived); judge and apply."""
        now = self.ctx.clock() if at is None else at
        with self.store.tx() as s:
            row = self._row(s, node_id, pid, "committed")
            if row.kind == "memory":
                row.committed_at = now
            snapshot = (
                row.kind,
                dict(row.spec),
                bytes.fromhex(row.seed),
                row.root,
                list(row.wanted),
                row.sent_at,
                row.committed_at,
                row.claimed,
            )
            mem_spec = self._mem_spec(row) if row.kind == "memory" else None
            chase_seed = self._chase_seed(row) if row.kind == "memory" else b""
        kind, spec, seed, root, wanted, sent_at, committed_at, claimed = snapshot
        elapsed = committed_at - sent_at
        if kind == "matmul":
            openings = self._openings(body, spec["n"])
            hs = hw.Spec(
                claimed,
                spec["n"],
                spec["dtype"],
                spec["open_rows"],
                spec["claimed_tflops"],
                spec["on_device"],
            )
            v = hw.judge(hs, seed, bytes.fromhex(root), wanted, openings, elapsed, self.model)
            proven = hw.proven_class(v.proven_tflops, CATALOG, self.model) if v.correct else None
            verdict = {
                "passed": v.passed,
                "correct": v.correct,
                "in_time": v.in_time,
                "elapsed_s": elapsed,
                "budget_s": v.budget_s,
                "worst_error": v.worst_error if v.worst_error != float("inf") else None,
                "proven_tflops": v.proven_tflops,
                "proven_class": proven,
                "reasons": list(v.reasons),
            }
            passed = v.passed
        else:
            assert mem_spec is not None
            raw = b64.decode(str(body.get("trace", "")), "trace")
            if len(raw) != 4 * mem_spec.steps * mem_spec.chases:
                raise InvalidRequest("trace has the wrong length", param="trace")
            trace = np.frombuffer(raw, dtype="<u4").reshape(mem_spec.steps, mem_spec.chases)
            mv = mp.judge(
                seed,
                chase_seed,
                mem_spec,
                trace,
                elapsed,
                self.secret + seed,
                self.settings.mem_ns_per_read,
                self.settings.rtt_s,
            )
            verdict = {
                "passed": mv.passed,
                "elapsed_s": elapsed,
                "budget_s": mv.budget_s,
                "wrong_samples": mv.wrong_samples,
                "bytes": 4 * mem_spec.words,
                "reasons": list(mv.reasons),
            }
            passed = mv.passed
        self._apply(pid, node_id, claimed, kind, passed, now, verdict)
        return {"id": pid, **verdict}

    @staticmethod
    def _openings(body: dict[str, Any], n: int) -> list[hw.Opening]:
        out = []
        items = body.get("openings")
        if not isinstance(items, list) or len(items) > 64:
            raise InvalidRequest("openings: a list of at most 64 rows", param="openings")
        for k, o in enumerate(items):
            try:
                raw = b64.decode(o["row"], f"openings.{k}.row")
                sib = tuple(bytes.fromhex(h) for h in o["siblings"])
                right = tuple(bool(b) for b in o["right"])
                index = int(o["index"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidRequest(f"openings.{k}: malformed", param=f"openings.{k}") from exc
            if (
                len(raw) != 4 * n
                or len(sib) != len(right)
                or len(sib) > 40
                or any(len(h) != 32 for h in sib)
            ):
                raise InvalidRequest(f"openings.{k}: wrong sizes", param=f"openings.{k}")
            row = np.frombuffer(raw, dtype="<f4").astype(np.float32)
            out.append(hw.Opening(index, row, merkle.Proof(index, sib, right)))
        return out

    # ---- consequences --------------------------------------------------------------------

    def _apply(
        self,
        pid: str,
        node_id: str,
        claimed: str,
        kind: str,
        passed: bool,
        now: float,
        verdict: dict[str, Any],
    ) -> None:
        balances = self.store.balances() if not passed else {}
        with self.store.tx() as s:
            row = s.get(HwProof, pid)
            end = "passed" if passed else "failed"
            if row is None or row.state not in HW_PROOF.sources(end):
                raise Conflict(f"hardware proof {pid} was judged already")
            if hw.late_only(kind, verdict) and not self._late_before(s, row):
                # Right but late, the first time since its last verdict: a busy prover can
                # be (CI's chaos run slashed honest providers for it). The same challenge
                # again now, in this transaction; late twice counts as failed.
                row.state = HW_PROOF.move(row.state, "late", key=pid)
                row.verdict, row.done_at = verdict, now or self.ctx.clock()
                offer = s.get(DeviceOffer, (node_id, claimed))
                claim = [{"model": claimed, "vram_gb": offer.vram_gb if offer else 0.0}]
                self._add(s, node_id, claim, f"re-try of late {pid}", (kind,))
                return
            row.state = HW_PROOF.move(row.state, end, key=pid)
            row.verdict, row.done_at = verdict, now or self.ctx.clock()
            if not passed:
                self._demote(s, node_id, claimed, kind, verdict)
                acct = ledger.stake_account(node_id, claimed)
                e = entries.hardware_slash(pid, acct, balances.get(acct, 0))
                if e is not None:
                    self.store._post(s, e)
        self.ctx.events.notify(SupplyChanged(node_id))

    @staticmethod
    def _late_before(s: Any, row: HwProof) -> bool:
        """Whether this claim's latest earlier verdict of this kind was a late answer."""
        prev = s.scalars(
            select(HwProof.state)
            .where(
                HwProof.node_id == row.node_id,
                HwProof.claimed == row.claimed,
                HwProof.kind == row.kind,
                HwProof.id != row.id,
                HwProof.state.in_(("passed", "failed", "late")),
            )
            .order_by(HwProof.done_at.desc())
            .limit(1)
        ).first()
        return bool(prev == "late")

    @staticmethod
    def _demote(s: Any, node_id: str, claimed: str, kind: str, verdict: dict[str, Any]) -> None:
        """Offer what the proof showed: the proven class (matmul) or no memory (memory)."""
        offer = s.get(DeviceOffer, (node_id, claimed))
        if offer is None:
            return
        if kind == "memory":
            offer.vram_gb = 0.0
            return
        to = verdict.get("proven_class") or "CPU"
        if to == claimed:
            return
        other = s.get(DeviceOffer, (node_id, to))
        if other is not None:
            other.count += offer.count
            s.delete(offer)
        else:
            s.add(
                DeviceOffer(
                    node_id=node_id,
                    device_model=to,
                    count=offer.count,
                    vram_gb=min(offer.vram_gb, BY_NAME[to].vram_gb or offer.vram_gb),
                    price_h=offer.price_h,
                    plugin=offer.plugin,
                )
            )
            s.delete(offer)

    def _reapply_demotions(self, node_id: str) -> None:
        with self.store.tx() as s:
            failed = list(
                s.scalars(
                    select(HwProof).where(HwProof.node_id == node_id, HwProof.state == "failed")
                )
            )
            for row in failed:
                self._demote(s, node_id, row.claimed, row.kind, row.verdict)

    # ---- reads ---------------------------------------------------------------------------

    def verified(self) -> dict[str, set[str]]:
        """Per node, the device classes whose latest matmul and memory proofs passed."""
        latest: dict[tuple[str, str, str], tuple[float, bool]] = {}
        with self.store.tx() as s:
            for r in s.scalars(select(HwProof).where(HwProof.state.in_(("passed", "failed")))):
                k = (r.node_id, r.claimed, r.kind)
                if k not in latest or latest[k][0] < r.done_at:
                    latest[k] = (r.done_at, r.state == "passed")
                if r.state == "failed" and r.kind == "matmul" and r.verdict.get("proven_class"):
                    # A correct but slow proof still proves the class it reached.
                    k2 = (r.node_id, r.verdict["proven_class"], "matmul")
                    if k2 not in latest or latest[k2][0] < r.done_at:
                        latest[k2] = (r.done_at, True)
        out: dict[str, set[str]] = {}
        for (node, cls, kind), (_, ok) in latest.items():
            if kind == "matmul" and ok:
                out.setdefault(node, set()).add(cls)
        for (node, cls, kind), (_, ok) in latest.items():
            if kind == "memory" and not ok:
                out.get(node, set()).discard(cls)
        return out

    def proofs(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Every proof with its verdict (operator view)."""
        with self.store.tx() as s:
            q = select(HwProof)
            if node_id:
                q = q.where(HwProof.node_id == node_id)
            return [
                {
                    "id": r.id,
                    "node_id": r.node_id,
                    "claimed": r.claimed,
                    "kind": r.kind,
                    "state": r.state,
                    "reason": r.spec.get("reason"),
                    "verdict": r.verdict,
                    "done_at": r.done_at,  # when judged (0 while open)
                }
                for r in s.scalars(q.order_by(HwProof.created_at))
            ]
