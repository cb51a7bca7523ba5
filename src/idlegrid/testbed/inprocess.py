"""A coordinator and agents in one process, on real loopback sockets, for integration tests.

The coordinator is a real uvicorn server in a thread; each agent runs its own event loop
in a thread and talks to it over HTTP, exactly as a remote agent would.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from idlegrid.agent.agent import Agent, AgentConfig
from idlegrid.agent.hardware.power import PowerMeter
from idlegrid.agent.node_client import NodeClient
from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.app import create_app
from idlegrid.coordinator.edge import guarded_http
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.base import Engine
from idlegrid.protocol.signing import NodeKey


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class CoordinatorThread:
    """uvicorn serving the coordinator app on loopback, in a background thread."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
            http=guarded_http(settings.header_timeout_s),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def operator_key(self) -> str:
        """The operator key (given in the settings, or created in the data dir)."""
        return self.settings.ensure_operator_key()

    @property
    def operator_headers(self) -> dict[str, str]:
        """Headers that open the operator routes."""
        return {"Authorization": f"Bearer {self.operator_key}"}

    def admin(self, **kwargs: Any) -> httpx.Client:
        """An HTTP client for the operator routes (admin, ledger, audits, full status)."""
        return httpx.Client(
            base_url=self.url, trust_env=False, headers=self.operator_headers, **kwargs
        )

    def funded_key(self, name: str, amount: int) -> dict[str, Any]:
        """A new API key named `name` with `amount` µcr minted to it (its `key_id`, `api_key`)."""
        with self.admin() as c:
            key: dict[str, Any] = c.post("/api/v1/admin/keys", json={"name": name}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": amount, "reference": name},
            ).raise_for_status()
        return key

    def post_stake(self, node_id: str, device_class: str, amount: int) -> None:
        """Mint `amount` µcr straight into a node's stake for a device class (the ledger
        entry an agent's `--stake` leads to), once the app is up."""
        from idlegrid.core import ledger

        wait_until(lambda: hasattr(self.app.state, "services"), timeout_s=30)
        self.app.state.services.store.post(
            ledger.make_entry(
                f"stake:{node_id}:{device_class}",
                ledger.Cause("test", node_id),
                [
                    ledger.Posting(ledger.ISSUER, -amount),
                    ledger.Posting(ledger.stake_account(node_id, device_class), amount),
                ],
            )
        )

    def start(self, timeout_s: float = 30.0) -> None:
        """Start serving and wait until the server has started."""
        self.thread.start()
        ready = threading.Event()

        def check() -> None:
            while not self.server.started and self.thread.is_alive():
                ready.wait(0.02)
            ready.set()

        checker = threading.Thread(target=check, daemon=True)
        checker.start()
        ready.wait(timeout_s)
        if not self.server.started:
            raise RuntimeError("coordinator did not start")

    def stop(self) -> None:
        """Shut the server down."""
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclass
class AgentThread:
    """An agent running in its own event loop thread."""

    agent: Agent
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    stop_event: asyncio.Event | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the agent until stop() or kill()."""
        started = threading.Event()

        async def main() -> None:
            self.stop_event = asyncio.Event()
            started.set()
            await self.agent.run(self.stop_event)

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            finally:
                if self.agent.channel is not None:  # a killed agent's socket closes too
                    self.loop.run_until_complete(self.agent.channel.close())
                self.loop.run_until_complete(self.agent.client.close())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful stop: the SIGTERM path (drain)."""
        assert self.stop_event is not None and self.thread is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout_s)

    def kill(self) -> None:
        """Abrupt death: every task of the agent is cancelled, nothing is handed back."""
        assert self.thread is not None

        def cancel_all() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(cancel_all)
        self.thread.join(30)
        # A request cancelled mid-connect can leave its socket unowned, and a dead process's
        # sockets are the kernel's to close. Collect them now, quietly, rather than let a
        # later test's garbage collection report them as that test's leak.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def make_agent(
    url: str,
    engines: Sequence[Engine],
    name: str,
    *,
    price: Price | None = None,
    drain_grace_s: float = 30.0,
    key_dir: Path | None = None,
    verifier: bool = False,
    meter: PowerMeter | None = None,
    hardware: dict[str, Any] | None = None,
    prover: Any = None,
    **market: Any,
) -> Agent:
    """An agent with a fresh key (or one kept in `key_dir`)."""
    key = NodeKey.load_or_create(key_dir / f"{name}.key") if key_dir else NodeKey.generate()
    # Leases: workspaces in a folder of this node's own (made on the first lease only), not
    # under the home directory's data dir.
    market.setdefault(
        "workspace_root", Path(tempfile.gettempdir()) / f"idlegrid-ws-{key.node_id[:12]}"
    )
    config = AgentConfig(
        name=name,
        hardware=hardware or {"cpu_cores": 1},
        prefill_tps=1000.0,
        decode_tps=100.0,
        drain_grace_s=drain_grace_s,
        price=price or Price(10 * MICRO, 40 * MICRO),
        verifier=verifier,
        meter=meter,
        **market,
    )
    return Agent(NodeClient(url, key), engines, config, prover=prover)


def device_offer(price_h: int = MICRO, vram_gb: float = 8.0, count: int = 1) -> dict[str, Any]:
    """Agent config that sells CPU device-hours at `price_h` µcr: what the market needs to
    place training jobs on an in-process agent (whose probe reports no memory)."""
    return {
        "device_price_h": price_h,
        "devices": [{"model": "CPU", "count": count, "vram_gb": vram_gb}],
    }


def wait_for_live(url: str, count: int, timeout_s: float = 30.0) -> None:
    """Block until `count` nodes are live."""
    done = threading.Event()
    with httpx.Client(trust_env=False) as c:
        for _ in range(int(timeout_s / 0.05)):
            nodes = c.get(f"{url}/api/v1/status").json()["nodes"]
            if sum(1 for n in nodes if n["live"] and n["state"] == "live") >= count:
                return
            done.wait(0.05)
    raise TimeoutError(f"{count} nodes did not come up")


def wait_until(predicate: Any, timeout_s: float = 20.0, interval_s: float = 0.02) -> None:
    """Poll a condition until it holds; TimeoutError after `timeout_s`."""
    tick = threading.Event()
    for _ in range(int(timeout_s / interval_s)):
        if predicate():
            return
        tick.wait(interval_s)
    raise TimeoutError("condition not reached")


@contextmanager
def provider_and_verifier(
    tmp: Path, provider: Engine, verifier: Engine, credits: int = 100
) -> Iterator[tuple[CoordinatorThread, httpx.Client, dict[str, Any], Any]]:
    """A loopback grid of one provider and one dearer verifier (so answers go to the
    provider), with a funded API key: (coordinator, operator client, key, openai client).
    Everything is stopped on exit, the verifier engine closed."""
    import openai  # lazy: a test dependency

    settings = CoordinatorSettings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.3,
        node_timeout_s=5.0,
        long_poll_s=2.0,
        hw_proofs=False,
    )
    coord = CoordinatorThread(settings)
    coord.start()
    dear = Price(1000 * MICRO, 4000 * MICRO)
    agents = [
        AgentThread(make_agent(coord.url, [provider], "provider")),
        AgentThread(make_agent(coord.url, [verifier], "verifier", verifier=True, price=dear)),
    ]
    http = coord.admin()
    client = None
    try:
        for a in agents:
            a.start()
        wait_for_live(coord.url, 2)
        key = http.post("/api/v1/admin/keys", json={"name": "t"}).json()
        http.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": credits * MICRO, "reference": "m"},
        )
        client = openai.OpenAI(base_url=f"{coord.url}/v1", api_key=key["api_key"], max_retries=0)
        yield coord, http, key, client
    finally:
        if client is not None:
            client.close()
        http.close()
        for a in agents:
            a.stop(30)
        coord.stop()
        close = getattr(verifier, "close", None)
        if close is not None:
            close()
