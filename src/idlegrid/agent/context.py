"""What a role may touch on its agent: the client, the config, the drain flag, the engines
and their locks, and the commitments kept for disputes.

Roles (agent/roles/) are built with an `AgentContext`, never with the `Agent`: a role reads
and writes its own state and this, and nothing of another role's that it was not handed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from idlegrid.agent.hardware.power import PowerMeter
from idlegrid.agent.node_client import NodeClient
from idlegrid.core.lease.controls import LeaseControls
from idlegrid.core.ledger import Price
from idlegrid.engines.base import Engine
from idlegrid.errors import IdlegridError

log = logging.getLogger("idlegrid.agent")

KEEP = 4096  # recent commitments and reports kept to answer disputes (the oldest go first)


@dataclass
class AgentConfig:
    """What an agent advertises and how it behaves."""

    name: str
    price: Price
    hardware: dict[str, Any]
    prefill_tps: float
    decode_tps: float
    drain_grace_s: float = 30.0
    poll_wait_s: float = 15.0
    upload_interval_s: float = 0.025
    # The same for a consumer that is not streaming: it sees nothing until the end, so only
    # failover and stall detection read these uploads.
    batch_upload_interval_s: float = 0.25
    # Take tasks and send output on the agent channel (a WebSocket) while it is up;
    # False: the HTTP long poll and one request per upload only.
    channel: bool = True
    # Market: where the node is, what a device-hour costs (µcr; None sells no device-hours),
    # the device groups on sale (default: what the probe found), measured links to peers
    # (node id -> Gbit/s), and the stake to post per device once the balance allows it.
    region: str = "local"
    device_price_h: int | None = None
    devices: list[dict[str, Any]] | None = None
    links: dict[str, float] = field(default_factory=dict)
    link_latency_ms: dict[str, float] = field(default_factory=dict)  # node id -> one-way ms
    stake_per_device: int = 0
    # Verifier mode: also take audits (re-check other providers' answers) on engine 0.
    verifier: bool = False
    # Batch lines (docs/batch.md): taken or not, and priced at this share of `price` in
    # basis points (None: the grid's default).
    batch: bool = True
    batch_price_bps: int | None = None
    # Of its slots, how many batch lines may not take (None: the engine's own, a batch's
    # headroom sequence; the coordinator's candidates.batch_slots reads it).
    headroom: int | None = None
    # Where energy readings come from (agent.hardware.power.choose_meter); None reports no energy.
    meter: PowerMeter | None = None
    # Training (agent/roles/trainer.py): take training jobs, and/or re-execute audited segments.
    # The executor and the verify function are the honest ones unless a test plugs in cheats.
    trainer: bool = False
    train_verifier: bool = False
    train_threads: int | None = None
    # Host this node serves a data-parallel gang's rendezvous on (loopback on a local grid);
    # None: it takes single-provider training jobs only.
    train_gang_host: str | None = None
    # How long a gang member waits for the others (rendezvous, then each collective) before
    # the gang's segment fails and the job resumes from its last committed checkpoint.
    train_gang_timeout_s: float = 60.0
    train_executor: Any = None
    train_verify: Any = None
    # Leases (agent/leases.py): the workspace runtime by name (agent/workspace), where the
    # workspaces live (default: <data dir>/workspaces) and the runtime's options.
    workspace_runtime: str = "bwrap"
    workspace_root: Path | None = None
    workspace_options: dict[str, Any] = field(default_factory=dict)
    # Options of the other runtimes a lease may ask for by name (podman: image, oci_runtime).
    runtime_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What leases may take of this provider (sent at registration; the auction matches on
    # them and LeaseHost refuses a provisioning past them). Outbound network off by default.
    lease_controls: LeaseControls = field(default_factory=LeaseControls)


class AgentContext:
    """What roles may touch: client, config, drain flag, engines and their locks, and the
    commitments this node made while serving."""

    def __init__(self, client: NodeClient, engines: Sequence[Engine], config: AgentConfig) -> None:
        self.client = client
        self.engines = list(engines)
        self.model_id = self.engines[0].model_id
        self.config = config
        self.draining = asyncio.Event()
        # Engines are not thread-safe: serving and auditing on engine 0 take turns.
        self._locks = {id(e): threading.Lock() for e in self.engines}
        # Our recent commitments, to open chunks when a dispute asks: (task, attempt) -> blob.
        self.commitments: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def engine_lock(self, engine: Engine) -> threading.Lock:
        """The lock that whoever runs `engine` holds (one of this agent's engines)."""
        return self._locks[id(engine)]

    @staticmethod
    def remember(store: OrderedDict[Any, bytes], key: Any, blob: bytes) -> None:
        """Keep a recent commitment or report (the oldest go beyond `KEEP`)."""
        store[key] = blob
        while len(store) > KEEP:
            store.popitem(last=False)


class Role:
    """One thing an agent does beside serving; the agent starts its loops and hands it each
    heartbeat answer. The defaults do nothing."""

    async def warm(self) -> None:
        """Get ready before the agent registers (nothing by default)."""

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The loops to run beside the serving slots until the agent drains."""
        return []

    def on_heartbeat(self, beat: dict[str, Any]) -> None:
        """Start whatever the coordinator asked of this node in a heartbeat answer."""


class Answers:
    """Queries that ride on heartbeat answers, each answered once beside serving; what each
    answer got back (or its error) by query id. `what` names them in the log."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.done: dict[str, Any] = {}
        self._running: set[str] = set()

    def start(self, qid: str, answer: Callable[[], Awaitable[Any]]) -> None:
        """Answer `qid` in the background unless it is answered or being answered."""
        if qid not in self._running and qid not in self.done:
            self._running.add(qid)
            asyncio.create_task(self._run(qid, answer))

    async def _run(self, qid: str, answer: Callable[[], Awaitable[Any]]) -> None:
        try:
            self.done[qid] = await answer()
        except (httpx.HTTPError, IdlegridError) as exc:
            log.warning("%s %s: %r", self.what, qid, exc)
            self.done[qid] = {"error": str(exc)}
        except Exception:  # a bad query must not kill the heartbeat loop
            log.exception("%s %s failed unexpectedly", self.what, qid)
            self.done[qid] = {"error": "unexpected"}
        finally:
            self._running.discard(qid)
