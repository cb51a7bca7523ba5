"""Hardware proofs before a lease, on a loopback grid with real proofs and real bubblewrap
workspaces: a lease on a newly registered provider waits for the proofs of the leased class
and records those it started on; a provider that cannot prove its class (a CPU claiming an
RTX-4090: the product is right but late for a 4090) fails the lease before anything runs,
the escrow comes back whole and the claimed class's stake is slashed (docs/trust.md).
Sizes are scaled down (IDLEGRID_HW_*), as in test_hwproofs.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from idlegrid.client.sdk import GridClient
from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_until,
)

pytestmark = pytest.mark.slow  # real proofs and sandboxes

STAKE = 5 * MICRO


def test_a_lease_starts_on_its_providers_proofs_and_an_unproven_class_fails_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {"N_CPU": "512", "N_GPU": "3072", "RTT_S": "0.1", "MEM_CAP_MB": "8",
                 "RECHECK_PER_HOUR": "0"}.items():  # fmt: skip
        monkeypatch.setenv(f"IDLEGRID_HW_{k}", v)
    settings = CoordinatorSettings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.2,
        node_timeout_s=30.0,
        long_poll_s=2.0,
        payout_delay_s=0.0,
        stake_per_device=0,
    )
    coord = CoordinatorThread(settings)
    coord.start()
    agents: list[AgentThread] = []
    try:
        key = coord.funded_key("consumer", 50 * MICRO)
        nodes = {}
        for name, model in (("cheat", "RTX-4090"), ("honest", "CPU")):
            agent = make_agent(
                coord.url, [FakeEngine("fake:1")], name, price=Price(MICRO, 4 * MICRO),
                device_price_h=3600 * 1000,
                devices=[{"model": model, "count": 1, "vram_gb": 4.0}],
                workspace_root=tmp_path / f"ws-{name}",
            )  # fmt: skip
            nodes[name] = agent.client.key.node_id
            coord.post_stake(nodes[name], model, STAKE)
            agents.append(AgentThread(agent))
            agents[-1].start()
        with GridClient(coord.url, key["api_key"]) as client:
            consumer = ledger.consumer_account(key["key_id"])

            def balance(account: str) -> int:
                with coord.admin() as c:
                    return int(c.get("/api/v1/status").json()["balances"].get(account, 0))

            def lease_when(lease_id: str, states: tuple[str, ...]) -> dict[str, Any]:
                def there() -> bool:
                    try:
                        return client.lease(lease_id)["state"] in states
                    except Exception:  # not adopted yet
                        return False

                wait_until(there, timeout_s=90)
                return client.lease(lease_id)

            # The cheat's RTX-4090 is ordered as soon as it is offered: its proofs are in flight.
            def offered(model: str) -> bool:
                offers = client.http.get("/api/v1/offers").json()["offers"]
                return any(o["device"] == model for o in offers)

            wait_until(lambda: offered("RTX-4090"), timeout_s=30)
            before = balance(consumer)
            placed = client.create_lease(
                0.5, {"accelerators": ["RTX-4090"], "max_price": 5.0}, lease_id="P1"
            )
            assert placed["state"] == "active"
            wait_until(lambda: offered("CPU"), timeout_s=30)
            client.create_lease(0.5, {"accelerators": ["CPU"], "max_price": 5.0}, lease_id="P2")

            failed = lease_when("P1", ("failed",))
            assert [t["cause"] for t in failed["transitions"]] == ["created", "hw-unproven"]
            assert "matmul proof" in failed["message"] and "cannot prove" in failed["message"]
            assert failed["billed_s"] == 0 and failed["proofs"] == []
            order = client.order("P1")
            assert (order["state"], order["spent"]) == ("failed", 0)
            assert balance(ledger.order_escrow_account("P1")) == 0
            assert balance(ledger.stake_account(nodes["cheat"], "RTX-4090")) == 0  # trust's slash

            running = lease_when("P2", ("running",))
            with coord.admin() as c:
                proofs = c.get("/api/v1/hwproofs", params={"node": nodes["honest"]}).json()[
                    "proofs"
                ]
            passed = sorted(p["id"] for p in proofs if p["state"] == "passed")
            assert len(passed) == 2 and sorted(running["proofs"]) == passed
            assert client.lease_exec("P2", ["echo", "ok"])["stdout"] == "ok\n"
            ended = client.end_lease("P2")
            lease_when("P2", ("ended",))
            assert balance(consumer) == before - ended["billed_s"] * 1000
            assert balance(ledger.stake_account(nodes["honest"], "CPU")) == STAKE
    finally:
        for a in agents:
            if a.thread and a.thread.is_alive():
                a.stop()
        for a in agents:
            for ws in list(a.agent.leases.workspaces.values()):
                ws.wipe()
        with coord.admin() as c:
            assert c.get("/api/v1/ledger/verify").json() == {"ok": True, "problems": []}
        coord.stop()
