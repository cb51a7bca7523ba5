"""Leases in the coordinator: market orders of kind `lease` made real on their provider.

The tick adopts each active lease order (a lease row, `pending → placed → provisioning`),
tells the provider's agent to provision over its channel, bills running seconds through
the market (`billable_seconds`, in the same transaction as the lease's own move), ends
leases whose paid time is used up, and fails those whose provider vanished (billed up to
that moment, the rest refunded, the consumer told the files are lost). Agent frames
(`provisioned`, `wiped`, exec output) arrive through `on_agent_frame`."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from idlegrid.coordinator.context import Context
from idlegrid.coordinator.db.tables import MarketOrder
from idlegrid.coordinator.leases.downtime import UNCONFIRMED, confirm_wipes, penalise
from idlegrid.coordinator.leases.proofs import device_class, gate, lapsed
from idlegrid.coordinator.leases.relay import ExecRelay
from idlegrid.coordinator.leases.tables import Lease, LeaseTransition
from idlegrid.coordinator.views import NodeView
from idlegrid.core.lease.lifecycle import (
    LeaseCause,
    LeaseState,
    Transition,
    advance,
    billable_seconds,
    billable_until,
    running_seconds,
)
from idlegrid.core.lease.loss import hours_to_restart
from idlegrid.core.lease.proofs import Gate
from idlegrid.core.lease.spec import workspace_spec
from idlegrid.errors import Conflict, InvalidRequest, NotFound
from idlegrid.protocol.lease import LeaseFrame, frame, read_frame

log = logging.getLogger(__name__)

Send = Callable[[dict[str, Any] | bytes], Awaitable[None]]  # a control frame or a data frame
LIVE = (LeaseState.PROVISIONING.value, LeaseState.RUNNING.value, LeaseState.ENDING.value)
PLACED = (LeaseState.PENDING.value, *LIVE)  # a pending one with a node waits on its proofs
EXTENDABLE = (LeaseState.PENDING.value, LeaseState.PROVISIONING.value, LeaseState.RUNNING.value)
MAX_EXTEND_H = 24.0 * 30  # one extension at most: a month
# Making a workspace takes about 0.1 s; pip requirements from a wheelhouse take longer.
PROVISION_TIMEOUT_S = 600.0
LOST_FILES = "the provider was lost: the workspace and its files are gone (nothing was kept)"
LOST_EARLY = "the provider was lost before the lease started: nothing ran, the escrow is refunded"
LOST_WIPE = (
    "the provider was lost while wiping the workspace: billing stopped when the lease was "
    f"ended; {UNCONFIRMED}"
)
REVOKED = (
    "the provider cannot prove the leased device class, so the lease ends: you pay only up "
    "to its last passed proof ({billed} s in all), the rest is refunded; the workspace is wiped"
)
NOBODY = "no provider took the restarted lease before its order expired: its escrow is refunded"
UNPROVEN = "it cannot prove the leased device class; nothing ran, the escrow is refunded"
OPEN_ORDER = ("active", "open")  # an open one: a restarted lease still waiting for a provider


class LeaseNotFound(NotFound):
    """No lease with this id for this API key (another key's lease is not found either)."""

    code = "lease_not_found"

    def __init__(self, lease_id: str) -> None:
        super().__init__(f"no lease {lease_id}", lease_id=lease_id)


class LeaseMoney(Protocol):
    """What leases need of the market: bill running seconds and close the order, inside the
    lease's own transaction."""

    def bill_lease(
        self,
        s: Session,
        order_id: str,
        before_s: int,
        now_s: int,
        close: str | None,
        carry: dict[str, Any] | None = None,
    ) -> None:
        """Pay the provider for running seconds (before_s, now_s]; close with `close`,
        first opening the order `carry` with the escrow it needs (a restarted lease)."""
        ...

    def extend_lease(self, s: Session, order_id: str, hours: float) -> int:
        """Escrow `hours` more of the order's worst case (InsufficientCredits if the
        consumer cannot cover it); returns the µcr escrowed."""
        ...


@dataclass(frozen=True)
class LeaseView:
    """A lease as routes and the CLI see it."""

    id: str
    key_id: str
    node_id: str
    state: str
    spec: dict[str, Any]
    hours: float
    billed_s: int
    running_s: float
    message: str | None
    transitions: tuple[Transition, ...]
    restart_on_loss: bool = False
    restarted_from: str | None = None
    restarted_as: str | None = None
    proofs: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The HTTP shape (schemas.LeaseOut)."""
        return {
            "id": self.id,
            "state": self.state,
            "node_id": self.node_id,
            "spec": self.spec,
            "hours": self.hours,
            "billed_s": self.billed_s,
            "running_s": round(self.running_s, 3),
            "message": self.message,
            "restart_on_loss": self.restart_on_loss,
            "restarted_from": self.restarted_from,
            "restarted_as": self.restarted_as,
            "proofs": list(self.proofs),
            "transitions": [
                {"at": t.at, "state": t.state, "cause": t.cause} for t in self.transitions
            ],
        }


def _history(s: Session, lease_id: str) -> list[Transition]:
    q = select(LeaseTransition).where(LeaseTransition.lease_id == lease_id)
    rows = s.scalars(q.order_by(LeaseTransition.seq))
    return [Transition(r.at, r.state, r.cause) for r in rows]


class Leases:
    """Lease rows, their moves and money, and the live relays to their workspaces."""

    def __init__(
        self, ctx: Context, nodes: Callable[[], Mapping[str, NodeView]], money: LeaseMoney
    ) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self._nodes = nodes
        self.money = money
        self.links: dict[str, Send] = {}  # node id -> its channel's send
        self.relays: dict[str, ExecRelay] = {}
        self.logs: dict[str, bytearray] = {}  # lease -> last LOG_BYTES of its output
        self._sent: set[tuple[str, str]] = set()  # (lease, provision|end) frames sent
        self.provision_timeout_s = PROVISION_TIMEOUT_S

    # ---- reading ------------------------------------------------------------------------

    def _view(self, s: Session, row: Lease) -> LeaseView:
        hist = _history(s, row.id)
        now = max(self.ctx.clock(), hist[-1].at) if hist else self.ctx.clock()
        return LeaseView(
            row.id, row.key_id, row.node_id, row.state, row.spec, row.hours, row.billed_s,
            running_seconds(hist, now), row.message, tuple(hist), bool(row.restart_on_loss),
            row.restarted_from, row.restarted_as, tuple(row.proofs or ()),
        )  # fmt: skip

    def get(self, lease_id: str, key_id: str | None) -> LeaseView:
        """One lease (only the key's own when `key_id` is given: others are not found)."""
        with self.store.read() as s:
            row = s.get(Lease, lease_id)
            if row is None or (key_id is not None and row.key_id != key_id):
                raise LeaseNotFound(lease_id)
            return self._view(s, row)

    def of_key(self, key_id: str) -> list[LeaseView]:
        """A key's leases, newest first."""
        with self.store.read() as s:
            q = select(Lease).where(Lease.key_id == key_id).order_by(Lease.created_at.desc())
            return [self._view(s, r) for r in s.scalars(q)]

    # ---- moves --------------------------------------------------------------------------

    def _move(
        self,
        s: Session,
        row: Lease,
        cause: str,
        at: float,
        restart: bool = False,
        until: float | None = None,
    ) -> None:
        hist = _history(s, row.id)
        at = max(at, hist[-1].at) if hist else at  # time never runs backwards in a history
        settled = row.state == LeaseState.ENDING.value  # billed in full when it began ending
        row.state = advance(row.state, cause, key=row.id, story=[t.cause for t in hist[1:]])
        s.add(LeaseTransition(lease_id=row.id, seq=len(hist), at=at, state=row.state, cause=cause))
        row.updated_at = self.ctx.clock()
        # Whatever ran until now is paid now, in this transaction: billed = running, floored;
        # `until`: only what ran before it (the rest, if billed already, is taken back).
        new = [*hist, Transition(at, row.state, cause)]
        billed = billable_seconds(new, at) if until is None else billable_until(new, until)
        billed = row.billed_s if settled else min(billed, int(row.hours * 3600))
        ending = {LeaseCause.EXPIRED.value: "complete", LeaseCause.HW_UNPROVEN.value: "fail"}
        close = {
            LeaseState.ENDING.value: ending.get(cause, "cancel"),
            LeaseState.FAILED.value: "fail",
            LeaseState.ENDED.value: "cancel",
        }.get(row.state)
        order = s.get(MarketOrder, row.id)
        if order is not None and order.state not in OPEN_ORDER:
            close = None  # the market closed it already (it called us from its cancel)
        carry = None
        if restart and close is not None and order is not None:
            carry = self._restart(s, row, order, billed)
        self.money.bill_lease(s, row.id, row.billed_s, billed, close, carry)
        row.billed_s = billed if until is not None else max(row.billed_s, billed)

    def _restart(
        self, s: Session, row: Lease, order: MarketOrder, billed: int
    ) -> dict[str, Any] | None:
        """A new lease (pending) for a lost one's unused hours, linked both ways; returns
        its order's body, which the market opens with the escrow carried over."""
        restarts, back = 0, row.restarted_from
        while back is not None and restarts < 64:
            restarts += 1
            prev = s.get(Lease, back)
            back = prev.restarted_from if prev is not None else None
        hours = hours_to_restart(row.hours, billed, restarts)
        if hours is None:
            return None
        new_id = "lease_" + secrets.token_hex(6)
        avoid = sorted({*order.body.get("avoid", []), row.node_id})
        now = self.ctx.clock()
        s.add(
            Lease(
                id=new_id, key_id=row.key_id, node_id="", state=LeaseState.PENDING.value,
                spec=row.spec, hours=hours, billed_s=0, created_at=now, updated_at=now,
                message=f"restarts lease {row.id}, lost with its provider: a new, empty "
                "workspace on another provider, waiting for one",
                restart_on_loss=True, restarted_from=row.id,
            )
        )  # fmt: skip
        s.add(LeaseTransition(lease_id=new_id, seq=0, at=now, state="pending", cause="created"))
        row.restarted_as = new_id
        row.message = f"{LOST_FILES}. Restarted as lease {new_id} (a new, empty workspace)."
        return {**order.body, "id": new_id, "hours": hours, "avoid": avoid}

    def _adopt(self) -> list[str]:
        """Active lease orders without a placed lease get one, placed on their provider;
        a restarted lease whose order found nobody in time fails."""
        now = self.ctx.clock()
        made = []
        with self.store.tx() as s:
            waiting = {r.id: r for r in s.scalars(select(Lease).where(Lease.state == "pending"))}
            q = select(MarketOrder).where(
                MarketOrder.kind == "lease",
                MarketOrder.state == "active",
                or_(MarketOrder.id.not_in(select(Lease.id)), MarketOrder.id.in_(list(waiting))),
            )
            for order in s.scalars(q):
                legs = (order.placement or {}).get("legs") or []
                try:
                    spec = workspace_spec(order.body.get("resources") or {})
                except InvalidRequest as exc:
                    spec, legs = {}, []
                    reason = exc.message
                else:
                    reason = "a lease on several providers is not built" if len(legs) > 1 else ""
                row = waiting.pop(order.id, None)
                if row is None:
                    row = Lease(
                        id=order.id, key_id=order.key_id, state=LeaseState.PENDING.value,
                        billed_s=0, message=None, created_at=now, updated_at=now,
                        restart_on_loss=bool(order.body.get("restart_on_loss")),
                    )  # fmt: skip
                    s.add(row)
                    s.add(
                        LeaseTransition(
                            lease_id=row.id, seq=0, at=now, state="pending", cause="created"
                        )
                    )
                row.node_id = legs[0]["provider"] if legs else ""
                row.spec, row.hours = spec, float(order.body["hours"])
                s.flush()
                if reason:
                    row.message = reason
                    self._move(s, row, LeaseCause.NO_PROVIDER, now)
                    continue
                # A provider's hardware proofs of the leased class come first (docs/leases.md).
                verdict, proofs, why = gate(s, row.node_id, device_class(order.placement))
                if verdict is Gate.WAIT:
                    row.message = why
                    continue
                if verdict is Gate.FAIL:
                    row.message = f"{why}: {UNPROVEN}"
                    self._move(s, row, LeaseCause.HW_UNPROVEN, now)
                    continue
                row.message, row.proofs = None, list(proofs)
                self._move(s, row, LeaseCause.PLACED, now)
                made.append(row.id)
            for row in waiting.values():
                gone = s.get(MarketOrder, row.id)
                if gone is None or gone.state not in OPEN_ORDER:
                    row.message = NOBODY
                    self._move(s, row, LeaseCause.NO_PROVIDER, now)
        return made

    def _settle(self, live: frozenset[str]) -> list[tuple[str, str]]:
        """Bill running leases, end expired ones, fail those whose provider is gone or
        never answered; returns the (node, lease) pairs whose agent must wipe now."""
        now = self.ctx.clock()
        nodes = self._nodes()
        cutoff = now - self.ctx.settings.node_timeout_s
        wipe = []
        with self.store.tx() as s:
            for row in s.scalars(select(Lease).where(Lease.state.in_(PLACED), Lease.node_id != "")):
                seen = nodes.get(row.node_id)
                # `live` is from the pass's start; a lease adopted since may be on a node
                # registered after it (CI: a fresh grid's leases "lost"). Lost means now.
                if row.node_id not in live and not (seen is not None and seen.live_since(cutoff)):
                    lost_at = seen.last_seen if seen is not None else now
                    row.message = {
                        LeaseState.PENDING.value: LOST_EARLY,
                        LeaseState.ENDING.value: LOST_WIPE,
                    }.get(row.state, LOST_FILES)
                    restart = row.restart_on_loss and row.state != LeaseState.ENDING.value
                    self._move(s, row, LeaseCause.PROVIDER_LOST, min(now, lost_at), restart)
                    taken = penalise(self.store, s, row, now)
                    if taken:
                        row.message = (
                            f"{row.message} Its provider lost {taken} µcr of stake to you "
                            "for it (past its loss SLO)."
                        )
                    log.warning("lease %s: provider %s lost", row.id, row.node_id)
                    continue
                if row.state == LeaseState.PENDING.value:
                    continue  # its proofs decide (`_adopt`)
                if row.state != LeaseState.ENDING.value and self._revoke(s, row, now):
                    wipe.append((row.node_id, row.id))
                    continue
                if row.state == LeaseState.PROVISIONING.value:
                    since = _history(s, row.id)[-1].at
                    if now - since > self.provision_timeout_s:
                        # An agent that never answers (an older one ignores lease frames, or
                        # a pip install hangs) must not hold the escrow: fail, and have it
                        # wipe whatever it made.
                        row.message = (
                            f"provisioning failed: no answer within {self.provision_timeout_s:g} s"
                        )
                        self._move(s, row, LeaseCause.PROVISIONING_FAILED, now)
                        wipe.append((row.node_id, row.id))
                    continue
                if row.state != LeaseState.RUNNING.value:
                    continue
                hist = _history(s, row.id)
                # Billed only up to the provider's last sign of life: a provider that died
                # is found out a timeout later, and that time is the consumer's to keep.
                alive = min(now, seen.last_seen) if seen is not None else now
                if running_seconds(hist, now) >= row.hours * 3600:
                    ran_out = hist[-1].at + row.hours * 3600 - running_seconds(hist, hist[-1].at)
                    self._move(s, row, LeaseCause.EXPIRED, min(now, ran_out))
                    continue
                billed = billable_seconds(hist, max(alive, hist[-1].at))
                if billed > row.billed_s:
                    self.money.bill_lease(s, row.id, row.billed_s, billed, None)
                    row.billed_s = billed
        return wipe

    def _revoke(self, s: Session, row: Lease, now: float) -> bool:
        """End a placed lease whose provider failed a proof of the leased class since it
        was placed, billed only up to that kind's last pass (docs/leases.md)."""
        hist = _history(s, row.id)
        placed = next((t.at for t in hist if t.cause == LeaseCause.PLACED), None)
        order = s.get(MarketOrder, row.id)
        cls = device_class(order.placement if order is not None else None)
        found = None if placed is None else lapsed(s, row.node_id, cls, placed)
        if found is None:
            return False
        why, proven = found
        self._move(s, row, LeaseCause.HW_UNPROVEN, now, until=proven)
        row.message = f"{why}: {REVOKED.format(billed=row.billed_s)}"
        log.warning("lease %s: %s", row.id, why)
        return True

    def _on_state(self, node_id: str, lease_id: str, cause: str, reason: str | None) -> bool:
        with self.store.tx() as s:
            row = s.get(Lease, lease_id)
            if row is None or row.node_id != node_id:
                return False
            if cause == LeaseCause.PROVISIONED and row.state != LeaseState.PROVISIONING.value:
                return False  # a repeat, or it was cancelled meanwhile (the end follows)
            if cause == LeaseCause.WIPED and row.state != LeaseState.ENDING.value:
                return False
            if cause == LeaseCause.PROVISIONING_FAILED:
                if row.state != LeaseState.PROVISIONING.value:
                    return False
                row.message = f"provisioning failed: {reason or 'no reason given'}"[:4000]
            self._move(s, row, cause, self.ctx.clock())
            return True

    def on_register(self, node_id: str, swept: list[str]) -> None:
        """A provider came back having swept these leases' workspaces: wipes confirmed."""
        if swept:
            with self.store.tx() as s:
                confirm_wipes(s, node_id, swept)

    def end(self, lease_id: str, key_id: str | None) -> LeaseView:
        """End a lease now: billed up to now, the rest refunded; the agent wipes it."""
        with self.store.tx() as s:
            row = s.get(Lease, lease_id)
            if row is None or (key_id is not None and row.key_id != key_id):
                raise LeaseNotFound(lease_id)
            cause = LeaseCause.END if row.state == LeaseState.RUNNING.value else LeaseCause.CANCEL
            self._move(s, row, cause, self.ctx.clock())
        return self.get(lease_id, key_id)

    def extend(self, lease_id: str, key_id: str | None, hours: float) -> LeaseView:
        """Move a live lease's end `hours` later, its worst case escrowed first (402 and
        nothing changed if the balance cannot cover it; 409 once it is ending or over)."""
        if not 0 < hours <= MAX_EXTEND_H:
            raise InvalidRequest(f"hours: more than 0, at most {MAX_EXTEND_H:g}", param="hours")
        with self.store.tx() as s:
            row = s.get(Lease, lease_id)
            if row is None or (key_id is not None and row.key_id != key_id):
                raise LeaseNotFound(lease_id)
            if row.state not in EXTENDABLE:
                raise Conflict(
                    f"lease {lease_id} is {row.state}: only a live lease can be extended",
                    state=row.state,
                )
            self.money.extend_lease(s, row.id, hours)
            row.hours += hours
            row.updated_at = self.ctx.clock()
        return self.get(lease_id, key_id)

    async def end_now(self, lease_id: str, key_id: str | None) -> LeaseView:
        """`end`, and the agent told at once (not on the next tick)."""
        view = await self.ctx.db(self.end, lease_id, key_id)
        if view.state == LeaseState.ENDING.value:
            await self._send_end(view.node_id, lease_id)
        return view

    def ends_order(self, order_id: str, key_id: str | None) -> bool:
        """Whether an order is a lease's (then its cancel ends the lease: `end`)."""
        with self.store.read() as s:
            row = s.get(Lease, order_id)
            return row is not None and (key_id is None or row.key_id == key_id)

    # ---- the tick and the channel -------------------------------------------------------

    async def tick(self, live: frozenset[str]) -> None:
        """Adopt new lease orders, settle, and send what agents have not been told yet."""
        await self.ctx.db(self._adopt)
        for node, lease_id in await self.ctx.db(self._settle, live):
            await self._send_end(node, lease_id)
        todo = await self.ctx.db(self._to_tell)
        for lease_id, node, kind, spec in todo:
            if (lease_id, kind) in self._sent or node not in self.links:
                continue
            if kind == "provision":
                await self._send(node, frame("provision", lease_id, spec=spec), (lease_id, kind))
            else:
                await self._send_end(node, lease_id)
        for rid, relay in list(self.relays.items()):
            if relay.node_id not in live:
                relay.fail("the provider was lost")
            if relay.done and not relay.attached:
                self.relays.pop(rid, None)

    def _to_tell(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        with self.store.read() as s:
            q = select(Lease).where(
                Lease.state.in_((LeaseState.PROVISIONING.value, LeaseState.ENDING.value))
            )
            return [
                (r.id, r.node_id, "provision" if r.state == "provisioning" else "end", r.spec)
                for r in s.scalars(q)
            ]

    async def _send(
        self, node: str, msg: dict[str, Any] | bytes, key: tuple[str, str] | None
    ) -> bool:
        send = self.links.get(node)
        if send is None:
            return False
        try:
            await send(msg)
        except Exception as exc:  # the channel went down: the next attach resends
            log.info("lease frame to %s not sent: %s", node, exc)
            return False
        if key is not None:
            self._sent.add(key)
        return True

    async def _send_end(self, node: str, lease_id: str) -> None:
        for relay in self.relays.values():
            if relay.lease_id == lease_id:
                relay.fail("the lease ended")
        await self._send(node, frame("end", lease_id), (lease_id, "end"))

    def attach(self, node_id: str, send: Send) -> None:
        """A node's channel is up: lease frames go through it (unsent ones are resent)."""
        self.links[node_id] = send
        self._sent.clear()  # a frame sent before may have been lost: agents answer repeats

    def detach(self, node_id: str, send: Send) -> None:
        """A node's channel closed; running execs there have lost their stream."""
        if self.links.get(node_id) is send:
            del self.links[node_id]
            self._sent.clear()  # resent on the next attach: agents answer repeats again
            for relay in self.relays.values():
                if relay.node_id == node_id:
                    relay.fail("the provider's channel closed")

    async def on_agent_frame(self, node_id: str, msg: LeaseFrame) -> None:
        """A lease frame from an agent: a state report or part of an exec stream."""
        if msg.type in ("provisioned", "provisioning-failed", "wiped"):
            cause = {"provisioned": "provisioned", "wiped": "wiped"}.get(
                msg.type, "provisioning-failed"
            )
            try:
                await self.ctx.db(self._on_state, node_id, msg.lease, cause, msg.reason)
            except Conflict as exc:
                log.warning("lease %s: %s from %s refused: %s", msg.lease, cause, node_id, exc)
            return
        relay = self.relays.get(msg.exec or "")
        if relay is None or relay.node_id != node_id:
            return  # an exec that ended here already: what it still sends is dropped
        relay.on_agent(msg)

    def on_agent_data(self, node_id: str, raw: bytes) -> None:
        """A data frame from an agent's channel (BadDataFrame if it is not one): taken only
        for an exec opened on that agent (the channel's signed handshake says who sent it)."""
        exec_id, stream, framed = read_frame(raw)
        relay = self.relays.get(exec_id)
        if relay is not None and relay.node_id == node_id:
            relay.on_data(stream, framed)

    # ---- exec ---------------------------------------------------------------------------

    async def open_exec(
        self,
        lease_id: str,
        key_id: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "/work",
        stdin: bool = False,
        log: bool = True,
        forward: int | None = None,
    ) -> ExecRelay:
        """Start `argv` in a running lease's workspace and relay its streams (its output
        kept in the lease's logs unless `log` is false)."""
        view = await self.ctx.db(self.get, lease_id, key_id)
        if view.state != LeaseState.RUNNING.value:
            then = f"; it was restarted as lease {view.restarted_as}" if view.restarted_as else ""
            raise Conflict(
                f"lease {lease_id} is {view.state}: exec needs it running{then}",
                state=view.state,
            )
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidRequest("argv: a non-empty list of strings", param="argv")
        ring = self._log(lease_id) if log else None
        relay = ExecRelay(lease_id, view.node_id, self._sender(view.node_id), ring)
        self.relays[relay.id] = relay
        ok = await self._send(
            view.node_id,
            frame(
                "exec",
                lease_id,
                exec=relay.id,
                argv=argv,
                env=env or {},
                cwd=cwd,
                stdin=stdin,
                window=relay.window,
                forward=forward,
            ),  # fmt: skip
            None,
        )
        if not ok:
            self.relays.pop(relay.id, None)
            raise Conflict(f"lease {lease_id}: its provider is not connected now", state="running")
        return relay

    def _sender(self, node: str) -> Callable[[dict[str, Any] | bytes], Awaitable[bool]]:
        async def send(msg: dict[str, Any] | bytes) -> bool:
            return await self._send(node, msg, None)

        return send

    def _log(self, lease_id: str) -> bytearray:
        return self.logs.setdefault(lease_id, bytearray())
