"""Rows about nodes: profiles and offers, liveness, API keys and power samples.

A mixin of `Store` (db/store.py), like the ledger's: it shares the store's sessions and
clock."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import (
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from idlegrid.coordinator.db.tables import (
    Account,
    ApiKey,
    LedgerEntry,
    LedgerPosting,
    Node,
    Offer,
    PowerSample,
)
from idlegrid.coordinator.views import NodeView, PowerRow
from idlegrid.core import ledger
from idlegrid.core.ledger import Price
from idlegrid.core.nodes import NODE
from idlegrid.errors import AuthError, NotFound


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class NodeStore:
    """Nodes, API keys and power samples, inside the store's transactions."""

    clock: Callable[[], float]

    def tx(self) -> AbstractContextManager[Session]:
        """A write transaction (the store provides it)."""
        raise NotImplementedError

    def read(self) -> AbstractContextManager[Session]:
        """A read transaction (the store provides it)."""
        raise NotImplementedError

    def upsert_node(
        self,
        *,
        node_id: str,
        public_key: bytes,
        name: str,
        protocol_version: int,
        hardware: dict[str, Any],
        engine: dict[str, Any],
        slots: int,
        prefill_tps: float,
        decode_tps: float,
        offers: dict[str, Price],
        batch: bool = True,
        batch_price_bps: int | None = None,
    ) -> None:
        """Register a node, or refresh its profile and offers when it comes back."""
        now = self.clock()
        with self.tx() as s:
            node = s.get(Node, node_id)
            if node is None:
                node = Node(id=node_id, registered_at=now, state=NODE.begin("live", key=node_id))
                s.add(node)
            elif node.state != "live":  # registering again is no move for a live node
                node.state = NODE.move(node.state, "live", key=node_id, story=("register",))
            node.public_key = public_key.hex()
            node.name = name
            node.protocol_version = protocol_version
            node.hardware = hardware
            node.engine = engine
            node.slots = slots
            node.prefill_tps = prefill_tps
            node.decode_tps = decode_tps
            node.batch, node.batch_price_bps = batch, batch_price_bps
            node.last_seen = now
            s.flush()
            for offer in s.scalars(select(Offer).where(Offer.node_id == node_id)):
                s.delete(offer)
            s.flush()
            for model_id, price in offers.items():
                s.add(
                    Offer(
                        node_id=node_id,
                        model_id=model_id,
                        prompt_price=price.prompt,
                        output_price=price.output,
                    )
                )

    def node_public_key(self, node_id: str) -> bytes | None:
        """The registered key of a node, if any."""
        with self.read() as s:
            node = s.get(Node, node_id)
            return bytes.fromhex(node.public_key) if node else None

    def touch_node(self, node_id: str, state: str | None = None) -> None:
        """Record a heartbeat (and a state change such as draining)."""
        values: dict[str, Any] = {"last_seen": self.clock()}
        with self.tx() as s:
            if state:
                # A heartbeat that repeats the node's state is no move; a change is checked.
                now_in = s.scalar(select(Node.state).where(Node.id == node_id))
                if now_in is not None and now_in != state:
                    values["state"] = NODE.move(now_in, state, key=node_id, story=("heartbeat",))
            s.execute(update(Node).where(Node.id == node_id).values(**values))

    def nodes(self) -> list[NodeView]:
        """Every node ever registered, with its offers."""
        # Plain rows, not ORM objects: with thousands of nodes this runs every few seconds.
        with self.read() as s:
            offers: dict[str, dict[str, Price]] = {}
            for node_id, model_id, prompt, output in s.execute(
                select(Offer.node_id, Offer.model_id, Offer.prompt_price, Offer.output_price)
            ):
                offers.setdefault(node_id, {})[model_id] = Price(prompt, output)
            n = Node.__table__.c
            return [
                NodeView(
                    r.id,
                    r.name,
                    bytes.fromhex(r.public_key),
                    r.state,
                    r.slots,
                    r.prefill_tps,
                    r.decode_tps,
                    r.last_seen,
                    dict(r.hardware),
                    dict(r.engine),
                    offers.get(r.id, {}),
                    bool(r.batch),
                    r.batch_price_bps,
                )
                for r in s.execute(select(Node.__table__).order_by(n.registered_at))
            ]

    def known_models(self) -> set[str]:
        """Every model any node has ever offered."""
        with self.read() as s:
            return set(s.scalars(select(Offer.model_id).distinct()))

    def live_nodes(self, timeout_s: float) -> list[NodeView]:
        """Nodes heard from within `timeout_s` that take new work."""
        cutoff = self.clock() - timeout_s
        return [n for n in self.nodes() if n.live_since(cutoff)]

    def create_api_key(
        self,
        name: str,
        spend_cap: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[str, str]:
        """A new consumer key: (key id, secret). The secret is shown once and never stored."""
        key_id = "key_" + secrets.token_hex(8)
        secret = f"ig-{key_id[4:]}-{secrets.token_urlsafe(24)}"
        with self.tx() as s:
            s.add(
                ApiKey(
                    id=key_id,
                    secret_hash=_hash_secret(secret),
                    name=name,
                    created_at=self.clock(),
                    spend_cap=spend_cap,
                    rpm=rpm,
                    tpm=tpm,
                )
            )
        return key_id, secret

    def api_keys(self) -> list[dict[str, Any]]:
        """Every consumer key: name, state, limits, balance and what it has spent (µcr)."""
        with self.read() as s:
            keys = s.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
            return [
                {
                    "key_id": k.id,
                    "name": k.name,
                    "created_at": k.created_at,
                    "revoked_at": k.revoked_at,
                    "spend_cap": k.spend_cap,
                    "rpm": k.rpm,
                    "tpm": k.tpm,
                    **self._money(s, k.id),
                }
                for k in keys
            ]

    def key_limits(self, key_id: str) -> tuple[int | None, int | None, int | None]:
        """(spend cap, requests per minute, tokens per minute) of a key."""
        with self.read() as s:
            row = s.execute(
                select(ApiKey.spend_cap, ApiKey.rpm, ApiKey.tpm).where(ApiKey.id == key_id)
            ).first()
        return (row[0], row[1], row[2]) if row else (None, None, None)

    def set_key_limits(self, key_id: str, limits: dict[str, int | None]) -> None:
        """Replace the named limits of a key (NotFound if there is none)."""
        with self.tx() as s:
            key = s.get(ApiKey, key_id, with_for_update=True)
            if key is None:
                raise NotFound(f"no API key {key_id}", key_id=key_id)
            for name in ("spend_cap", "rpm", "tpm"):
                if name in limits:
                    setattr(key, name, limits[name])

    def key_spent(self, key_id: str) -> int:
        """µcr a key has spent or holds in escrow: what was deposited less its balance."""
        with self.read() as s:
            return int(self._money(s, key_id)["spent"])

    def _money(self, s: Session, key_id: str) -> dict[str, int]:
        account = ledger.consumer_account(key_id)
        balance = s.scalar(select(Account.balance).where(Account.id == account)) or 0
        deposited = s.scalar(
            select(func.coalesce(func.sum(LedgerPosting.amount), 0))
            .join(LedgerEntry, LedgerEntry.seq == LedgerPosting.entry_seq)
            .where(LedgerPosting.account == account, LedgerEntry.memo == "mint")
        )
        return {"balance": int(balance), "spent": int(deposited or 0) - int(balance)}

    def key_for_secret(self, secret: str) -> str:
        """The key id for a bearer secret, or AuthError (unknown or revoked)."""
        with self.read() as s:
            row = s.execute(
                select(ApiKey.id, ApiKey.revoked_at).where(
                    ApiKey.secret_hash == _hash_secret(secret)
                )
            ).first()
        if row is None:
            raise AuthError("invalid API key")
        if row[1] is not None:
            raise AuthError("this API key was revoked")
        return str(row[0])

    def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key (NotFound if there is none); False if it already was."""
        with self.tx() as s:
            key = s.get(ApiKey, key_id, with_for_update=True)
            if key is None:
                raise NotFound(f"no API key {key_id}", key_id=key_id)
            if key.revoked_at is not None:
                return False
            key.revoked_at = self.clock()
            return True

    def add_power_sample(
        self, node_id: str, joules_total: float, watts: float | None, source: str, estimated: bool
    ) -> None:
        """Record a node's energy counter as reported by a heartbeat."""
        with self.tx() as s:
            s.add(
                PowerSample(
                    node_id=node_id,
                    t=self.clock(),
                    joules_total=joules_total,
                    watts=watts,
                    source=source,
                    estimated=estimated,
                )
            )

    def power_samples(self, since: float) -> dict[str, list[PowerRow]]:
        """Per node, (t, joules_total, watts, estimated) since `since`, oldest first."""
        with self.read() as s:
            rows = s.execute(
                select(
                    PowerSample.node_id,
                    PowerSample.t,
                    PowerSample.joules_total,
                    PowerSample.watts,
                    PowerSample.estimated,
                )
                .where(PowerSample.t >= since)
                .order_by(PowerSample.t)
            ).all()
        out: dict[str, list[PowerRow]] = {}
        for node_id, t, j, w, est in rows:
            out.setdefault(node_id, []).append((t, j, w, bool(est)))
        return out
