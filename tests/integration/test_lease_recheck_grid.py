"""Leases charge only for what is delivered, on a loopback grid with real proofs and real
bubblewrap workspaces (docs/leases.md):

- a re-check of another class failing on the lease's provider leaves the lease running;
- a re-check of the leased class failing ends it (`hw-unproven`, wiped through the normal
  end), billed only up to the class's last passed proof, what was paid past it taken back,
  the rest of the escrow refunded, the consumer told why;
- a pending lease (its provider's proofs still running) whose provider dies fails at once
  (`provider-lost`), not when the proofs expire 120 s later, refunded whole.

Sizes are scaled down (IDLEGRID_HW_*), as in test_lease_proofs_grid.py."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idlegrid.agent.roles.hwprover import HonestProver
from idlegrid.client.sdk import GridClient
from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.lease.lifecycle import Transition, billable_until
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
PER_S = 1000  # µcr per running second (device_price_h below)


class Switchable(HonestProver):
    """Honest until `lie` is set: then its matrix product is wrong (a card swapped out)."""

    lie = False

    def product(self, seed: bytes, n: int, dtype: str) -> np.ndarray:
        """C = A·B, or zeros once lying."""
        c = super().product(seed, n, dtype)
        return np.zeros_like(c) if self.lie else c


class Stuck(HonestProver):
    """Never finishes a matrix product until released: its proofs stay open."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def product(self, seed: bytes, n: int, dtype: str) -> np.ndarray:
        """Waits for `release` (the test's cleanup), then answers."""
        self.release.wait(120)
        return super().product(seed, n, dtype)


def test_a_failed_recheck_of_the_leased_class_ends_the_lease_and_refunds_unproven_time(
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
        node_timeout_s=2.0,
        long_poll_s=2.0,
        payout_delay_s=0.0,  # accruals are paid out at once: what is taken back comes after
        stake_per_device=0,
    )
    coord = CoordinatorThread(settings)
    coord.start()
    agents: dict[str, AgentThread] = {}
    switch, stuck = Switchable(), Stuck()
    try:
        key = coord.funded_key("consumer", 50 * MICRO)
        nodes = {}
        for name, model, prover in (("honest", "CPU", switch), ("stuck", "RTX-3060", stuck)):
            agent = make_agent(
                coord.url, [FakeEngine("fake:1")], name, price=Price(MICRO, 4 * MICRO),
                device_price_h=3600 * PER_S, prover=prover,
                devices=[{"model": model, "count": 1, "vram_gb": 4.0}],
                workspace_root=tmp_path / f"ws-{name}",
            )  # fmt: skip
            nodes[name] = agent.client.key.node_id
            coord.post_stake(nodes[name], model, STAKE)
            agents[name] = AgentThread(agent)
            agents[name].start()
        services = coord.app.state.services
        with GridClient(coord.url, key["api_key"]) as client:
            consumer = ledger.consumer_account(key["key_id"])

            def balance(account: str) -> int:
                with coord.admin() as c:
                    return int(c.get("/api/v1/status").json()["balances"].get(account, 0))

            def lease_when(lease_id: str, states: tuple[str, ...], t: float = 60) -> Any:
                def there() -> bool:
                    try:
                        return client.lease(lease_id)["state"] in states
                    except Exception:  # not adopted yet
                        return False

                wait_until(there, timeout_s=t)
                return client.lease(lease_id)

            def proofs(node: str) -> list[dict[str, Any]]:
                with coord.admin() as c:
                    got = c.get("/api/v1/hwproofs", params={"node": node}).json()["proofs"]
                    return list(got)

            def judged(ids: list[str], state: str) -> list[dict[str, Any]]:
                def done() -> bool:
                    return all(p["state"] in ("passed", "failed") for p in mine())

                def mine() -> list[dict[str, Any]]:
                    return [p for p in proofs(nodes["honest"]) if p["id"] in ids]

                wait_until(done, timeout_s=60)
                assert {p["state"] for p in mine() if p["kind"] == "matmul"} == {state}
                return mine()

            def offered(model: str) -> bool:
                offers = client.http.get("/api/v1/offers").json()["offers"]
                return any(o["device"] == model for o in offers)

            # ---- a pending lease whose provider dies fails at once ----------------------
            wait_until(lambda: offered("RTX-3060"), timeout_s=30)
            before = balance(consumer)
            spec = {"accelerators": ["RTX-3060"], "max_price": 5.0}
            client.create_lease(0.5, spec, lease_id="S1")
            waiting = lease_when("S1", ("pending",))
            assert "matmul" in (waiting["message"] or "")  # its matmul proof hangs
            killer = threading.Thread(target=agents["stuck"].kill)  # joins once released
            killer.start()
            # Without the rule it would wait for the stuck proof's deadline (120 s and more).
            lost = lease_when("S1", ("failed",), t=30)
            assert [t["cause"] for t in lost["transitions"]] == ["created", "provider-lost"]
            assert "before the lease started" in lost["message"]
            assert lost["billed_s"] == 0 and client.order("S1")["state"] == "failed"
            assert balance(ledger.order_escrow_account("S1")) == 0
            assert balance(consumer) == before
            stuck.release.set()
            killer.join(60)

            # ---- a running lease, its class re-proven, then a proof of another class fails -
            wait_until(lambda: offered("CPU"), timeout_s=30)
            client.create_lease(0.5, {"accelerators": ["CPU"], "max_price": 5.0}, lease_id="L1")
            lease_when("L1", ("running",))
            assert client.lease_exec("L1", ["touch", "/work/mark"])["exit_code"] == 0
            hw = services.hwproofs
            cpu = [{"model": "CPU", "vram_gb": 4.0}]
            # Re-proven a couple of billed seconds in: those stay paid, what follows does not.
            wait_until(lambda: client.lease("L1")["billed_s"] >= 2, timeout_s=30)
            recheck = hw.issue(nodes["honest"], cpu, "re-check")
            proven = max(p["done_at"] for p in judged(recheck, "passed") if p["kind"] == "matmul")
            switch.lie = True
            other = hw.issue(nodes["honest"], [{"model": "RTX-3090", "vram_gb": 4.0}], "re-check")
            judged(other, "failed")
            billed_then = client.lease("L1")["billed_s"]
            wait_until(lambda: client.lease("L1")["billed_s"] > billed_then + 1, timeout_s=30)
            assert client.lease("L1")["state"] == "running"  # not the leased class: left alone

            # ---- the leased class fails its re-check: the lease ends, refunded ----------
            billed_before = client.lease("L1")["billed_s"]
            bad = hw.issue(nodes["honest"], cpu, "re-check")
            judged(bad, "failed")
            ended = lease_when("L1", ("ended",))
            causes = [t["cause"] for t in ended["transitions"]]
            assert causes == ["created", "placed", "provisioned", "hw-unproven", "wiped"]
            story = [Transition(t["at"], t["state"], t["cause"]) for t in ended["transitions"]]
            assert 2 <= ended["billed_s"] == billable_until(story, proven) < billed_before
            assert "re-check" in ended["message"] and "last passed proof" in ended["message"]
            order = client.order("L1")
            assert order["state"] == "failed" and order["spent"] == ended["billed_s"] * PER_S
            assert balance(ledger.order_escrow_account("L1")) == 0
            assert balance(consumer) == before - ended["billed_s"] * PER_S
            assert "L1" not in agents["honest"].agent.leases.workspaces  # wiped
            assert not list((tmp_path / "ws-honest").glob("*L1*"))
    finally:
        stuck.release.set()
        for a in agents.values():
            if a.thread and a.thread.is_alive():
                a.stop()
        for a in agents.values():
            for ws in list(a.agent.leases.workspaces.values()):
                ws.wipe()
        with coord.admin() as c:
            assert c.get("/api/v1/ledger/verify").json() == {"ok": True, "problems": []}
        coord.stop()
