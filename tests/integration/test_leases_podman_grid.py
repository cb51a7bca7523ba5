"""A lease on a provider whose agent runs the podman runtime, end to end on a loopback
grid: ordered through the market, provisioned as a container from an image built here
(`testbed/oci_image.py`), exec and cp through the coordinator's relay (the official
WebSocket route), a shell on a PTY in the container, ended with its container, processes
and /work gone."""

from __future__ import annotations

import io
import json
import queue
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from idlegrid.client.lease_cmd import chunks, exec_stream, tar_of
from idlegrid.config import CoordinatorSettings
from idlegrid.core import ledger
from idlegrid.core.lease.controls import LeaseControls
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed import oci_image
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_until,
)

pytestmark = pytest.mark.slow  # a grid and real containers: about 10 s


@pytest.fixture(scope="module")
def grid(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[CoordinatorThread, AgentThread, str]]:
    tmp = tmp_path_factory.mktemp("podman-grid")
    coordinator = CoordinatorThread(
        CoordinatorSettings(
            data_dir=tmp, database_url=f"sqlite:///{tmp}/c.db", port=free_port(),
            heartbeat_interval_s=0.2, node_timeout_s=3.0, long_poll_s=2.0,
            accrual_interval_s=0.3, payout_delay_s=0.0, stake_per_device=0, hw_proofs=False,
        )
    )  # fmt: skip
    coordinator.start()
    agent = make_agent(
        coordinator.url, [FakeEngine("fake:1")], "oci1", price=Price(MICRO, 4 * MICRO),
        device_price_h=3600 * 1000, devices=[{"model": "RTX-4090", "count": 1, "vram_gb": 0}],
        workspace_root=tmp / "ws", workspace_runtime="podman",
        workspace_options={"image": oci_image.build(), "oci_runtime": oci_image.oci_runtime()},
    )  # fmt: skip
    thread = AgentThread(agent)
    thread.start()
    with coordinator.admin() as c:
        key = c.post("/api/v1/admin/keys", json={"name": "k"}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 50 * MICRO, "reference": "k"},
        ).raise_for_status()
    auth = {"authorization": f"Bearer {key['api_key']}"}
    with httpx.Client(base_url=coordinator.url, trust_env=False, headers=auth) as c:
        wait_until(lambda: len(c.get("/api/v1/offers").json()["offers"]) == 1, timeout_s=30)
    try:
        yield coordinator, thread, key["api_key"]
    finally:
        thread.stop()
        for ws in list(agent.leases.workspaces.values()):
            ws.wipe()
        coordinator.stop()


def test_a_podman_lease_runs_execs_copies_and_ends(
    grid: tuple[CoordinatorThread, AgentThread, str], tmp_path: Path
) -> None:
    coordinator, thread, api_key = grid
    url = coordinator.url
    http = httpx.Client(
        base_url=url, trust_env=False, timeout=30, headers={"authorization": f"Bearer {api_key}"}
    )
    try:
        order = {"id": "P1", "kind": "lease", "hours": 1,
                 "resources": {"accelerators": ["RTX-4090"], "max_price": 5.0}}  # fmt: skip
        assert http.post("/api/v1/orders", json=order).status_code == 201
        wait_until(lambda: http.get("/api/v1/leases/P1").json().get("state") == "running", 30)

        def run(argv: list[str], stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
            out: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
            code = exec_stream(
                url, api_key, "P1", {"argv": argv},
                stdin=chunks(stdin) if stdin is not None else None,
                on_output=lambda fd, d: out[fd].extend(d),
            )  # fmt: skip
            return code, bytes(out[1]), bytes(out[2])

        ws = thread.agent.leases.workspaces["P1"]
        assert type(ws).__name__ == "PodmanWorkspace"
        script = "import os,sys; print(os.getcwd(), os.getuid()); print('oops', file=sys.stderr)"
        code, out, err = run(["python", "-c", script + "; sys.exit(3)"])
        assert (code, out, err) == (3, f"/work {ws.uid}\n".encode(), b"oops\n")  # type: ignore[attr-defined]
        assert run(["sh", "-c", "tr a-z A-Z"], stdin=b"streamed\n")[:2] == (0, b"STREAMED\n")

        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "a.txt").write_text("alpha\n")
        code = exec_stream(url, api_key, "P1", {"cp": "in", "path": "/work"},
                           stdin=chunks(tar_of(src, "data")))  # fmt: skip
        assert code == 0 and run(["cat", "/work/data/sub/a.txt"])[1] == b"alpha\n"
        got = bytearray()
        code = exec_stream(url, api_key, "P1", {"cp": "out", "path": "/work/data"},
                           on_output=lambda fd, d: got.extend(d) if fd == 1 else None)  # fmt: skip
        assert code == 0
        with tarfile.open(fileobj=io.BytesIO(bytes(got))) as tar:
            assert tar.extractfile("data/sub/a.txt").read() == b"alpha\n"  # type: ignore[union-attr]

        name, work = ws.name, ws.work  # type: ignore[attr-defined]
        t0 = time.monotonic()
        assert http.post("/api/v1/leases/P1/end").json()["state"] == "ending"
        wait_until(lambda: http.get("/api/v1/leases/P1").json().get("state") == "ended", 5)
        assert time.monotonic() - t0 < 5
        ps = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"],
                            capture_output=True, text=True, check=True)  # fmt: skip
        assert name not in ps.stdout.split() and not work.exists()
    finally:
        http.close()


def test_a_shell_runs_on_a_pty_in_the_container_with_ctrl_c_and_resize(
    grid: tuple[CoordinatorThread, AgentThread, str],
) -> None:
    coordinator, _thread, api_key = grid
    url = coordinator.url
    http = httpx.Client(
        base_url=url, trust_env=False, timeout=30, headers={"authorization": f"Bearer {api_key}"}
    )
    keys: queue.Queue[bytes | dict[str, Any] | None] = queue.Queue()
    screen = bytearray()
    done: list[int] = []

    def typed() -> Iterator[bytes | dict[str, Any]]:
        while (item := keys.get()) is not None:
            yield item

    def session() -> None:
        done.append(
            exec_stream(
                url,
                api_key,
                "P2",
                {"shell": True, "rows": 24, "cols": 80},
                stdin=typed(),
                on_output=lambda fd, d: screen.extend(d),
            )  # fmt: skip
        )

    try:
        order = {"id": "P2", "kind": "lease", "hours": 1,
                 "resources": {"accelerators": ["RTX-4090"], "max_price": 5.0}}  # fmt: skip
        assert http.post("/api/v1/orders", json=order).status_code == 201
        wait_until(lambda: http.get("/api/v1/leases/P2").json().get("state") == "running", 30)
        t = threading.Thread(target=session, daemon=True)
        t.start()
        keys.put(b"echo $((6*7))\r")
        wait_until(lambda: b"42\r\n" in screen, timeout_s=15)
        keys.put(b"tty; sleep 100\r")
        wait_until(lambda: b"/dev/pts/" in screen, timeout_s=10)
        keys.put(b"\x03")  # Ctrl-C: the PTY inside the container interrupts the sleep
        keys.put(b"echo after\r")
        # Without bash's bracketed paste (no inputrc in the image) lines follow a plain \n.
        wait_until(lambda: b"\nafter\r\n" in screen, timeout_s=10)
        keys.put({"type": "resize", "rows": 33, "cols": 101})
        keys.put(b"stty size\r")
        wait_until(lambda: b"\n33 101\r\n" in screen, timeout_s=10)
        keys.put(b"exit 7\r")
        t.join(10)
        assert done == [7]
        http.post("/api/v1/leases/P2/end").raise_for_status()
        wait_until(lambda: http.get("/api/v1/leases/P2").json().get("state") == "ended", 5)
    finally:
        http.close()


def test_an_order_naming_an_image_runs_it_on_podman_beside_bwrap_leases(tmp_path: Path) -> None:
    """A provider whose own runtime is bwrap and that offers podman too: a lease naming an
    image it has runs in a container of that image, one without runs in bwrap, one naming
    an image it lacks fails naming the image, its escrow refunded."""
    coordinator = CoordinatorThread(
        CoordinatorSettings(
            data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/c.db", port=free_port(),
            heartbeat_interval_s=0.2, node_timeout_s=3.0, long_poll_s=2.0,
            accrual_interval_s=0.3, payout_delay_s=0.0, stake_per_device=0, hw_proofs=False,
        )
    )  # fmt: skip
    coordinator.start()
    image = oci_image.build()
    agent = make_agent(
        coordinator.url, [FakeEngine("fake:1")], "both", price=Price(MICRO, 4 * MICRO),
        device_price_h=3600 * 1000, devices=[{"model": "RTX-4090", "count": 3, "vram_gb": 0}],
        workspace_root=tmp_path / "ws", workspace_runtime="bwrap",
        runtime_options={"podman": {"oci_runtime": oci_image.oci_runtime()}},
        lease_controls=LeaseControls(runtimes=("bwrap", "podman"), total_cpus=8),
    )  # fmt: skip
    thread = AgentThread(agent)
    thread.start()
    with coordinator.admin() as c:
        key = c.post("/api/v1/admin/keys", json={"name": "k"}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 50 * MICRO, "reference": "k"},
        ).raise_for_status()
    http = httpx.Client(
        base_url=coordinator.url,
        trust_env=False,
        timeout=30,
        headers={"authorization": f"Bearer {key['api_key']}"},
    )
    try:
        wait_until(lambda: len(http.get("/api/v1/offers").json()["offers"]) == 1, timeout_s=30)

        def order(oid: str, **resources: Any) -> dict[str, Any]:
            asked = {"accelerators": ["RTX-4090"], "max_price": 5.0, **resources}
            body = {"id": oid, "kind": "lease", "hours": 1, "resources": asked}
            r = http.post("/api/v1/orders", json=body)
            assert r.status_code == 201, r.text
            got: dict[str, Any] = http.get(f"/api/v1/orders/{oid}").json()
            return got

        def state(oid: str) -> str:
            return str(http.get(f"/api/v1/leases/{oid}").json().get("state"))

        order("I1", image=image)  # no runtime named: the image implies podman
        order("B1")
        wait_until(lambda: state("I1") == "running" and state("B1") == "running", 30)
        ws = agent.leases.workspaces
        assert type(ws["I1"]).__name__ == "PodmanWorkspace"
        assert type(ws["B1"]).__name__ == "BwrapWorkspace"
        used = subprocess.run(
            ["podman", "inspect", "--format", "{{.ImageName}}", ws["I1"].name],  # type: ignore[attr-defined]
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert used == image

        def balance() -> int:
            with coordinator.admin() as c:
                got = c.get("/api/v1/status").json()["balances"]
            return int(got.get(ledger.consumer_account(key["key_id"]), 0))

        before = balance()
        order("I2", image="localhost/no-such-image:1")
        wait_until(lambda: state("I2") == "failed", 30)

        lease = http.get("/api/v1/leases/I2").json()
        assert "localhost/no-such-image:1" in json.dumps(lease), lease
        # Nothing ran, nothing billed: its whole escrow went back.
        assert http.get("/api/v1/orders/I2").json()["spent"] == 0
        assert balance() == before

        bad = http.post("/api/v1/orders", json={"id": "I3", "kind": "lease", "hours": 1,
                        "resources": {"max_price": 5.0, "image": "Not An Image!"}})  # fmt: skip
        assert bad.status_code == 400 and "image" in bad.text
        for oid in ("I1", "B1"):
            http.post(f"/api/v1/leases/{oid}/end").raise_for_status()
        wait_until(lambda: state("I1") == "ended" and state("B1") == "ended", 10)
    finally:
        http.close()
        thread.stop()
        for w in list(agent.leases.workspaces.values()):
            w.wipe()
        coordinator.stop()
