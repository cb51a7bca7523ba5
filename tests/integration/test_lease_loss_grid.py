"""A lease whose provider is lost, on a loopback grid with real bubblewrap workspaces:
failed and billed up to the provider's last heartbeat, the consumer told its files are gone,
and with `restart_on_loss` ordered again on another provider (a new, empty workspace) with
the escrow carried over and nothing charged twice. Nothing here skips: no bubblewrap or
root fails the grid fixture."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from idlegrid.client.sdk import GridClient
from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.lease.loss import LOSS_WEIGHT, PENALTY_HOURS
from idlegrid.core.ledger import MICRO, Cause, Posting, Price
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_until,
)

pytestmark = pytest.mark.slow  # real sandboxes

PER_S = 1000  # µcr a running second (3.6 credits a device-hour)
PROVIDERS = (
    ("a1", "RTX-4090", 1),
    ("a2", "RTX-4090", 1),
    ("b1", "RTX-3060", 1),
    ("c1", "RTX-3090", 2),
)
STAKE = 200 * MICRO  # c1's RTX-3090 stake


@dataclass
class Grid:
    coordinator: CoordinatorThread
    agents: dict[str, AgentThread]  # node id -> agent
    key_id: str
    api_key: str
    tmp: Path

    def client(self) -> GridClient:
        return GridClient(self.coordinator.url, self.api_key)

    def balance(self, account: str) -> int:
        with self.coordinator.admin() as c:
            return int(c.get("/api/v1/status").json()["balances"].get(account, 0))

    def cli(self, *args: str) -> Any:
        from typer.testing import CliRunner

        from idlegrid.client.cli import app

        base = ["--coordinator", self.coordinator.url, "--data-dir", str(self.tmp)]
        got = CliRunner().invoke(
            app, [*args, *base], env={"IDLEGRID_API_KEY": self.api_key}, catch_exceptions=False
        )
        assert got.exit_code == 0, got.output
        return got

    def reliability(self, node: str) -> float:
        # The market's own reading, as the book and the gateway's routing get it.
        supply = self.coordinator.app.state.services.market.store.supply()
        return float(supply[node]["reliability"])

    def order(self, order_id: str) -> dict[str, Any]:
        with self.client() as c:
            return c.order(order_id)

    def wait(self, lease_id: str, state: str, timeout_s: float = 30) -> dict[str, Any]:
        def reached() -> bool:
            with self.client() as c:
                try:
                    return c.lease(lease_id)["state"] == state
                except Exception:  # not adopted yet
                    return False

        wait_until(reached, timeout_s=timeout_s)
        with self.client() as c:
            return c.lease(lease_id)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    tmp = tmp_path_factory.mktemp("lease-loss")
    settings = CoordinatorSettings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/c.db",
        port=free_port(),
        heartbeat_interval_s=0.2,
        node_timeout_s=1.5,
        long_poll_s=2.0,
        accrual_interval_s=0.3,
        payout_delay_s=0.0,
        stake_per_device=0,
        hw_proofs=False,
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agents = {}
    for name, device, count in PROVIDERS:
        agent = make_agent(
            coordinator.url,
            [FakeEngine("fake:1")],
            name,
            price=Price(MICRO, 4 * MICRO),
            device_price_h=3600 * PER_S,
            devices=[{"model": device, "count": count, "vram_gb": 0}],
            workspace_root=tmp / f"ws-{name}",
        )
        node = agent.client.key.node_id
        if device == "RTX-3090":  # posted by the operator, as the hardware-proof tests do
            wait_until(lambda: hasattr(coordinator.app.state, "services"))
            acct = ledger.stake_account(node, device)
            coordinator.app.state.services.store.post(
                ledger.make_entry(
                    f"stake:{node}", Cause("test", node),
                    [Posting(ledger.ISSUER, -STAKE), Posting(acct, STAKE)],
                )
            )  # fmt: skip
        agents[node] = AgentThread(agent)
        agents[node].start()
    key = coordinator.funded_key("consumer", 100 * MICRO)
    g = Grid(coordinator, agents, key["key_id"], key["api_key"], tmp)

    def offered() -> bool:
        with httpx.Client(
            base_url=g.coordinator.url,
            trust_env=False,
            headers={"authorization": f"Bearer {g.api_key}"},
        ) as c:
            return len(c.get("/api/v1/offers").json()["offers"]) == len(PROVIDERS)

    wait_until(offered, timeout_s=30)
    yield g
    for a in agents.values():
        if a.thread and a.thread.is_alive():
            a.stop()
    for a in agents.values():  # a killed agent could not wipe: do it for it
        for ws in list(a.agent.leases.workspaces.values()):
            ws.wipe()
    with coordinator.admin() as c:
        assert c.get("/api/v1/ledger/verify").json() == {"ok": True, "problems": []}
    coordinator.stop()


def _run(grid: Grid, lease_id: str, script: str) -> dict[str, Any]:
    with grid.client() as c:
        return c.lease_exec(lease_id, ["sh", "-c", script])


def _entries(grid: Grid, cause_id: str) -> list[dict[str, Any]]:
    with grid.coordinator.admin() as c:
        r = c.get("/api/v1/ledger", params={"cause": cause_id})
        r.raise_for_status()
        return list(r.json()["entries"])


def test_the_cli_orders_a_lease_that_restarts_on_loss(grid: Grid) -> None:
    made = grid.cli("lease", "create", "--gpu", "RTX-3090", "--max-price", "5", "--restart-on-loss")
    lease_id = made.stdout.strip()
    assert grid.order(lease_id)["body"]["restart_on_loss"] is True
    with grid.client() as c:
        assert c.lease(lease_id)["restart_on_loss"] is True
        assert c.end_lease(lease_id)["state"] == "ending"
    grid.wait(lease_id, "ended")


def test_a_lost_lease_restarts_elsewhere_with_its_escrow_carried_over(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balance(consumer)
    with grid.client() as c:
        placed = c.create_lease(
            1.0, {"accelerators": ["RTX-4090"], "max_price": 5.0},
            restart_on_loss=True, lease_id="R1",
        )  # fmt: skip
    assert placed["body"]["restart_on_loss"] is True
    old = grid.wait("R1", "running")
    assert old["restart_on_loss"] is True
    assert _run(grid, "R1", "echo kept > /work/marker && cat /work/marker")["stdout"] == "kept\n"

    grid.agents[old["node_id"]].kill()
    old = grid.wait("R1", "failed", timeout_s=15)
    assert old["transitions"][-1]["cause"] == "provider-lost"
    assert "files are gone" in old["message"] and old["restarted_as"] in old["message"]
    # The provider's first loss: no stake (it had none, and one is forgiven), but its
    # reliability drops from the prior 0.95 to (19 + 0) / (20 + LOSS_WEIGHT).
    assert "stake" not in old["message"]
    assert grid.reliability(old["node_id"]) == pytest.approx(19 / (20 + LOSS_WEIGHT))
    new_id = old["restarted_as"]
    with grid.client() as c:
        with pytest.raises(Exception, match=f"restarted as lease {new_id}"):
            c.lease_exec("R1", ["true"])
        assert c.current_lease("R1")["id"] == new_id  # the client finds the restart
    new = grid.wait(new_id, "running")
    assert new["restarted_from"] == "R1" and new["restart_on_loss"] is True
    said = grid.cli("lease", "status", "R1").stdout
    assert "files are gone" in said and f"restarted as {new_id}" in said
    assert "restarts R1, lost with its provider" in grid.cli("lease", "status", new_id).stdout
    assert new["node_id"] not in ("", old["node_id"])
    assert new["hours"] == pytest.approx(1.0 - old["billed_s"] / 3600)
    # A new workspace: what the lost one held is not there, and the new one works.
    gone = _run(grid, new_id, "cat /work/marker; echo here > /work/new && cat /work/new")
    assert "No such file" in gone["stderr"] and gone["stdout"] == "here\n"

    # Money: the lost lease paid its running seconds up to the last heartbeat; what the
    # restart needs moved from its escrow to the new order's (no new prepay); the rest
    # came back. The consumer has paid exactly the seconds that ran.
    at = {t["state"]: t["at"] for t in old["transitions"]}
    assert old["billed_s"] <= at["failed"] - at["running"] < old["billed_s"] + 1
    first, second = grid.order("R1"), grid.order(new_id)
    assert first["state"] == "failed" and first["spent"] == old["billed_s"] * PER_S
    assert second["body"]["avoid"] == [old["node_id"]]
    carried = math.ceil(5 * MICRO * (1.0 - old["billed_s"] / 3600))
    assert second["budget"] == carried
    memos = [e["memo"] for e in _entries(grid, "R1")]
    assert "lease-restart" in memos
    assert [e["memo"] for e in _entries(grid, new_id)].count("prepay") == 0
    assert grid.balance(ledger.order_escrow_account("R1")) == 0
    assert grid.balance(consumer) == before - first["spent"] - carried

    with grid.client() as c:
        ended = c.end_lease(new_id)
    grid.wait(new_id, "ended")
    second = grid.order(new_id)
    assert second["spent"] == ended["billed_s"] * PER_S
    assert grid.balance(ledger.order_escrow_account(new_id)) == 0
    assert grid.balance(consumer) == before - first["spent"] - second["spent"]


def test_a_restart_nobody_can_take_waits_and_ending_it_refunds_everything(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.key_id)
    before = grid.balance(consumer)
    with grid.client() as c:  # only one provider has an RTX-3060
        c.create_lease(
            0.5, {"accelerators": ["RTX-3060"], "max_price": 5.0},
            restart_on_loss=True, lease_id="R2",
        )  # fmt: skip
    old = grid.wait("R2", "running")
    grid.agents[old["node_id"]].kill()
    old = grid.wait("R2", "failed", timeout_s=15)
    new_id = old["restarted_as"]
    with grid.client() as c:
        new = c.lease(new_id)
        assert new["state"] == "pending" and "waiting for one" in new["message"]
        assert c.order(new_id)["state"] == "open"
        assert c.end_lease(new_id)["state"] == "ended"
    assert grid.order(new_id)["state"] == "cancelled"
    assert grid.balance(ledger.order_escrow_account(new_id)) == 0
    assert grid.balance(consumer) == before - grid.order("R2")["spent"]


def test_without_restart_on_loss_a_lost_lease_only_fails(grid: Grid) -> None:
    with grid.client() as c:
        c.create_lease(0.5, {"accelerators": ["RTX-4090"], "max_price": 5.0}, lease_id="R3")
    lease = grid.wait("R3", "running")
    assert lease["restart_on_loss"] is False
    grid.agents[lease["node_id"]].kill()
    lease = grid.wait("R3", "failed", timeout_s=15)
    assert lease["restarted_as"] is None and "files are gone" in lease["message"]


def test_a_first_loss_lowers_reliability_and_a_loss_past_the_slo_costs_stake(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.key_id)
    ids = ("S1", "S2")
    with grid.client() as c:  # both on c1, the one provider with two RTX-3090s
        for lease_id in ids:
            c.create_lease(0.5, {"accelerators": ["RTX-3090"], "max_price": 5.0}, lease_id=lease_id)
    node = {grid.wait(i, "running")["node_id"] for i in ids}.pop()
    stake = ledger.stake_account(node, "RTX-3090")
    assert grid.balance(stake) == STAKE and grid.reliability(node) == pytest.approx(0.95)
    before = grid.balance(consumer)
    grid.agents[node].kill()
    lost = [grid.wait(i, "failed", timeout_s=15) for i in ids]
    # One loss within the window is forgiven; the second is past the SLO (no hours leased
    # there earned another) and costs 24 hours of the lease's price, to the consumer.
    penalty = round(PENALTY_HOURS * 3600 * PER_S)
    assert grid.balance(stake) == STAKE - penalty
    slashed = [
        lease for lease in lost if "lost" in lease["message"] and "stake" in lease["message"]
    ]
    assert len(slashed) == 1 and f"{penalty} µcr of stake" in slashed[0]["message"]
    entry = _entries(grid, f"lease-loss:{slashed[0]['id']}")
    assert len(entry) == 1 and entry[0]["key"] == f"slash:lease-loss:{slashed[0]['id']}"
    moved = {p["account"]: p["amount"] for p in entry[0]["postings"] if p["amount"]}
    assert moved == {stake: -penalty, consumer: penalty}
    spent = sum(grid.order(i)["spent"] for i in ids)
    assert (
        grid.balance(consumer)
        == before + sum(grid.order(i)["budget"] for i in ids) - spent + penalty
    )
    # Two lost leases, none a whole hour: (0 + 19) / (2 x LOSS_WEIGHT + 20).
    assert grid.reliability(node) == pytest.approx(19 / (2 * LOSS_WEIGHT + 20))
