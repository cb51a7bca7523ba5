"""Lease create → first exec answered, through the market and the relay, on a loopback grid.

    PYTHONPATH=src .venv/bin/python bench/bench_lease.py --runs 5 [--json]

One coordinator and one provider agent in this process (bwrap runtime: root and
bubblewrap needed). Each run orders a lease through `POST /api/v1/orders`, waits for the
lease to run (polled every 20 ms), then runs `echo ready` through the WebSocket exec
route; the clock stops at the first output byte. Then: 10 more execs (round trip of a
command through the relay), a hold, `end`, and billed seconds ÷ running seconds.
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
    """Run the measurement and print a table (or JSON)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hold-s", type=float, default=2.5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
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
        workspace_root=tmp / "ws",
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
    finally:
        http.close()
        thread.stop()
        coord.stop()
    out = {
        "runs": rows,
        "create_to_first_exec_s": _stats([r["create_to_first_exec_s"] for r in rows]),
        "order_to_running_s": _stats([r["order_to_running_s"] for r in rows]),
        "exec_round_trip_s": _stats([r["exec_round_trip_s"] for r in rows]),
        "billed_minus_running_s": [r["billed_minus_running_s"] for r in rows],
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for name in ("create_to_first_exec_s", "order_to_running_s", "exec_round_trip_s"):
        s = out[name]
        print(f"{name:<26} median {s['median']:.3f} s  max {s['max']:.3f} s")  # type: ignore[index]
    print("billed - running (s):", out["billed_minus_running_s"])


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


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "max": max(xs), "min": min(xs)}


if __name__ == "__main__":
    main()
