"""Lease create → first exec answered, through the market and the relay, on a loopback grid.

    PYTHONPATH=src .venv/bin/python bench/bench_lease.py --runs 5 [--json]
        [--runtime bwrap,podman] [--image REF] [--seccomp on,off]

One coordinator and one provider agent in this process per runtime, in turn (bwrap: root
and bubblewrap needed; podman: root, podman and an image, by default one built here from
busybox and this Python, testbed/oci_image.py). Each run orders a lease through `POST
/api/v1/orders`, waits for the lease to run (polled every 20 ms), then runs `echo ready`
through the WebSocket exec route; the clock stops at the first output byte. Then: 10 more
execs (round trip of a command through the relay), a hold, `end`, and billed seconds ÷
running seconds.

Port-forward (`--forward-mb`, one more lease): a bulk server and an echo server run in the
workspace and, the same script, directly on the host's loopback; the same client reads
N MB from each and times 50 one-byte echoes: throughput ratio (forwarded ÷ direct) and the
added round-trip latency.

`--seccomp on,off`: bwrap with its seccomp filter (the default) and without it, one grid
each, in turn (agent/workspace/seccomp.py; `off` is reported as `bwrap-noseccomp`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from idlegrid.client.lease_cmd import exec_stream
from idlegrid.config import CoordinatorSettings
from idlegrid.core.ledger import MICRO, Price
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import (
    AgentThread,
    CoordinatorThread,
    free_port,
    make_agent,
    wait_until,
)


def main() -> None:
    """Run the measurement per runtime and print a table (or JSON)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hold-s", type=float, default=2.5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--forward-mb", type=int, default=20)
    ap.add_argument("--forward-runs", type=int, default=5, help="direct/forwarded pairs")
    ap.add_argument(
        "--runtime",
        default="bwrap",
        help="workspace runtimes, comma-separated (bwrap, podman), one grid each, in turn",
    )
    ap.add_argument("--image", help="podman: an image this host has (default: one built here)")
    ap.add_argument("--seccomp", default="on", help="bwrap: on, off or on,off (one grid each)")
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for rt in args.runtime.split(","):
        for sc in args.seccomp.split(",") if rt == "bwrap" else ["on"]:
            name = rt if sc == "on" else f"{rt}-noseccomp"
            results[name] = _measure(rt, args, {} if sc == "on" else {"seccomp_filter": False})
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for rt, out in results.items():
        print(f"== {rt}")
        for name in ("create_to_first_exec_s", "order_to_running_s", "exec_round_trip_s"):
            s = out[name]
            print(f"{name:<26} median {s['median']:.3f} s  max {s['max']:.3f} s")
        print("billed - running (s):", out["billed_minus_running_s"])
        print("port-forward:", json.dumps(out["port_forward"]))


def _measure(runtime: str, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """A fresh grid whose one provider runs `runtime` (with `extra` options), and the runs."""
    options: dict[str, Any] = dict(extra)
    if runtime == "podman":
        from idlegrid.testbed import oci_image

        options["image"] = args.image or oci_image.build()
        options["oci_runtime"] = oci_image.oci_runtime()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lease-"))
    coord = CoordinatorThread(
        CoordinatorSettings(
            data_dir=tmp, database_url=f"sqlite:///{tmp}/c.db", port=free_port(),
            heartbeat_interval_s=0.5, node_timeout_s=5.0, stake_per_device=0, hw_proofs=False,
        )
    )  # fmt: skip
    coord.start()
    agent = make_agent(
        coord.url, [FakeEngine("fake:1")], "p1", price=Price(MICRO, 4 * MICRO),
        device_price_h=MICRO, devices=[{"model": "RTX-4090", "count": 1, "vram_gb": 0}],
        workspace_root=tmp / "ws", workspace_runtime=runtime, workspace_options=options,
    )  # fmt: skip
    thread = AgentThread(agent)
    thread.start()
    with coord.admin() as c:
        key = c.post("/api/v1/admin/keys", json={"name": "bench"}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 1000 * MICRO, "reference": "bench"},
        ).raise_for_status()
    http = httpx.Client(
        base_url=coord.url, trust_env=False, headers={"authorization": f"Bearer {key['api_key']}"}
    )
    wait_until(lambda: len(http.get("/api/v1/offers").json()["offers"]) == 1, timeout_s=30)
    rows: list[dict[str, Any]] = []
    try:
        for i in range(args.runs):
            rows.append(_one(http, coord.url, key["api_key"], f"B{i}", args.hold_s))
        fwd = (
            _forward(http, coord.url, key["api_key"], args.forward_mb, args.forward_runs)
            if args.forward_mb
            else {}
        )
    finally:
        http.close()
        thread.stop()
        coord.stop()
    return {
        "runs": rows,
        "create_to_first_exec_s": _stats([r["create_to_first_exec_s"] for r in rows]),
        "order_to_running_s": _stats([r["order_to_running_s"] for r in rows]),
        "exec_round_trip_s": _stats([r["exec_round_trip_s"] for r in rows]),
        "billed_minus_running_s": [r["billed_minus_running_s"] for r in rows],
        "port_forward": fwd,
    }


def _one(
    http: httpx.Client, url: str, api_key: str, lease_id: str, hold_s: float
) -> dict[str, Any]:
    order = {"id": lease_id, "kind": "lease", "hours": 1, "resources": {"max_price": 2}}
    first: list[float] = []
    t0 = time.perf_counter()
    http.post("/api/v1/orders", json=order).raise_for_status()

    def running() -> bool:
        r = http.get(f"/api/v1/leases/{lease_id}")
        return r.status_code == 200 and r.json()["state"] == "running"

    wait_until(running, timeout_s=60)
    t_run = time.perf_counter()
    code = exec_stream(
        url, api_key, lease_id, {"argv": ["echo", "ready"]},
        on_output=lambda fd, d: first.append(time.perf_counter()) if not first else None,
    )  # fmt: skip
    assert code == 0 and first
    trips = []
    for _ in range(10):
        t = time.perf_counter()
        assert exec_stream(url, api_key, lease_id, {"argv": ["true"]}) == 0
        trips.append(time.perf_counter() - t)
    time.sleep(hold_s)
    http.post(f"/api/v1/leases/{lease_id}/end").raise_for_status()
    wait_until(lambda: http.get(f"/api/v1/leases/{lease_id}").json()["state"] == "ended")
    lease = http.get(f"/api/v1/leases/{lease_id}").json()
    at = {t["state"]: t["at"] for t in lease["transitions"]}
    return {
        "create_to_first_exec_s": first[0] - t0,
        "order_to_running_s": t_run - t0,
        "exec_round_trip_s": statistics.median(trips),
        "billed_minus_running_s": round(lease["billed_s"] - (at["ending"] - at["running"]), 3),
    }


SERVER = r"""
import os, socket, sys, threading
bulk_port, echo_port, mb = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def bulk():
    s = socket.create_server(("127.0.0.1", bulk_port))
    buf = os.urandom(1 << 20)
    while True:
        c, _ = s.accept()
        try:
            for _ in range(mb):
                c.sendall(buf)
        except OSError:
            pass  # a probe that connected and left
        c.close()
def echo():
    s = socket.create_server(("127.0.0.1", echo_port))
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while (d := c.recv(65536)):
                c.sendall(d)
        except OSError:
            pass
        c.close()
threading.Thread(target=bulk, daemon=True).start()
echo()
"""


def _client(port: int, echo_port: int, mb: int) -> tuple[float, float]:
    """(seconds to read `mb` MB, median one-byte echo round trip) through 127.0.0.1:`port`
    (bulk) and `echo_port`."""
    import socket

    t = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as c:
        while data := c.recv(1 << 20):
            got += len(data)
    seconds = time.perf_counter() - t
    assert got == mb << 20, got
    trips = []
    with socket.create_connection(("127.0.0.1", echo_port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):
            t = time.perf_counter()
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            trips.append(time.perf_counter() - t)
    return seconds, statistics.median(trips)


def _forward(http: httpx.Client, url: str, api_key: str, mb: int, runs: int) -> dict[str, float]:
    import subprocess
    import sys
    import threading

    from idlegrid.client.lease_cmd import serve_forward

    order = {"id": "FWD", "kind": "lease", "hours": 1, "resources": {"max_price": 2}}
    http.post("/api/v1/orders", json=order).raise_for_status()
    wait_until(lambda: http.get("/api/v1/leases/FWD").json().get("state") == "running", 60)
    from websockets.sync.client import connect

    with connect(
        "ws" + url[4:] + "/api/v1/leases/FWD/exec",
        additional_headers={"authorization": f"Bearer {api_key}"},
        proxy=None,
    ) as c:
        c.send(json.dumps({"argv": ["python", "-c", SERVER, "9000", "9001", str(mb)]}))
        c.recv()
    direct, direct_echo, local, local_echo = (free_port() for _ in range(4))
    host = subprocess.Popen([sys.executable, "-c", SERVER, str(direct), str(direct_echo), str(mb)])
    stop = threading.Event()
    fwd_bulk = threading.Thread(
        target=serve_forward, args=(url, api_key, "FWD", local, 9000, stop), daemon=True
    )
    fwd_echo = threading.Thread(
        target=serve_forward, args=(url, api_key, "FWD", local_echo, 9001, stop), daemon=True
    )
    fwd_bulk.start()
    fwd_echo.start()
    try:
        for port in (direct, direct_echo, local, local_echo):
            wait_until(lambda p=port: _listening(p), timeout_s=10)
        time.sleep(1.0)  # the workspace's servers start (a refused forward would fail the run)
        pairs = [(_client(direct, direct_echo, mb), _client(local, local_echo, mb))]
        pairs += [(_client(direct, direct_echo, mb), _client(local, local_echo, mb))
                  for _ in range(runs - 1)]  # fmt: skip
    finally:
        stop.set()
        host.kill()
        host.wait()
        http.post("/api/v1/leases/FWD/end")
    # Each pair ran back to back: its ratio is what the noise of this shared VM spares.
    ratios = sorted(d[0] / f[0] for d, f in pairs)
    d_s = statistics.median(d[0] for d, _ in pairs)
    f_s = statistics.median(f[0] for _, f in pairs)
    d_rtt = statistics.median(d[1] for d, _ in pairs)
    f_rtt = statistics.median(f[1] for _, f in pairs)
    return {
        "mb": mb,
        "runs": runs,
        "direct_mb_s": round(mb / d_s, 1),
        "forwarded_mb_s": round(mb / f_s, 1),
        "throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratio_min_max": [round(ratios[0], 3), round(ratios[-1], 3)],
        "direct_rtt_ms": round(d_rtt * 1000, 3),
        "forwarded_rtt_ms": round(f_rtt * 1000, 3),
        "added_rtt_ms": round((f_rtt - d_rtt) * 1000, 3),
    }


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "max": max(xs), "min": min(xs)}


if __name__ == "__main__":
    main()
