"""Nodes: signed-request authentication, registration, heartbeats, the node cache that
routing reads, and API keys. What other domains do when a node registers or goes quiet
they do on `NodeRegistered` / `LiveNodesChanged` (coordinator/events.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from idlegrid import PROTOCOL_VERSION
from idlegrid.coordinator.context import Context
from idlegrid.coordinator.events import LiveNodesChanged, NodeRegistered
from idlegrid.coordinator.nodes.limiter import KeyLimiter, KeyLimits
from idlegrid.coordinator.views import NodeView
from idlegrid.core.ledger import Price
from idlegrid.core.market.hardware import canonical_gpu
from idlegrid.errors import AuthError, Conflict, InvalidRequest, SpendCapReached
from idlegrid.protocol.signing import Verifier

NODE_RELOAD_S = 30.0
KEY_CACHE_S = 30.0


class Nodes:
    """Who the providers are, whether they are alive, and who holds which API key."""

    def __init__(self, ctx: Context, challenges: Callable[[str], list[str]]) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = ctx.store
        # Hardware challenges waiting for a node (trust's hardware proofs): heartbeats
        # answer with them.
        self._challenges = challenges
        self.verifier = Verifier(ctx.clock, ctx.settings.signature_skew_s)
        self._keys: dict[str, bytes] = {}  # node id -> public key, cached: checked per upload
        # bearer secret -> (key id, cached until)
        self._api_keys: dict[str, tuple[str, float]] = {}
        self._limits: dict[str, tuple[KeyLimits, float]] = {}
        self.limiter = KeyLimiter(ctx.settings.rate_limit_storage)
        # Node views cached for routing, refreshed by the supervisor and on registration:
        # routing a request then touches no database before its escrow is written.
        self.cache: dict[str, NodeView] = {}
        self._live_signature: frozenset[str] = frozenset()
        self._nodes_at = 0.0
        # Latest power report per node (shown live) and when one was last stored.
        self.power: dict[str, dict[str, Any]] = {}
        self._power_stored: dict[str, float] = {}

    async def refresh(self) -> dict[str, NodeView]:
        """Reload the node cache from the store."""
        self.cache = {n.id: n for n in await self.ctx.db(self.store.nodes)}
        return self.cache

    async def on_register(self, event: NodeRegistered) -> None:
        """A node registered: routing sees it from now on."""
        await self.refresh()

    # ---- node authentication -----------------------------------------------------------

    async def authenticate_node(
        self, method: str, path: str, body: bytes, headers: Any, public_key: bytes | None = None
    ) -> str:
        """Verify a signed node request; `public_key` is given only at registration."""
        try:
            if public_key is None:
                node_id = headers.get("x-idlegrid-node", "")
                public_key = self._keys.get(node_id)
                if public_key is None:
                    public_key = await self.ctx.db(self.store.node_public_key, node_id)
                    if public_key is None:
                        raise AuthError("unknown node: register first")
                    self._keys[node_id] = public_key
            return self.verifier.verify(method, path, body, headers, public_key)
        except AuthError as exc:
            self.ctx.metrics.auth_failures.labels(exc.reason.split(" (")[0]).inc()
            raise

    def node_key(self, node_id: str) -> bytes | None:
        """A node's public key if this process has seen it authenticate."""
        return self._keys.get(node_id)

    # ---- agents ------------------------------------------------------------------------

    async def register(
        self, node_id: str, public_key: bytes, body: dict[str, Any], address: str = ""
    ) -> dict[str, Any]:
        """Record a node's profile and offers; answer with the settings agents must follow."""
        if body.get("protocol_version") != PROTOCOL_VERSION:
            raise Conflict(
                f"protocol version {body.get('protocol_version')} is not supported; "
                f"this coordinator speaks {PROTOCOL_VERSION}",
                supported=[PROTOCOL_VERSION],
            )
        offers = {o["model"]: Price(o["prompt_price"], o["output_price"]) for o in body["offers"]}
        cutoff = self.ctx.clock() - self.settings.node_timeout_s
        clash = next(
            (
                n
                for n in self.cache.values()
                if n.name == body["name"] and n.id != node_id and n.present_since(cutoff)
            ),
            None,
        )
        if clash is not None:
            # Names are how people tell providers apart (dashboard, CLI, logs): one live node
            # per name. A node gone quiet frees its name.
            raise Conflict(
                f"the name {body['name']!r} belongs to another live node",
                code="name_taken",
                param="name",
            )
        try:
            # Checked before anything is written: a bad device list leaves no trace.
            devices = [{**d, "model": canonical_gpu(d["model"])} for d in body.get("devices") or []]
        except InvalidRequest as exc:
            raise InvalidRequest(f"devices: {exc.message}", param="devices") from exc
        body = {**body, "devices": devices}
        await self.ctx.db(
            self.store.upsert_node,
            node_id=node_id,
            public_key=public_key,
            name=body["name"],
            protocol_version=body["protocol_version"],
            hardware=body["hardware"],
            engine=body["engine"],
            slots=body["slots"],
            prefill_tps=body["prefill_tps"],
            decode_tps=body["decode_tps"],
            offers=offers,
            batch=body.get("batch", True),
            batch_price_bps=body.get("batch_price_bps"),
        )
        self._keys[node_id] = public_key
        await self.ctx.events.emit(NodeRegistered(node_id, body, address))
        self.ctx.changes.bump()
        return {
            "node_id": node_id,
            "heartbeat_interval_s": self.settings.heartbeat_interval_s,
            "long_poll_s": self.settings.long_poll_s,
            "protocol_version": PROTOCOL_VERSION,
            "stake_per_device": self.settings.stake_per_device,
        }

    async def heartbeat(
        self, node_id: str, state: str | None, power: dict[str, Any] | None = None
    ) -> list[str]:
        """A node is alive (and maybe draining): keep its energy counter every few seconds,
        answer with the hardware challenges waiting for it."""
        await self.ctx.db(self.store.touch_node, node_id, state)
        self.touch(node_id, state)
        if power is not None:
            now = self.ctx.clock()
            if (
                now - self._power_stored.get(node_id, -1e18)
                >= self.settings.power_sample_interval_s
            ):
                self._power_stored[node_id] = now
                # No change bump: with many providers that would be a refresh per
                # heartbeat; the dashboard's idle refresh picks new samples up within seconds.
                await self.ctx.db(
                    self.store.add_power_sample,
                    node_id,
                    power["joules_total"],
                    power.get("watts"),
                    power["source"],
                    power["estimated"],
                )
            # Shown only once stored, so a node with a live reading has a sample to sum.
            self.power[node_id] = {**power, "at": now}
        return await self.ctx.db(self._challenges, node_id)

    async def seen(self, node_id: str) -> None:
        """A poll is a sign of life: store it and keep the cache in step."""
        await self.ctx.db(self.store.touch_node, node_id)
        self.touch(node_id)

    def touch(self, node_id: str, state: str | None = None) -> None:
        """Keep the cached view in step with what was just written, without a reload."""
        node = self.cache.get(node_id)
        if node is not None:
            self.cache[node_id] = dataclasses.replace(
                node, last_seen=self.ctx.clock(), state=state or node.state
            )

    async def tick(self) -> frozenset[str]:
        """The live nodes now; `LiveNodesChanged` when the set moved since the last pass."""
        now = self.ctx.clock()
        # Heartbeats and polls keep the cache current; a full reload (10,000 nodes is real
        # work) only now and then, for changes made elsewhere.
        if now - self._nodes_at >= NODE_RELOAD_S:
            await self.refresh()
            self._nodes_at = now
        cutoff = now - self.settings.node_timeout_s
        live = frozenset(n.id for n in self.cache.values() if n.live_since(cutoff))
        self.ctx.metrics.live_nodes.set(len(live))
        if live != self._live_signature:
            lost = self._live_signature - live
            self._live_signature = live
            await self.ctx.events.emit(LiveNodesChanged(live, lost))
        return live

    # ---- consumers' keys ---------------------------------------------------------------

    async def authenticate_key(self, authorization: str | None) -> str:
        """The key id behind a bearer token, or AuthError."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        secret = authorization[7:].strip()
        now = self.ctx.clock()
        cached = self._api_keys.get(secret)
        if cached is not None and cached[1] > now:
            return cached[0]
        # Cached for a while: a revocation here drops it at once, one made by another
        # coordinator process is seen within KEY_CACHE_S.
        key_id = await self.ctx.db(self.store.key_for_secret, secret)
        if len(self._api_keys) > 100_000:
            self._api_keys.clear()
        self._api_keys[secret] = (key_id, now + KEY_CACHE_S)
        return key_id

    async def admit(self, key_id: str, tokens: int) -> None:
        """Refuse (429) a request past the key's spend cap or over its rate limits;
        `tokens` is the request's prompt bound plus the most it may generate."""
        now = self.ctx.clock()
        cached = self._limits.get(key_id)
        if cached is None or cached[1] <= now:
            cap, rpm, tpm = await self.ctx.db(self.store.key_limits, key_id)
            cached = (KeyLimits(cap, rpm, tpm), now + KEY_CACHE_S)
            if len(self._limits) > 100_000:
                self._limits.clear()
            self._limits[key_id] = cached
        limits = cached[0]
        if limits.spend_cap is not None:
            # Spent includes what open requests hold: a cap is never passed by more than
            # the request that reaches it.
            spent = await self.ctx.db(self.store.key_spent, key_id)
            if spent >= limits.spend_cap:
                raise SpendCapReached(key_id, limits.spend_cap, spent)
        self.limiter.admit(key_id, limits, tokens)

    def forget_limits(self, key_id: str) -> None:
        """Drop a key's cached limits: they changed here."""
        self._limits.pop(key_id, None)

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke an API key: its requests are refused from now on."""
        changed = await self.ctx.db(self.store.revoke_api_key, key_id)
        for secret in [s for s, (k, _) in self._api_keys.items() if k == key_id]:
            del self._api_keys[secret]
        return changed
