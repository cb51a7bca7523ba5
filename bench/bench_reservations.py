"""Inference reservations under another consumer's load (docs/market.md, "Reservations").

    PYTHONPATH=src python bench/bench_reservations.py [--requests 20] [--delay 0.01]

One in-process coordinator, three fake-engine providers with one slot each; consumer A
holds an inference order on one of them (P), consumer B loads the grid from `c` threads.
For each B concurrency (0, 2 = the unreserved slots, 4 = more than those), A sends
`--requests` sequential requests and we report A's median latency ÷ A's median on the idle
grid, the share of A's requests the reservation covered (routed to P, charged 0), and
where B's requests went. The same run is repeated with the order cancelled (A is then an
ordinary consumer): the baseline the reservation is measured against.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

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

# No verifier runs here: without this the probation budget stops paid work (docs/trust.md).
os.environ.setdefault("IDLEGRID_TRUST_PROBATION_BUDGET_UCR", "-1")
MODEL = "fake:1"
STAKE = 2 * MICRO
PROVIDERS = (("res", "RTX-4090", 0.20), ("q1", "RTX-3060", 0.30), ("q2", "RTX-3060", 0.30))


def start(data: Path, delay: float) -> tuple[CoordinatorThread, list[AgentThread], dict[str, str]]:
    settings = CoordinatorSettings(
        data_dir=data,
        database_url=f"sqlite:///{data}/bench.db",
        port=free_port(),
        heartbeat_interval_s=0.2,
        stake_per_device=STAKE,
        inference_stake=0,
        hw_proofs=False,
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agents, ids = [], {}
    with coordinator.admin(timeout=30) as c:
        for name, device, price_h in PROVIDERS:
            agent = make_agent(
                coordinator.url,
                [FakeEngine(MODEL, token_delay=delay)],
                name,
                price=Price(MICRO, 4 * MICRO),
                device_price_h=round(price_h * MICRO),
                devices=[{"model": device, "count": 1, "vram_gb": 0}],
                stake_per_device=STAKE,
            )
            ids[name] = agent.client.key.node_id
            c.post(
                "/api/v1/admin/mint",
                json={"node_id": ids[name], "amount": 50 * MICRO, "reference": f"fund-{name}"},
            ).raise_for_status()
            agents.append(AgentThread(agent))
            agents[-1].start()
    return coordinator, agents, ids


def key(coordinator: CoordinatorThread, name: str) -> str:
    with coordinator.admin(timeout=30) as c:
        k = c.post("/api/v1/admin/keys", json={"name": name}).json()
        c.post(
            "/api/v1/admin/mint",
            json={"key_id": k["key_id"], "amount": 1000 * MICRO, "reference": name},
        ).raise_for_status()
    return str(k["api_key"])


def _as(coordinator: CoordinatorThread, api_key: str) -> httpx.Client:
    return httpx.Client(
        base_url=coordinator.url,
        headers={"authorization": f"Bearer {api_key}"},
        timeout=30,
        trust_env=False,
    )


def phase(url: str, api_a: str, api_b: str, b_threads: int, n: int, p: str) -> dict[str, Any]:
    """A's sequential requests while B loads from `b_threads` threads."""
    done = threading.Event()
    b_routes: list[str] = []

    def load(i: int) -> None:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=api_b, max_retries=0) as b:
            j = 0
            while not done.is_set():
                raw = b.completions.with_raw_response.create(
                    model=MODEL, prompt=f"b{i} {j}", max_tokens=16
                )
                b_routes.append(raw.headers["x-idlegrid-route"])
                j += 1

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(b_threads)]
    for t in threads:
        t.start()
    lat, routes = [], []
    with openai.OpenAI(base_url=f"{url}/v1", api_key=api_a, max_retries=0) as a:
        for i in range(n):
            t0 = time.perf_counter()
            raw = a.completions.with_raw_response.create(
                model=MODEL, prompt=f"a {i}", max_tokens=16
            )
            lat.append(time.perf_counter() - t0)
            routes.append(raw.headers["x-idlegrid-route"])
    done.set()
    for t in threads:
        t.join(60)
    return {
        "a_median_s": statistics.median(lat),
        "a_covered": sum("reserved by" in r for r in routes) / n,
        "a_on_p": sum(r.startswith(p[:12]) for r in routes) / n,
        "b_requests": len(b_routes),
        "b_on_p": sum(r.startswith(p[:12]) for r in b_routes),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--delay", type=float, default=0.01)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        coordinator, agents, ids = start(Path(tmp), args.delay)
        try:
            api_a, api_b = key(coordinator, "a"), key(coordinator, "b")
            p = ids["res"]
            with _as(coordinator, api_a) as c:
                wait_until(
                    lambda: sum(o["staked"] for o in c.get("/api/v1/offers").json()["offers"]) == 3,
                    60,
                )
            order = {
                "id": "R1",
                "kind": "inference",
                "model": MODEL,
                "hours": 1,
                "resources": {"accelerators": ["RTX-4090"], "max_price": 1},
            }
            with openai.OpenAI(base_url=f"{coordinator.url}/v1", api_key=api_a) as a:
                a.completions.create(model=MODEL, prompt="warm", max_tokens=4)
            for reserved in (True, False):
                with _as(coordinator, api_a) as c:
                    if reserved:
                        r = c.post("/api/v1/orders", json=order)
                        assert r.json()["state"] == "active", r.text
                    else:
                        c.post("/api/v1/orders/R1/cancel").raise_for_status()
                idle = None
                for b_threads in (0, 2, 4):
                    res = phase(coordinator.url, api_a, api_b, b_threads, args.requests, p)
                    idle = idle or res["a_median_s"]
                    print(
                        f"{'reserved' if reserved else 'no order':9} B threads {b_threads}: "
                        f"A median {res['a_median_s'] * 1000:6.1f} ms "
                        f"(x{res['a_median_s'] / idle:.2f} of idle), "
                        f"A covered {res['a_covered']:.0%}, A on P {res['a_on_p']:.0%}, "
                        f"B on P {res['b_on_p']}/{res['b_requests']}"
                    )
        finally:
            for agent in agents:
                agent.stop()
            coordinator.stop()


if __name__ == "__main__":
    main()
