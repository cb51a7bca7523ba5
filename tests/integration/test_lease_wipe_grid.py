"""A lease lost while `ending` (its provider died before confirming the wipe), on a loopback
grid with real bubblewrap workspaces: it fails billed only to its end, says the wipe is
unconfirmed, and when the same provider comes back its start-up sweep wipes the leftover
workspace and the registration reports it, so the lease records the wipe as confirmed."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from idlegrid.agent.agent import Agent
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

pytestmark = pytest.mark.slow  # real sandboxes

PER_S = 1000  # µcr per running second


def test_a_lease_lost_while_ending_is_billed_to_its_end_and_its_wipe_confirmed_on_return(
    tmp_path: Path,
) -> None:
    settings = CoordinatorSettings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.2,
        node_timeout_s=4.0,  # room to end the lease after the kill, before the loss
        long_poll_s=2.0,
        payout_delay_s=0.0,
        stake_per_device=0,
        hw_proofs=False,
    )
    coord = CoordinatorThread(settings)
    coord.start()
    threads: list[AgentThread] = []

    def provider() -> Agent:
        return make_agent(
            coord.url, [FakeEngine("fake:1")], "p", price=Price(MICRO, 4 * MICRO),
            device_price_h=3600 * PER_S, key_dir=tmp_path,
            devices=[{"model": "CPU", "count": 1, "vram_gb": 0}],
            workspace_root=tmp_path / "ws",
        )  # fmt: skip

    try:
        key = coord.funded_key("consumer", 50 * MICRO)
        threads.append(AgentThread(provider()))
        threads[-1].start()
        with GridClient(coord.url, key["api_key"]) as client:
            consumer = ledger.consumer_account(key["key_id"])

            def balance(account: str) -> int:
                with coord.admin() as c:
                    return int(c.get("/api/v1/status").json()["balances"].get(account, 0))

            def state(lease_id: str) -> str:
                try:
                    return str(client.lease(lease_id)["state"])
                except Exception:  # not adopted yet
                    return ""

            wait_until(lambda: bool(client.http.get("/api/v1/offers").json()["offers"]), 30)
            before = balance(consumer)
            client.create_lease(0.5, {"accelerators": ["CPU"], "max_price": 5.0}, lease_id="W1")
            wait_until(lambda: state("W1") == "running", timeout_s=60)
            assert client.lease_exec("W1", ["touch", "/work/kept"])["exit_code"] == 0
            wait_until(lambda: client.lease("W1")["billed_s"] >= 1, timeout_s=30)
            assert (tmp_path / "ws" / "W1").is_dir()

            # The provider dies; the consumer ends the lease before the grid notices.
            threads[0].kill()
            ended = client.end_lease("W1")
            assert ended["state"] == "ending"
            wait_until(lambda: state("W1") in ("failed", "ended"), timeout_s=30)
            lost = client.lease("W1")
            assert lost["state"] == "failed", lost
            causes = [t["cause"] for t in lost["transitions"]]
            assert causes == ["created", "placed", "provisioned", "end", "provider-lost"]
            assert lost["billed_s"] == ended["billed_s"]  # billing stopped at `ending`
            assert "unconfirmed" in lost["message"]
            assert client.order("W1")["spent"] == lost["billed_s"] * PER_S
            assert balance(consumer) == before - lost["billed_s"] * PER_S
            assert (tmp_path / "ws" / "W1").is_dir()  # nobody wiped it yet

            # The same provider comes back: its sweep wipes W1 and registration says so.
            threads.append(AgentThread(provider()))
            threads[-1].start()
            wait_until(lambda: "confirmed the wipe" in client.lease("W1")["message"], 30)
            back = client.lease("W1")
            assert "unconfirmed" not in back["message"] and back["state"] == "failed"
            assert back["billed_s"] == lost["billed_s"]
            assert not (tmp_path / "ws" / "W1").exists()
    finally:
        for t in threads:
            if t.thread and t.thread.is_alive():
                t.stop()
        for t in threads:
            for ws in list(t.agent.leases.workspaces.values()):
                with contextlib.suppress(Exception):  # swept already by the second run
                    ws.wipe()
        with coord.admin() as c:
            assert c.get("/api/v1/ledger/verify").json() == {"ok": True, "problems": []}
        coord.stop()
