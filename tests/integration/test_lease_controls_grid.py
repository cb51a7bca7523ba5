"""Provider lease controls on a loopback grid with real agents and the real sandbox: the
offers advertise them; a lease order asking more than any provider allows is not placed and
`explain` names the control; one within lands on the provider that allows it with the asked
limits; egress reaches the "internet" (a veth namespace) but not the coordinator's loopback
port; the agent refuses a lease past its controls even when the coordinator sends it; bad
order fields are 400 naming the field. Nothing skips (no bubblewrap, root or slirp4netns
fails the fixture)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from idlegrid.client.lease_cmd import chunks, exec_stream
from idlegrid.config import CoordinatorSettings
from idlegrid.core.lease.controls import LeaseControls
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_until,
)
from idlegrid.testbed.outside import Outside, outside
from idlegrid.testbed.wheels import tiny_wheel

pytestmark = pytest.mark.slow  # real sandboxes and a NAT: about 15 s

GIB = 1 << 30
# name -> (device, controls): p-small and p-big both sell an RTX-4090; only p-net gives
# workspaces outbound network; p-none leases nothing.
PROVIDERS = {
    "p-small": ("RTX-4090", LeaseControls(max_cpus=1, max_ram_gb=2, max_disk_gb=4)),
    "p-big": ("RTX-4090", LeaseControls(max_cpus=2, max_ram_gb=4, max_disk_gb=8, total_cpus=3)),
    "p-net": (
        "RTX-3060",
        LeaseControls(max_cpus=1, max_ram_gb=2, max_disk_gb=4, egress=True, pip=False),
    ),
    "p-none": ("A100-80GB", LeaseControls(devices=frozenset())),
}


@dataclass
class Grid:
    coordinator: CoordinatorThread
    agents: dict[str, AgentThread]
    node_ids: dict[str, str]
    api_key: str
    net: Outside

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.coordinator.url,
            trust_env=False,
            timeout=30,
            headers={"authorization": f"Bearer {self.api_key}"},
        )

    def lease(self, lease: str) -> dict[str, Any]:
        with self.http() as c:
            r = c.get(f"/api/v1/leases/{lease}")
            r.raise_for_status()
            return r.json()  # type: ignore[no-any-return]

    def run(self, lease: str, argv: list[str]) -> tuple[int, str, str]:
        out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        code = exec_stream(
            self.coordinator.url, self.api_key, lease, {"argv": argv}, stdin=chunks(b""),
            on_output=lambda fd, d: out[fd].extend(d),
        )  # fmt: skip
        return code, out[1].decode(), out[2].decode()


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    tmp = tmp_path_factory.mktemp("controls-grid")
    wheels = tmp / "wheels"
    wheels.mkdir()
    tiny_wheel(wheels).chmod(0o644)
    wheels.chmod(0o755)  # leases read it as their own uids
    settings = CoordinatorSettings(
        data_dir=tmp, database_url=f"sqlite:///{tmp}/c.db", port=free_port(),
        heartbeat_interval_s=0.2, node_timeout_s=3.0, long_poll_s=2.0,
        accrual_interval_s=0.3, payout_delay_s=0.0, stake_per_device=0, hw_proofs=False,
    )  # fmt: skip
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agents, node_ids = {}, {}
    with outside(19000 + os.getpid() % 1000) as net:
        try:
            with coordinator.admin() as c:
                for name, (device, controls) in PROVIDERS.items():
                    agent = make_agent(
                        coordinator.url, [FakeEngine("fake:1")], name,
                        price=Price(MICRO, 4 * MICRO), device_price_h=3600 * 1000,
                        devices=[{"model": device, "count": 2, "vram_gb": 0}],
                        hardware={"cpu_logical": 8, "ram_bytes": 16e9},
                        workspace_root=tmp / f"ws-{name}", lease_controls=controls,
                        workspace_options={"wheels": wheels},
                    )  # fmt: skip
                    node_ids[name] = agent.client.key.node_id
                    agents[name] = AgentThread(agent)
                    agents[name].start()
                key = c.post("/api/v1/admin/keys", json={"name": "k"}).json()
                c.post(
                    "/api/v1/admin/mint",
                    json={"key_id": key["key_id"], "amount": 50 * MICRO, "reference": "k"},
                ).raise_for_status()
            g = Grid(coordinator, agents, node_ids, key["api_key"], net)

            def offered() -> bool:
                with g.http() as c:
                    return len(c.get("/api/v1/offers").json()["offers"]) == len(PROVIDERS)

            wait_until(offered, timeout_s=30)
            yield g
        finally:
            for a in agents.values():
                a.stop()
            for a in agents.values():
                for ws in list(a.agent.leases.workspaces.values()):
                    ws.wipe()
            coordinator.stop()


def _submit(g: Grid, oid: str, resources: dict[str, Any]) -> httpx.Response:
    body = {"id": oid, "kind": "lease", "hours": 1, "resources": {"max_price": 5.0, **resources}}
    with g.http() as c:
        return c.post("/api/v1/orders", json=body)


def _wait_lease(g: Grid, lease: str, states: set[str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        with g.http() as c:
            r = c.get(f"/api/v1/leases/{lease}")
        seen.update(r.json() if r.status_code == 200 else {})
        return seen.get("state") in states

    wait_until(reached, timeout_s=40)
    return seen


def _end(g: Grid, lease: str) -> None:
    with g.http() as c:
        c.post(f"/api/v1/leases/{lease}/end").raise_for_status()
    _wait_lease(g, lease, {"ended"})


def test_offers_advertise_each_providers_lease_controls(grid: Grid) -> None:
    with grid.http() as c:
        offers = {o["provider"]: o["lease"] for o in c.get("/api/v1/offers").json()["offers"]}
    small, big, net, none = (offers[grid.node_ids[p]] for p in PROVIDERS)
    assert (small["max_cpus"], small["max_ram_gb"], small["max_disk_gb"]) == (1, 2, 4)
    assert (big["max_cpus"], big["total_cpus"], big["total_ram_gb"]) == (2, 3, None)
    assert [o["egress"] for o in (small, big, net)] == [False, False, True]
    assert none["leases"] is False and small["leases"] is True
    assert small["runtimes"] == ["bwrap"] and small["leased"] == {
        "cpus": 0.0, "ram_gb": 0.0, "disk_gb": 0.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("ask", "control"),
    [
        ({"cpus": 3}, "lease.max_cpus"),
        ({"ram_gb": 5}, "lease.max_ram_gb"),
        ({"disk_gb": 10}, "lease.max_disk_gb"),
        ({"accelerators": ["RTX-3060"], "pip": ["igtiny"]}, "lease.pip"),
        ({"accelerators": ["A100-80GB"]}, "lease.devices"),
        ({"accelerators": ["RTX-4090"], "egress": True}, "lease.egress"),
        ({"runtime": "podman"}, "lease.runtime"),
    ],
)
def test_an_order_past_every_providers_controls_waits_and_explain_names_the_control(
    grid: Grid, ask: dict[str, Any], control: str
) -> None:
    oid = "X-" + control.replace(".", "-")
    r = _submit(grid, oid, ask)
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "open"
    with grid.http() as c:
        why = c.get(f"/api/v1/orders/{oid}/explain").json()
        assert why["now"]["decisive"] == control, why
        c.post(f"/api/v1/orders/{oid}/cancel").raise_for_status()


def test_a_lease_within_the_controls_lands_where_they_allow_it_with_the_asked_limits(
    grid: Grid,
) -> None:
    ask = {"accelerators": ["RTX-4090"], "cpus": 2, "ram_gb": 1.5, "disk_gb": 0.5}
    r = _submit(grid, "L-fit", ask)
    assert r.status_code == 201 and r.json()["state"] == "active", r.text
    lease = _wait_lease(grid, "L-fit", {"running", "failed"})
    assert lease["state"] == "running", lease
    assert lease["node_id"] == grid.node_ids["p-big"]  # p-small allows 1 core
    ws = grid.agents["p-big"].agent.leases.workspaces["L-fit"]
    assert ws.spec.limits.cpus == 2 and ws.spec.limits.memory_bytes == int(1.5 * GIB)
    assert ws.spec.egress is False
    code, out, _ = grid.run("L-fit", ["df", "-B1", "--output=size", "/work"])
    assert code == 0 and 0.45 * GIB < int(out.split()[-1]) <= 0.5 * GIB
    code, out, _ = grid.run("L-fit", ["cat", "/proc/net/dev"])
    assert [ln.split(":")[0].strip() for ln in out.splitlines()[2:]] == ["lo"]
    # p-big's total of 3 cores holds 2: another 2-core lease has nowhere to go meanwhile.
    r = _submit(grid, "X-total", {"accelerators": ["RTX-4090"], "cpus": 2})
    assert r.json()["state"] == "open"
    with grid.http() as c:
        assert c.get("/api/v1/orders/X-total/explain").json()["now"]["decisive"] == (
            "lease.total_cpus"
        )
        c.post("/api/v1/orders/X-total/cancel").raise_for_status()
    _end(grid, "L-fit")


def test_egress_reaches_the_internet_but_not_the_coordinators_loopback(grid: Grid) -> None:
    r = _submit(grid, "L-net", {"egress": True, "disk_gb": 0.25})
    assert r.status_code == 201 and r.json()["state"] == "active", r.text
    lease = _wait_lease(grid, "L-net", {"running", "failed"})
    assert lease["state"] == "running", lease
    assert lease["node_id"] == grid.node_ids["p-net"]
    port = grid.coordinator.url.rsplit(":", 1)[1].strip("/")
    get = (
        "import sys, urllib.request\n"
        "for u in sys.argv[1:]:\n"
        "    try: print(urllib.request.urlopen(u, timeout=3).status)\n"
        "    except Exception as e: print('ERR', type(e).__name__)\n"
    )
    coordinator = f"http://127.0.0.1:{port}/api/v1/status"
    gateway = f"http://10.0.2.2:{port}/api/v1/status"
    urls = [grid.net.internet, coordinator, gateway]
    code, out, err = grid.run("L-net", ["python", "-c", get, *urls])
    assert code == 0, err
    internet, *provider = out.splitlines()
    assert internet == "200"
    assert all(line.startswith("ERR") for line in provider), out
    _end(grid, "L-net")


def test_the_agent_refuses_a_lease_past_its_controls_whatever_the_coordinator_sent(
    grid: Grid,
) -> None:
    # The coordinator still holds p-net's registered controls (egress on); the agent's own
    # are now off, as if the coordinator lied or were stale.
    agent = grid.agents["p-net"].agent
    saved = agent.config.lease_controls
    agent.config.lease_controls = replace(saved, egress=False)
    try:
        r = _submit(grid, "L-refused", {"egress": True})
        assert r.json()["state"] == "active", r.text
        lease = _wait_lease(grid, "L-refused", {"running", "failed"})
    finally:
        agent.config.lease_controls = saved
    assert lease["state"] == "failed"
    assert "lease controls (lease.egress)" in lease["message"], lease
    assert "L-refused" not in agent.leases.workspaces


@pytest.mark.parametrize(
    ("resources", "param"),
    [
        ({"disk_gb": "lots"}, "resources.disk_gb"),
        ({"pip": ["--index-url=http://evil/"]}, "resources.pip"),
        ({"pip": ["numpy", "../wheel.whl"]}, "resources.pip"),
        ({"egress": "yes"}, "resources.egress"),
        ({"runtime": "local"}, "resources.runtime"),
    ],
)
def test_a_bad_lease_field_is_a_400_naming_it(
    grid: Grid, resources: dict[str, Any], param: str
) -> None:
    r = _submit(grid, "X-bad", resources)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_workspace_field_on_an_order_without_a_workspace_is_a_400(grid: Grid) -> None:
    body = {"kind": "training", "hours": 1, "resources": {"max_price": 1.0, "egress": True}}
    with grid.http() as c:
        r = c.post("/api/v1/orders", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "resources.egress"


def test_disk_and_pip_reach_the_workspace(grid: Grid) -> None:
    ask = {"accelerators": ["RTX-4090"], "pip": ["igtiny==1.0"], "disk_gb": 0.25}
    r = _submit(grid, "L-pip", ask)
    assert r.json()["state"] == "active", r.text
    lease = _wait_lease(grid, "L-pip", {"running", "failed"})
    assert lease["state"] == "running", lease
    code, out, err = grid.run("L-pip", ["python", "-c", "import igtiny; print(igtiny.ANSWER)"])
    assert (code, out) == (0, "42\n"), err
    _end(grid, "L-pip")


def test_the_cli_shows_controls_and_orders_egress_disk_and_cpus(grid: Grid, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    runner = CliRunner()
    base = ["--coordinator", grid.coordinator.url, "--data-dir", str(tmp_path)]

    def cli(*args: str) -> Any:
        env = {"IDLEGRID_API_KEY": grid.api_key, "COLUMNS": "300"}
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    shown = cli("market", "offers", *base)
    assert shown.exit_code == 0, shown.output
    assert "not leased" in shown.stdout and "cpus≤1, ram_gb≤2, disk_gb≤4, egress" in shown.stdout
    made = cli(
        "lease", "create", "--egress", "--disk-gb", "0.25", "--cpus", "1", "--max-price", "5",
        *base,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    lease_id = made.stdout.strip()
    lease = grid.lease(lease_id)
    assert lease["node_id"] == grid.node_ids["p-net"] and lease["spec"]["egress"] is True
    assert lease["spec"]["disk_bytes"] == 1 << 28
    _end(grid, lease_id)
