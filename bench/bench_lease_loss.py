"""A lease lost with its provider and restarted elsewhere (`restart_on_loss`), on a
loopback grid: how long until the loss is noticed, how long until the restart runs, and
what the consumer paid against the seconds that ran.

    PYTHONPATH=src .venv/bin/python bench/bench_lease_loss.py --rounds 3 [--json]

One coordinator (heartbeat 0.2 s, node timeout 1.5 s) and rounds + 1 RTX-4090 providers in
this process (bwrap runtime: root and bubblewrap needed). Baseline in the same run: create
→ running of the first lease. Each round holds the running lease, kills its provider's
agent, and times kill → `failed` seen (polled every 20 ms), `failed` → its restart
`running`; it reports how far before the kill billing stopped (the last heartbeat), and at
the end the consumer's charge against the seconds billed on every lease of the chain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

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

PER_S = 1000  # µcr a running second


def _until(c: GridClient, lease_id: str, state: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    while True:
        try:
            lease = c.lease(lease_id)
        except Exception:  # not adopted yet
            lease = {"state": "pending"}
        if lease["state"] == state:
            return time.perf_counter() - t0, lease
        if time.perf_counter() - t0 > 60:
            raise TimeoutError(f"{lease_id} not {state} after 60 s: {lease}")
        time.sleep(0.02)


def main() -> None:
    """Run the measurement and print a table (or JSON)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hold-s", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-lease-loss-"))
    coord = CoordinatorThread(
        CoordinatorSettings(
            data_dir=tmp, database_url=f"sqlite:///{tmp}/c.db", port=free_port(),
            heartbeat_interval_s=0.2, node_timeout_s=1.5, stake_per_device=0, hw_proofs=False,
        )
    )  # fmt: skip
    coord.start()
    agents: dict[str, AgentThread] = {}
    for i in range(args.rounds + 1):
        agent = make_agent(
            coord.url, [FakeEngine("fake:1")], f"p{i}", price=Price(MICRO, 4 * MICRO),
            device_price_h=3600 * PER_S, devices=[{"model": "RTX-4090", "count": 1, "vram_gb": 0}],
            workspace_root=tmp / f"ws{i}",
        )  # fmt: skip
        agents[agent.client.key.node_id] = AgentThread(agent)
        agents[agent.client.key.node_id].start()
    with coord.admin() as a:
        key = a.post("/api/v1/admin/keys", json={"name": "bench"}).json()
        a.post(
            "/api/v1/admin/mint",
            json={"key_id": key["key_id"], "amount": 1000 * MICRO, "reference": "bench"},
        ).raise_for_status()

    def balance(account: str) -> int:
        with coord.admin() as a:
            return int(a.get("/api/v1/status").json()["balances"].get(account, 0))

    rows: list[dict[str, float]] = []
    c = GridClient(coord.url, key["api_key"])
    try:
        wait_until(
            lambda: len(c.http.get("/api/v1/offers").json()["offers"]) == len(agents),
            timeout_s=60,
        )
        consumer = ledger.consumer_account(key["key_id"])
        before = balance(consumer)
        c.create_lease(1.0, {"accelerators": ["RTX-4090"], "max_price": 5.0},
                       restart_on_loss=True, lease_id="LL0")  # fmt: skip
        create_s, lease = _until(c, "LL0", "running")
        chain = ["LL0"]
        for _ in range(args.rounds):
            time.sleep(args.hold_s)  # the lease runs (and is billed) meanwhile
            killed_at = time.time()
            agents[lease["node_id"]].kill()
            notice_s, lost = _until(c, chain[-1], "failed")
            restart_s, lease = _until(c, lost["restarted_as"], "running")
            chain.append(lease["id"])
            rows.append(
                {
                    "notice_s": notice_s,
                    "billing_stopped_before_kill_s": killed_at - lost["transitions"][-1]["at"],
                    "restart_s": restart_s,
                }
            )
        c.end_lease(chain[-1])
        _until(c, chain[-1], "ended")
        final = [c.lease(i) for i in chain]
        billed = sum(x["billed_s"] for x in final)
        # Running up to each lease's end (a lost one: up to the last heartbeat), exactly.
        short = max(x["running_s"] - x["billed_s"] for x in final)
        running = sum(x["running_s"] for x in final)
        paid = before - balance(consumer)
    finally:
        c.__exit__(None, None, None)
        for t in agents.values():
            if t.thread and t.thread.is_alive():
                t.stop()
        for t in agents.values():
            for ws in list(t.agent.leases.workspaces.values()):
                ws.wipe()
        coord.stop()
    out = {
        "create_to_running_s": round(create_s, 3),
        "notice_s_median": round(statistics.median(r["notice_s"] for r in rows), 3),
        "restart_s_median": round(statistics.median(r["restart_s"] for r in rows), 3),
        "billing_stopped_before_kill_s_max": round(
            max(r["billing_stopped_before_kill_s"] for r in rows), 3
        ),
        "leases": len(chain),
        "billed_s": billed,
        "running_s": round(running, 3),
        "running_minus_billed_s_max_per_lease": round(short, 3),
        "paid_over_billed": round(paid / (billed * PER_S), 6) if billed else None,
        "rounds": rows,
    }
    if args.json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        if k != "rounds":
            print(f"{k:36} {v}")


if __name__ == "__main__":
    main()
