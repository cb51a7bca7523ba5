"""On an idle grid of two equally good providers, sequential requests take turns."""

from __future__ import annotations

import threading
from pathlib import Path

import openai

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.dashboard import queries
from idlegrid.core.ledger import MICRO
from idlegrid.engines.fake import FakeEngine
from idlegrid.testbed.inprocess import AgentThread, CoordinatorThread, free_port, make_agent

MODEL = "fake:1"


def test_sequential_requests_spread_over_an_idle_two_provider_grid(
    tmp_path: Path, database_url: str
) -> None:
    settings = CoordinatorSettings(
        data_dir=tmp_path, database_url=database_url, port=free_port(), heartbeat_interval_s=0.2
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    agents = [
        AgentThread(make_agent(coordinator.url, [FakeEngine(MODEL)], f"p{i}")) for i in range(2)
    ]
    for a in agents:
        a.start()
    try:
        tick = threading.Event()
        with coordinator.admin(timeout=30) as c:
            for _ in range(400):
                if sum(n["live"] for n in c.get("/api/v1/status").json()["nodes"]) == 2:
                    break
                tick.wait(0.05)
            key = c.post("/api/v1/admin/keys", json={"name": "t"}).json()
            c.post(
                "/api/v1/admin/mint",
                json={"key_id": key["key_id"], "amount": 10 * MICRO, "reference": "t"},
            ).raise_for_status()
        with openai.OpenAI(
            base_url=f"{coordinator.url}/v1", api_key=key["api_key"], max_retries=0
        ) as client:
            routes = []
            for i in range(6):  # one at a time: the grid is idle before each
                raw = client.completions.with_raw_response.create(
                    model=MODEL, prompt=f"turn {i}", max_tokens=4
                )
                routes.append(raw.headers["x-idlegrid-route"])
        store = coordinator.app.state.services.store
        served = [t["node_id"] for t in queries.finished_tasks(store, 0.0)]
        assert len(served) == 6
        counts = sorted(served.count(n) for n in set(served))
        assert counts == [3, 3], served  # each provider took every other request
        # Each answer says where it was routed and why: a tie, broken by least recent use.
        assert all("tie among 2" in r and "least recently used" in r for r in routes), routes
        assert [r.split(":")[0] for r in routes] == [n[:12] for n in served[::-1]]
    finally:
        for a in agents:
            a.stop()
        coordinator.stop()
