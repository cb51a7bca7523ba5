"""Leases that run, end to end: a lease ordered through the market on a loopback grid is
provisioned by the provider's agent in a real bubblewrap sandbox, reached through the
coordinator's relay (the official WebSocket route, a real `websockets` client), billed per
running second, ended (every process killed, /work wiped), and failed with a refund when
its provider dies. Nothing here skips: no bubblewrap or root fails the grid fixture."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from idlegrid.client.lease_cmd import LeaseError, chunks, exec_stream, serve_forward, tar_of
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

pytestmark = pytest.mark.slow  # real sandboxes: about 20 s


@dataclass
class Grid:
    coordinator: CoordinatorThread
    agents: dict[str, AgentThread]
    node_ids: dict[str, str]
    keys: list[tuple[str, str]]  # (key id, api key)

    @property
    def url(self) -> str:
        return self.coordinator.url

    def http(self, which: int = 0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            trust_env=False,
            timeout=30,
            headers={"authorization": f"Bearer {self.keys[which][1]}"},
        )

    def balance(self, account: str) -> int:
        with self.coordinator.admin() as c:
            return int(c.get("/api/v1/status").json()["balances"].get(account, 0))

    def lease(self, lease_id: str) -> dict[str, Any]:
        with self.http() as c:
            r = c.get(f"/api/v1/leases/{lease_id}")
            r.raise_for_status()
            return r.json()  # type: ignore[no-any-return]

    def run(
        self, lease_id: str, argv: list[str], stdin: bytes | None = None
    ) -> tuple[int, bytes, bytes]:
        out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        code = exec_stream(
            self.url, self.keys[0][1], lease_id, {"argv": argv},
            stdin=chunks(stdin) if stdin is not None else None,
            on_output=lambda fd, d: out[fd].extend(d),
        )  # fmt: skip
        return code, bytes(out[1]), bytes(out[2])


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    tmp = tmp_path_factory.mktemp("lease-grid")
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
    agents, node_ids, keys = {}, {}, []
    with coordinator.admin() as c:
        for name, device in (("p1", "RTX-4090"), ("p2", "RTX-3060")):
            agent = make_agent(
                coordinator.url,
                [FakeEngine("fake:1")],
                name,
                price=Price(MICRO, 4 * MICRO),
                device_price_h=3600 * 1000,  # 1000 µcr a second: seconds are easy to read
                devices=[{"model": device, "count": 1, "vram_gb": 0}],
                workspace_root=tmp / f"ws-{name}",
            )
            node_ids[name] = agent.client.key.node_id
            agents[name] = AgentThread(agent)
            agents[name].start()
        for i in range(2):
            key = c.post("/api/v1/admin/keys", json={"name": f"k{i}"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 50 * MICRO, "reference": f"k{i}"},
            ).raise_for_status()
            keys.append((key["key_id"], key["api_key"]))
    g = Grid(coordinator, agents, node_ids, keys)

    def offered() -> bool:
        with g.http() as c:
            return len(c.get("/api/v1/offers").json()["offers"]) == 2

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


def _order(grid: Grid, lease_id: str, device: str, hours: float = 1.0) -> dict[str, Any]:
    body = {
        "id": lease_id,
        "kind": "lease",
        "hours": hours,
        "resources": {"accelerators": [device], "max_price": 5.0},
    }
    with grid.http() as c:
        r = c.post("/api/v1/orders", json=body)
        assert r.status_code == 201, r.text
        if r.json()["state"] != "active":  # a rare CI flake (capacity, free 0): say why
            offers = c.get("/api/v1/offers").json()["offers"]
            orders = c.get("/api/v1/orders").json()
            raise AssertionError((r.json()["reasons"], offers, orders))
        return r.json()  # type: ignore[no-any-return]


def _wait_state(grid: Grid, lease_id: str, state: str, timeout_s: float = 30) -> dict[str, Any]:
    def reached() -> bool:
        with grid.http() as c:
            r = c.get(f"/api/v1/leases/{lease_id}")
        return r.status_code == 200 and r.json()["state"] == state

    wait_until(reached, timeout_s=timeout_s)
    return grid.lease(lease_id)


def test_a_lease_runs_execs_copies_and_ends_billed_per_running_second(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.keys[0][0])
    before = grid.balance(consumer)
    _order(grid, "L1", "RTX-4090")
    lease = _wait_state(grid, "L1", "running")
    assert lease["node_id"] == grid.node_ids["p1"]
    assert [t["cause"] for t in lease["transitions"]] == ["created", "placed", "provisioned"]

    # exec through the relay: stdout, stderr and the exit code, from inside the sandbox.
    code, out, err = grid.run(
        "L1", ["python", "-c", "import os,sys; print(os.getcwd(), os.getuid()); "
               "print('oops', file=sys.stderr); sys.exit(3)"],
    )  # fmt: skip
    assert (code, out, err) == (3, b"/work 1000\n", b"oops\n")
    # Streamed stdin, bigger than a window each way: bounded relays still carry it all.
    blob = os.urandom(700_000).hex().encode()
    code, out, _ = grid.run(
        "L1", ["python", "-c", "import sys; d = sys.stdin.buffer.read(); "
               "sys.stdout.buffer.write(d.upper())"], stdin=blob,
    )  # fmt: skip
    assert code == 0 and out == blob.upper()
    # The same through REST.
    with grid.http() as c:
        r = c.post("/api/v1/leases/L1/exec", json={"argv": ["sh", "-c", "echo rest; exit 5"]})
        assert r.status_code == 200, r.text
        assert (r.json()["exit_code"], r.json()["stdout"]) == (5, "rest\n")

    # Another key: the lease does not exist for it, on REST and on the WebSocket.
    with grid.http(1) as c:
        assert c.get("/api/v1/leases/L1").status_code == 404
        assert c.post("/api/v1/leases/L1/end").status_code == 404
    with pytest.raises(LeaseError) as refused:
        exec_stream(grid.url, grid.keys[1][1], "L1", {"argv": ["true"]})
    assert refused.value.status == 404

    # A consumer that disconnects does not kill its command.
    _leave_at_once(grid, "L1", "sleep 1; echo done > /work/marker")
    wait_until(lambda: grid.run("L1", ["cat", "/work/marker"])[1] == b"done\n", timeout_s=10)

    # cp in and out (tar streams), and paths that leave /work refused.
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"cp-{os.getpid()}"
    (src / "sub").mkdir(parents=True, exist_ok=True)
    (src / "sub" / "a.txt").write_text("alpha\n")
    code = exec_stream(grid.url, grid.keys[0][1], "L1", {"cp": "in", "path": "/work"},
                       stdin=chunks(tar_of(src, "data")))  # fmt: skip
    assert code == 0
    assert grid.run("L1", ["cat", "/work/data/sub/a.txt"])[1] == b"alpha\n"
    got = bytearray()
    code = exec_stream(grid.url, grid.keys[0][1], "L1", {"cp": "out", "path": "/work/data"},
                       on_output=lambda fd, d: got.extend(d) if fd == 1 else None)  # fmt: skip
    assert code == 0
    with tarfile.open(fileobj=io.BytesIO(bytes(got))) as tar:
        assert tar.extractfile("data/sub/a.txt").read() == b"alpha\n"  # type: ignore[union-attr]
    for bad in ("/work/../etc", "../x", "/etc"):
        with pytest.raises(LeaseError) as why:
            exec_stream(grid.url, grid.keys[0][1], "L1", {"cp": "in", "path": bad},
                        stdin=chunks(tar_of(src, "data")))  # fmt: skip
        assert (why.value.status, why.value.param) == (400, "path")
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    errs = bytearray()
    code = exec_stream(
        grid.url,
        grid.keys[0][1],
        "L1",
        {"cp": "in", "path": "/work/in"},
        stdin=chunks(evil.getvalue()),
        on_output=lambda fd, d: errs.extend(d),
    )
    assert code == 3 and b"refused" in errs
    assert grid.run("L1", ["ls", "/work"])[1].split() == [b"data", b"in", b"marker"]

    # A background process; end kills it within 5 s and wipes /work.
    _leave_at_once(grid, "L1", "sleep 1000")
    ws = grid.agents["p1"].agent.leases.workspaces["L1"]
    procs = [Path(p) for p in ws.cgroup.procs_files]  # type: ignore[attr-defined]
    wait_until(lambda: any(p.read_text().split() for p in procs), timeout_s=10)
    pids = {int(x) for p in procs for x in p.read_text().split()}
    work_dir = ws.work  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with grid.http() as c:
        assert c.post("/api/v1/leases/L1/end").json()["state"] == "ending"
    lease = _wait_state(grid, "L1", "ended", timeout_s=5)
    assert time.monotonic() - t0 < 5
    wait_until(lambda: not any(_alive(pid) for pid in pids), timeout_s=5 - (time.monotonic() - t0))
    assert not work_dir.exists()
    assert [t["cause"] for t in lease["transitions"]][-2:] == ["end", "wiped"]
    # Every relay of the lease is forgotten once its command is over (none kept for ever).
    relays = grid.coordinator.app.state.services.leases.relays
    wait_until(lambda: not [r for r in relays.values() if r.lease_id == "L1"], timeout_s=5)

    # Billed seconds = running seconds, floored (±1 s); the rest of the escrow came back.
    at = {t["state"]: t["at"] for t in lease["transitions"]}
    ran = at["ending"] - at["running"]
    assert ran - 1 < lease["billed_s"] <= ran
    with grid.http() as c:
        order = c.get("/api/v1/orders/L1").json()
    assert order["state"] == "cancelled"
    assert order["spent"] == lease["billed_s"] * 1000
    assert grid.balance(ledger.order_escrow_account("L1")) == 0
    assert grid.balance(consumer) == before - order["spent"]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent (the agent's reader) to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


def _leave_at_once(grid: Grid, lease_id: str, script: str) -> None:
    """Start `script` and disconnect right after it started (the command runs on)."""
    from websockets.sync.client import connect

    ws_url = "ws" + grid.url[4:] + f"/api/v1/leases/{lease_id}/exec"
    with connect(ws_url, additional_headers={"authorization": f"Bearer {grid.keys[0][1]}"},
                 proxy=None) as ws:  # fmt: skip
        ws.send(json.dumps({"argv": ["sh", "-c", script]}))
        assert json.loads(ws.recv())["type"] == "started"


def test_a_lost_provider_fails_the_lease_and_refunds_from_that_moment(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.keys[0][0])
    before = grid.balance(consumer)
    _order(grid, "L2", "RTX-3060")
    _wait_state(grid, "L2", "running")
    assert grid.run("L2", ["echo", "up"])[1] == b"up\n"
    grid.agents["p2"].kill()
    lease = _wait_state(grid, "L2", "failed", timeout_s=15)
    assert lease["transitions"][-1]["cause"] == "provider-lost"
    assert "files are gone" in lease["message"]
    at = {t["state"]: t["at"] for t in lease["transitions"]}
    assert lease["billed_s"] <= at["failed"] - at["running"] < lease["billed_s"] + 1
    with grid.http() as c:
        order = c.get("/api/v1/orders/L2").json()
    assert order["state"] == "failed"
    assert order["spent"] == lease["billed_s"] * 1000
    assert grid.balance(ledger.order_escrow_account("L2")) == 0
    assert grid.balance(consumer) == before - order["spent"]


def test_a_lease_whose_paid_time_runs_out_is_ended_and_billed_exactly_that(grid: Grid) -> None:
    _order(grid, "L3", "RTX-4090", hours=2 / 3600)  # two running seconds
    lease = _wait_state(grid, "L3", "ended", timeout_s=30)
    causes = [t["cause"] for t in lease["transitions"]]
    assert causes == ["created", "placed", "provisioned", "expired", "wiped"]
    at = {t["state"]: t["at"] for t in lease["transitions"]}
    assert at["ending"] - at["running"] == pytest.approx(2.0, abs=1e-6)
    assert lease["billed_s"] == 2
    with grid.http() as c:
        order = c.get("/api/v1/orders/L3").json()
    assert (order["state"], order["spent"]) == ("completed", 2000)
    assert grid.balance(ledger.order_escrow_account("L3")) == 0


def test_the_cli_creates_runs_copies_and_ends_a_lease(grid: Grid, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from idlegrid.client.cli import app

    runner = CliRunner()
    env = {"IDLEGRID_API_KEY": grid.keys[0][1]}
    base = ["--coordinator", grid.url, "--data-dir", str(tmp_path)]

    def cli(*args: str) -> Any:
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    made = cli("lease", "create", "--gpu", "RTX-4090", "--max-price", "5", *base)
    assert made.exit_code == 0, made.output
    lease_id = made.stdout.strip()
    assert grid.lease(lease_id)["state"] == "running"
    ran = cli("exec", *base, lease_id, "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert ran.exit_code == 4 and "out" in ran.stdout, ran.output
    (tmp_path / "in.txt").write_text("payload\n")
    assert cli("cp", *base, str(tmp_path / "in.txt"), f"{lease_id}:/work/in.txt").exit_code == 0
    back = cli("cp", *base, f"{lease_id}:/work/in.txt", str(tmp_path / "back.txt"))
    assert back.exit_code == 0, back.output
    assert (tmp_path / "back.txt").read_text() == "payload\n"
    bad = cli("cp", *base, str(tmp_path / "in.txt"), f"{lease_id}:/work/../etc/x")
    assert bad.exit_code == 1 and "field: path" in bad.output.replace("\n", " "), bad.output
    assert "out" in cli("lease", "logs", lease_id, *base).stdout
    status = cli("lease", "status", lease_id, *base, "--json")
    assert '"state": "running"' in status.stdout
    longer = cli("lease", "extend", lease_id, "--hours", "0.5", *base)
    assert longer.exit_code == 0 and "1.5 h paid" in longer.stdout, longer.output
    assert grid.lease(lease_id)["hours"] == 1.5
    assert "ending" in cli("lease", "end", lease_id, *base).stdout
    _wait_state(grid, lease_id, "ended")


def test_port_forward_reaches_a_server_started_in_the_workspace(grid: Grid) -> None:
    _order(grid, "L4", "RTX-4090")
    _wait_state(grid, "L4", "running")
    make = "mkdir -p /work/www && head -c 1000000 /dev/urandom > /work/www/blob"
    make += " && sha256sum /work/www/blob"
    code, out, _ = grid.run("L4", ["sh", "-c", make])
    assert code == 0
    digest = out.split()[0].decode()
    _leave_at_once(
        grid, "L4", "exec python -m http.server 8765 --bind 127.0.0.1 --directory /work/www"
    )
    stop, ready = threading.Event(), threading.Event()
    local = free_port()
    server = threading.Thread(
        target=serve_forward,
        args=(grid.url, grid.keys[0][1], "L4", local, 8765, stop, ready),
        daemon=True,
    )
    server.start()
    assert ready.wait(10)
    got: list[bytes] = []

    def fetched() -> bool:
        try:
            with httpx.Client(trust_env=False, timeout=10) as c:
                r = c.get(f"http://127.0.0.1:{local}/blob")
        except httpx.HTTPError:
            return False  # the server inside is not listening yet
        got.append(r.content)
        return r.status_code == 200

    wait_until(fetched, timeout_s=20, interval_s=0.2)
    assert hashlib.sha256(got[-1]).hexdigest() == digest
    stop.set()
    server.join(5)
    with grid.http() as c:
        c.post("/api/v1/leases/L4/end").raise_for_status()
    _wait_state(grid, "L4", "ended")


def test_a_lease_not_provisioned_in_time_fails_refunded_and_the_agent_wipes_it(
    grid: Grid,
) -> None:
    leases = grid.coordinator.app.state.services.leases
    consumer = ledger.consumer_account(grid.keys[0][0])
    before = grid.balance(consumer)
    leases.provision_timeout_s = 0.0  # no agent answers that fast
    try:
        _order(grid, "L5", "RTX-4090")
        lease = _wait_state(grid, "L5", "failed")
    finally:
        leases.provision_timeout_s = 600.0
    assert lease["transitions"][-1]["cause"] == "provisioning-failed"
    assert "no answer" in lease["message"]
    with grid.http() as c:
        assert c.get("/api/v1/orders/L5").json()["state"] == "failed"
    assert grid.balance(consumer) == before  # nothing ran, nothing billed
    host = grid.agents["p1"].agent.leases
    root = host.config.workspace_root
    assert root is not None
    wait_until(lambda: "L5" not in host.workspaces and not (root / "L5").exists(), timeout_s=10)


def test_a_shell_runs_on_a_pty_in_the_workspace_with_ctrl_c_and_resize(grid: Grid) -> None:
    import queue

    _order(grid, "L6", "RTX-4090")
    _wait_state(grid, "L6", "running")
    keys: queue.Queue[bytes | dict[str, Any] | None] = queue.Queue()
    screen = bytearray()
    done: list[int] = []

    def typed() -> Iterator[bytes | dict[str, Any]]:
        while (item := keys.get()) is not None:
            yield item

    def session() -> None:
        done.append(
            exec_stream(
                grid.url,
                grid.keys[0][1],
                "L6",
                {"shell": True, "rows": 24, "cols": 80},
                stdin=typed(),
                on_output=lambda fd, d: screen.extend(d),
            )  # fmt: skip
        )

    t = threading.Thread(target=session, daemon=True)
    t.start()
    keys.put(b"echo $((6*7))\r")
    # Output lines start with \r after bash's bracketed-paste switch; typed echoes do not.
    wait_until(lambda: b"\r42\r\n" in screen, timeout_s=15)
    keys.put(b"tty; sleep 100\r")
    wait_until(lambda: b"/dev/pts/" in screen, timeout_s=10)
    keys.put(b"\x03")  # Ctrl-C: the PTY inside the sandbox interrupts the sleep
    keys.put(b"echo after\r")
    wait_until(lambda: b"\rafter\r\n" in screen, timeout_s=10)
    keys.put({"type": "resize", "rows": 33, "cols": 101})
    keys.put(b"stty size\r")
    wait_until(lambda: b"\r33 101\r\n" in screen, timeout_s=10)
    keys.put(b"exit 7\r")
    t.join(10)
    assert done == [7]
    with grid.http() as c:
        c.post("/api/v1/leases/L6/end").raise_for_status()
    _wait_state(grid, "L6", "ended")


ECHO = r"""
import socket, threading
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := c.recv(1 << 16):
        c.sendall(data)
    c.close()
s = socket.create_server(("127.0.0.1", 8766))
while True:
    threading.Thread(target=echo, args=(s.accept()[0],)).start()
"""


def test_port_forward_carries_megabytes_both_ways_intact_and_a_lone_byte_at_once(
    grid: Grid,
) -> None:
    _order(grid, "L7", "RTX-4090")
    _wait_state(grid, "L7", "running")
    _leave_at_once(grid, "L7", f"exec python -c '{ECHO}'")
    stop, ready = threading.Event(), threading.Event()
    local = free_port()
    args = (grid.url, grid.keys[0][1], "L7", local, 8766, stop, ready)
    server = threading.Thread(target=serve_forward, args=args, daemon=True)
    server.start()
    assert ready.wait(10)
    sent = os.urandom(6 << 20)
    got = bytearray()

    def echoed() -> bool:
        got.clear()
        try:
            c = socket.create_connection(("127.0.0.1", local), timeout=20)
        except OSError:
            return False
        with c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                c.sendall(b"?")  # a lone byte (an interactive protocol's) must not wait
                got.extend(c.recv(1))
            except OSError:
                return False  # the server inside is not listening yet
            if got != b"?":
                return False
            writer = threading.Thread(target=c.sendall, args=(sent,), daemon=True)
            writer.start()
            while len(got) < 1 + len(sent) and (data := c.recv(1 << 20)):
                got.extend(data)
            writer.join(20)
        return True

    wait_until(echoed, timeout_s=30, interval_s=0.3)
    assert len(got) == 1 + len(sent)
    assert hashlib.sha256(got[1:]).hexdigest() == hashlib.sha256(sent).hexdigest()
    stop.set()
    server.join(5)


def test_a_consumer_that_stops_reading_stalls_the_workload_within_one_window(
    grid: Grid,
) -> None:
    from websockets.sync.client import connect

    _wait_state(grid, "L7", "running")
    relays = grid.coordinator.app.state.services.leases.relays
    before = set(relays)
    size = 24 << 20  # far more than the window, the pipe and the sockets' buffers hold
    script = f"import random, sys; sys.stdout.buffer.write(random.Random(7).randbytes({size}))"
    ws_url = "ws" + grid.url[4:] + "/api/v1/leases/L7/exec"
    auth = {"authorization": f"Bearer {grid.keys[0][1]}"}
    with connect(ws_url, additional_headers=auth, proxy=None, max_size=1 << 22) as ws:
        ws.send(json.dumps({"argv": ["python", "-c", script], "kill_on_disconnect": True}))
        assert json.loads(ws.recv())["type"] == "started"
        (rid,) = set(relays) - before
        relay = relays[rid]
        host = grid.agents["p1"].agent.leases
        # Nobody reads: the sockets fill, then the relay's queue, then the agent's window.
        wait_until(lambda: relay._queued >= relay.window // 2, timeout_s=30)
        wait_until(lambda: host.execs[rid].window.room == 0, timeout_s=30)
        assert relay.peak_queued <= relay.window
        assert relay.received < size  # the workload waits: its output is not all out
        got = bytearray()
        while True:
            msg = ws.recv(timeout=30)
            if isinstance(msg, bytes):
                got.extend(msg[1:])
            elif json.loads(msg)["type"] == "exit":
                break
    assert json.loads(msg)["code"] == 0
    assert relay.peak_queued <= relay.window
    expected = random.Random(7).randbytes(size)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()
    with grid.http() as c:
        c.post("/api/v1/leases/L7/end").raise_for_status()
    _wait_state(grid, "L7", "ended")


def test_a_live_lease_extends_escrowing_first_and_an_ended_one_refuses(grid: Grid) -> None:
    consumer = ledger.consumer_account(grid.keys[0][0])
    before = grid.balance(consumer)
    _order(grid, "L8", "RTX-4090", hours=0.5)  # escrows 0.5 h at the 5 credit ceiling
    _wait_state(grid, "L8", "running")
    with grid.http() as c:
        r = c.post("/api/v1/leases/L8/extend", json={"hours": 1})
        assert r.status_code == 200, r.text
        assert r.json()["hours"] == 1.5
        assert grid.balance(ledger.order_escrow_account("L8")) == 7.5 * MICRO
        assert grid.balance(consumer) == before - 7.5 * MICRO
        r = c.post("/api/v1/leases/L8/extend", json={"hours": 600})  # 3000 credits: short
        assert r.status_code == 402, r.text
        assert grid.lease("L8")["hours"] == 1.5  # nothing changed
        assert grid.balance(consumer) == before - 7.5 * MICRO
        r = c.post("/api/v1/leases/L8/extend", json={"hours": 0})
        assert r.status_code == 400 and "hours" in r.text
        assert c.post("/api/v1/leases/NOPE/extend", json={"hours": 1}).status_code == 404
        c.post("/api/v1/leases/L8/end").raise_for_status()
        lease = _wait_state(grid, "L8", "ended")
        r = c.post("/api/v1/leases/L8/extend", json={"hours": 1})
        assert r.status_code == 409, r.text
        order = c.get("/api/v1/orders/L8").json()
    # Ended: the extension's escrow came back with the rest; only running seconds were paid.
    assert order["spent"] == lease["billed_s"] * 1000
    assert grid.balance(ledger.order_escrow_account("L8")) == 0
    assert grid.balance(consumer) == before - order["spent"]


def test_a_pass_whose_live_set_predates_a_lease_does_not_call_its_provider_lost(
    grid: Grid,
) -> None:
    """The supervisor reads the live set when its pass begins; a lease adopted later in the
    pass may sit on a node registered after that (CI failed both leases of a fresh grid as
    "provider lost"). Settling with a live set that misses a provider whose own record is
    fresh leaves its lease alone."""
    _order(grid, "L9", "RTX-4090")
    _wait_state(grid, "L9", "running")
    leases = grid.coordinator.app.state.services.leases
    leases._settle(frozenset())  # the stale snapshot: nobody live
    assert grid.lease("L9")["state"] == "running"
    with grid.http() as c:
        c.post("/api/v1/leases/L9/end").raise_for_status()
    _wait_state(grid, "L9", "ended")
