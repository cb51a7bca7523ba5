"""The provider agent: register, heartbeat, serve (agent/serving.py) and run its roles
(agent/roles/) until SIGTERM, then drain.

The agent is the composition root: it builds the `AgentContext` that serving and the roles
share, builds each role with it, and hands every role each heartbeat answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import httpx

from idlegrid import PROTOCOL_VERSION
from idlegrid.agent.channel import Channel
from idlegrid.agent.context import AgentConfig, AgentContext, Role
from idlegrid.agent.leases import LeaseHost
from idlegrid.agent.node_client import CoordinatorError, NodeClient
from idlegrid.agent.roles.disputes import Disputes
from idlegrid.agent.roles.hwprover import HonestProver, HwProofs
from idlegrid.agent.roles.trainer import Training
from idlegrid.agent.roles.verifier import Verifier
from idlegrid.agent.serving import Serving
from idlegrid.core.market.hardware import device_groups
from idlegrid.engines.base import Engine
from idlegrid.errors import AuthError, IdlegridError
from idlegrid.protocol.messages import MAX_SWEPT

__all__ = ["Agent", "AgentConfig", "Roles"]

log = logging.getLogger("idlegrid.agent")


@dataclass(frozen=True)
class Roles:
    """The agent's roles, in the order their loops start and heartbeats reach them."""

    verifier: Verifier
    training: Training
    hwproofs: HwProofs
    disputes: Disputes  # both kinds

    def __iter__(self) -> Iterator[Role]:
        return (getattr(self, f.name) for f in fields(self))


class Agent:
    """A provider agent serving one model on one or more engine instances."""

    def __init__(
        self,
        client: NodeClient,
        engines: Sequence[Engine],
        config: AgentConfig,
        prover: HonestProver | None = None,
    ) -> None:
        if not engines:
            raise ValueError("an agent needs at least one engine")
        self.ctx = AgentContext(client, engines, config)
        self.client = client
        self.config = config
        self.engines = self.ctx.engines
        self.model_id = self.ctx.model_id
        self.draining = self.ctx.draining
        self.heartbeat_s = 2.0
        self.serving = Serving(self.ctx, self.register)
        # Leases: workspaces made and run on the coordinator's word, over the channel.
        self.leases = LeaseHost(config, client.key.node_id)
        self.swept: list[str] = []  # lease ids the start-up sweep wiped, told at registration
        self.serving.on_channel = self.leases.attach
        bind = getattr(config.meter, "bind_busy", None)
        if bind is not None:  # an estimating meter draws serving power only while serving
            bind(lambda: len(self.serving.energy.active))
        verifier, training = Verifier(self.ctx), Training(self.ctx)
        # Hardware challenges: the prover answers them (testbed cheats plug in here).
        self.roles = Roles(
            verifier, training, HwProofs(self.ctx, prover), Disputes(self.ctx, verifier, training)
        )

    @property
    def channel(self) -> Channel | None:
        """The agent channel while serving holds one."""
        return self.serving.channel

    @property
    def jobs(self) -> set[Any]:
        """The task attempts serving holds now."""
        return self.serving.jobs

    @property
    def served(self) -> int:
        """Task attempts served to the end."""
        return self.serving.served

    # ---- protocol ----------------------------------------------------------------------

    async def register(self) -> None:
        """Announce hardware, engine, measured speed and prices."""
        answer = await self.client.call(
            "/api/v1/nodes/register",
            {
                "protocol_version": PROTOCOL_VERSION,
                "name": self.config.name,
                "hardware": self.config.hardware,
                "engine": self._engine_facts(),
                "slots": len(self.engines),
                "prefill_tps": self.config.prefill_tps,
                "decode_tps": self.config.decode_tps,
                "offers": [
                    {
                        "model": self.model_id,
                        "prompt_price": self.config.price.prompt,
                        "output_price": self.config.price.output,
                    }
                ],
                "region": self.config.region,
                "links": self.config.links,
                "link_latency_ms": self.config.link_latency_ms,
                "devices": self._devices(),
                "lease": self.config.lease_controls.to_dict(),
                "verifier": self.config.verifier or self.config.train_verifier,
                "batch": self.config.batch,
                "batch_price_bps": self.config.batch_price_bps,
                "swept": self.swept,
            },
        )
        assert answer is not None
        self.heartbeat_s = float(answer["heartbeat_interval_s"])
        log.info("registered as %s (%s)", answer["node_id"], self.config.name)

    def _engine_facts(self) -> dict[str, Any]:
        facts = self.engines[0].describe()
        if self.config.headroom is not None:
            facts = {**facts, "headroom": self.config.headroom}
        return facts

    def _devices(self) -> list[dict[str, Any]]:
        if self.config.device_price_h is None:
            return []
        groups = self.config.devices or device_groups(self.config.hardware)
        return [{**g, "price_h": g.get("price_h", self.config.device_price_h)} for g in groups]

    def stake_short(self, posted: dict[str, int]) -> bool:
        """Whether any device group's posted stake is below the configured amount."""
        want = self.config.stake_per_device
        return any(posted.get(g["model"], 0) < want * g["count"] for g in self._devices())

    async def stake(self, posted: dict[str, int] | None = None) -> bool:
        """Bring every device group's stake up to the configured amount; False while the
        balance is short. `posted`: what the coordinator last said is posted (None at start:
        the first post's ref is fixed, so a restarted agent does not post it twice)."""
        if not self.config.stake_per_device:
            return True
        for g in self._devices():
            want = self.config.stake_per_device * g["count"]
            if posted is None:
                amount, ref = want, f"auto-{g['model']}-{want}"
            else:
                # A slash left it short: top up from earnings. The ref is new per top-up
                # (the heartbeat that reports the next shortfall is read after this one).
                amount = want - posted.get(g["model"], 0)
                ref = f"top-{g['model']}-{amount}-{secrets.token_hex(6)}"
            if amount <= 0:
                continue
            try:
                await self.client.call(
                    "/api/v1/nodes/stake",
                    {"device_class": g["model"], "amount": amount, "ref": ref},
                )
            except CoordinatorError as exc:
                if exc.data.get("status") == 402:  # not enough credits yet
                    return False
                raise
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain: finish or hand back what is held."""
        for role in self.roles:
            await role.warm()
        # Before any lease of this run starts; the registration reports what it wiped.
        self.swept = (await asyncio.to_thread(self.leases.sweep))[:MAX_SWEPT]
        await self._until_registered(stop)
        beats = asyncio.create_task(self._heartbeats())
        # Before the slots, or their first polls go over HTTP.
        await self.serving.connect_channel()
        keeper = asyncio.create_task(self.serving.keep_channel())
        slots = [asyncio.create_task(self.serving.slot(e, i)) for i, e in enumerate(self.engines)]
        slots += [asyncio.create_task(loop) for role in self.roles for loop in role.loops()]
        await stop.wait()
        log.info("draining: no new work; finishing %d held request(s)", len(self.jobs))
        self.draining.set()
        with contextlib.suppress(httpx.HTTPError, IdlegridError):
            await self.client.call("/api/v1/nodes/heartbeat", {"state": "draining"})
        done, pending = await asyncio.wait(slots, timeout=self.config.drain_grace_s)
        if pending:
            for job in list(self.jobs):
                job.cancel.set()  # the serve loop hands these back
            await asyncio.wait(pending, timeout=10)
        beats.cancel()
        keeper.cancel()
        await self.leases.close()  # a stopping provider's workspaces end with it
        if self.channel is not None:
            await self.channel.close()
        await self.client.close()
        self.serving.engine_threads.shutdown(wait=False)

    async def _until_registered(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            try:
                await self.register()
                return
            except (httpx.TransportError, AuthError) as exc:
                log.warning("coordinator not reachable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _heartbeats(self) -> None:
        staked = False
        posted: dict[str, int] | None = None  # as the last heartbeat answer said
        while True:
            if not staked:
                # A new provider earns or is given credits first; until then it keeps trying.
                try:
                    staked = await self.stake(posted)
                except (httpx.HTTPError, IdlegridError) as exc:
                    log.warning("staking failed: %s", exc)
            await asyncio.sleep(self.heartbeat_s)
            state = "draining" if self.draining.is_set() else "live"
            try:
                beat = await self.client.call(
                    "/api/v1/nodes/heartbeat",
                    {"state": state, "in_flight": len(self.jobs), "power": self.power_report()},
                )
                for role in self.roles:  # hardware challenges and dispute rounds ride here
                    role.on_heartbeat(beat or {})
                stakes = (beat or {}).get("stakes")
                if staked and isinstance(stakes, dict):
                    posted = stakes
                    staked = not self.stake_short(posted)
            except AuthError:
                await self.register()  # the coordinator forgot us (fresh database)
            except (httpx.HTTPError, IdlegridError) as exc:
                log.warning("heartbeat failed: %s", exc)

    def power_report(self) -> dict[str, Any] | None:
        """The energy counter and current draw, for heartbeats (None without a meter)."""
        meter = self.config.meter
        if meter is None:
            return None
        joules = meter.joules()
        self.serving.energy.advance(joules)
        return {
            "joules_total": joules,
            "watts": meter.watts(),
            "source": meter.source,
            "estimated": meter.estimated,
        }
